"""The minimal busybox initramfs of the runphi Linux guest.

Boot sequence inside the guest:

* ``/init`` (the kernel's first process) mounts proc, sysfs, devtmpfs and devpts,
  installs the busybox applet links and hands PID 1 over to busybox ``init``;
* ``/etc/init.d/rcS`` loads the power-key drivers when the kernel has them as
  modules, starts busybox ``acpid`` on the input devices, runs ``/etc/init.d/net`` and
  prints :data:`BANNER`;
* ``/etc/init.d/net`` does nothing unless the kernel command line carries
  ``runphi.net=<address>/<prefix>[,<gateway>]`` (:data:`NET_ARGUMENT`). With it, it loads
  the network drivers (:data:`NET_MODULES`, in dependency order), gives ``eth0`` the
  address (IPv4 only: IPv6 is disabled on it), adds the default route via the gateway when
  one is given, starts busybox ``httpd`` on port 80 serving :data:`HTTP_PAGE` as
  ``/index.html`` and :data:`HTTP_BULK_SIZE` zero bytes at :data:`HTTP_BULK_PATH` (a CGI
  script, :data:`HTTP_BULK_SCRIPT`, streaming them from ``/dev/zero``: nothing that size
  is held in the guest's RAM), and prints :func:`net_ready_line`; on a failure it prints one
  :data:`NET_FAILED_MESSAGE` line and the boot goes on;
* ``/etc/init.d/console`` runs a job-control shell on the real console device
  (``setsid cttyhack`` finds it from ``console=``); leaving that shell powers the guest off.

Shutdown paths: ``poweroff -f`` stops at once; ``poweroff`` (or ``exit`` in the shell)
is busybox init's orderly shutdown; the QEMU ``virt`` power button (``system_powerdown``,
a GPIO key with ``KEY_POWER``) reaches ``acpid``, which runs the same orderly poweroff.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping

from tools.linux_guest import cpio

BANNER = "runphi linux guest ready"
"""Printed once the console shell is about to start; tests and demos wait for it."""

HOSTNAME = "runphi-guest"
PROMPT = f"{HOSTNAME}:/# "
"""The shell's prompt in the root directory."""

POWER_KEY_MESSAGE = "runphi linux guest: power button pressed, powering off"
SHUTDOWN_MESSAGE = "runphi linux guest: orderly shutdown"

POWER_KEY_MODULES = ("evdev", "gpio_keys")
"""The QEMU virt power button's drivers (a gpio-keys device), loaded at every boot when present."""
NET_MODULES = ("virtio_mmio", "failover", "net_failover", "virtio_net")
"""The network drivers in load order (each after the modules its ``depends=`` names); loaded only
with :data:`NET_ARGUMENT`. The device is a virtio-net on a virtio-mmio transport (QEMU
``-device virtio-net-device``); it becomes ``eth0``."""

NET_ARGUMENT = "runphi.net"
"""Kernel command line argument ``runphi.net=<address>/<prefix>[,<gateway>]``, e.g.
``runphi.net=169.254.10.2/30,169.254.10.1``: the guest's ``eth0`` address and default route."""
NET_DEVICE = "eth0"
HTTP_PORT = 80
HTTP_PAGE = ("<!DOCTYPE html>\n<html><head><title>runphi linux guest</title></head>\n"
             "<body><h1>runphi linux guest</h1><p>served by busybox httpd inside a ZIC</p></body></html>\n")
"""The exact body of ``GET /`` on the networked guest."""
HTTP_BULK_PATH = "/cgi-bin/10MiB"
"""A bulk body for throughput measurements: ``GET`` it for :data:`HTTP_BULK_SIZE` zero bytes."""
HTTP_BULK_SIZE = 10 * 1024 * 1024
_BULK_BLOCK = 64 * 1024
HTTP_BULK_SCRIPT = f"""#!/bin/sh
# busybox httpd CGI: {HTTP_BULK_SIZE} zero bytes, streamed from /dev/zero (nothing held in RAM).
printf 'Content-Type: application/octet-stream\\r\\nContent-Length: {HTTP_BULK_SIZE}\\r\\n\\r\\n'
exec dd if=/dev/zero bs={_BULK_BLOCK} count={HTTP_BULK_SIZE // _BULK_BLOCK} 2>/dev/null
"""
"""The CGI script behind :data:`HTTP_BULK_PATH` (``/www/cgi-bin/<name>``, executable; needs
busybox's ``sh``, ``printf`` and ``dd``): any busybox httpd serving a copy of it does the same work."""
NET_READY_MESSAGE = f"runphi linux guest: httpd listening on port {HTTP_PORT} of {NET_DEVICE}"
"""Start of the console line printed once httpd listens; :func:`net_ready_line` gives the whole line."""
NET_FAILED_MESSAGE = "runphi linux guest: network setup failed"


def net_argument(address: str, gateway: str | None = None) -> str:
    """The kernel command line argument for ``address`` (``A.B.C.D/prefix``) and an optional gateway."""
    return f"{NET_ARGUMENT}={address}" + (f",{gateway}" if gateway else "")


def net_ready_line(address: str) -> str:
    """The console line the guest prints once httpd listens on ``address`` (``A.B.C.D/prefix``)."""
    return f"{NET_READY_MESSAGE} {address}"


_INIT = """#!/bin/sh
# PID 1 until busybox init takes over: the kernel filesystems first.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
if ! mount -t devtmpfs devtmpfs /dev 2>/dev/null; then
    # Kernels without devtmpfs: a tmpfs populated by mdev.
    mount -t tmpfs -o mode=0755 tmpfs /dev
    mdev -s
fi
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
exec /sbin/init
"""

_INITTAB = """::sysinit:/etc/init.d/rcS
::once:/etc/init.d/console
::shutdown:/etc/init.d/rcK
::ctrlaltdel:/sbin/poweroff
"""

_RCS = f"""#!/bin/sh
hostname -F /etc/hostname
# The QEMU virt power button is a gpio-keys device; Debian builds these drivers as modules.
for module in {" ".join(POWER_KEY_MODULES)}; do
    file=/lib/modules/$(uname -r)/$module.ko
    [ -e "$file" ] && insmod "$file"
done
# acpid only watches the input devices present when it starts.
ls /dev/input/event* >/dev/null 2>&1 && acpid -c /etc/acpi -l /dev/null
/etc/init.d/net
echo "{BANNER} ($(uname -s) $(uname -r) $(uname -m)); poweroff ends it"
"""

_CONSOLE = """#!/bin/sh
# The interactive session. cttyhack reopens the real console (from console=) and makes it
# the controlling tty, which only a session leader may do: hence setsid.
setsid cttyhack sh -l
poweroff
"""

_NET = f"""#!/bin/sh
# {NET_ARGUMENT}=<address>/<prefix>[,<gateway>] on the kernel command line: bring {NET_DEVICE} up
# and serve /www on port {HTTP_PORT}. Without it: nothing (the guest has no network).
net=
for arg in $(cat /proc/cmdline); do
    case "$arg" in {NET_ARGUMENT}=*) net="${{arg#{NET_ARGUMENT}=}}" ;; esac
done
[ -n "$net" ] || exit 0
fail() {{
    echo "{NET_FAILED_MESSAGE}: $*"
    exit 1
}}
address="${{net%%,*}}"
gateway=
case "$net" in *,*) gateway="${{net#*,}}" ;; esac
case "$address" in
    */*) ;;
    *) fail "{NET_ARGUMENT}=$net is not <address>/<prefix>[,<gateway>]" ;;
esac
# insmod does not resolve dependencies: the list is in load order. Built-in drivers have no file.
for module in {" ".join(NET_MODULES)}; do
    file=/lib/modules/$(uname -r)/$module.ko
    if [ -e "$file" ]; then insmod "$file" || fail "insmod $module"; fi
done
[ -e /sys/class/net/{NET_DEVICE} ] || fail "no {NET_DEVICE} (no virtio-net device on a virtio-mmio transport?)"
# The link is IPv4 only: no IPv6 link-local address, solicitations or DAD on it.
v6=/proc/sys/net/ipv6/conf/{NET_DEVICE}/disable_ipv6
if [ -w "$v6" ]; then echo 1 >"$v6"; fi
ip link set lo up
ip addr add "$address" dev {NET_DEVICE} || fail "ip addr add $address dev {NET_DEVICE}"
ip link set {NET_DEVICE} up || fail "ip link set {NET_DEVICE} up"
if [ -n "$gateway" ]; then
    ip route add default via "$gateway" dev {NET_DEVICE} || fail "ip route add default via $gateway"
fi
# httpd binds and listens before it goes to the background: once it returns, it serves.
httpd -p {HTTP_PORT} -h /www || fail "httpd -p {HTTP_PORT} -h /www"
echo "{NET_READY_MESSAGE} $address"
"""

_RCK = f"""#!/bin/sh
echo "{SHUTDOWN_MESSAGE}"
sync
"""

_ACPID_CONF = "PWRF power-button\n"

_POWER_BUTTON = f"""#!/bin/sh
echo "{POWER_KEY_MESSAGE}" >/dev/console
poweroff
"""

_PROFILE = """export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
export PS1='\\h:\\w\\$ '
cd "$HOME" 2>/dev/null; cd /
"""

_DIRECTORIES = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
                "run", "root", "etc", "etc/init.d", "etc/acpi", "lib", "lib/modules", "var",
                "var/run", "www", "www/cgi-bin")


def initramfs_entries(busybox: bytes, modules: Mapping[str, bytes], kernel_release: str) -> list[cpio.Entry]:
    """Every member of the guest's initramfs; ``modules`` maps ``name.ko`` to its bytes."""
    entries = [cpio.directory(path) for path in _DIRECTORIES]
    entries[entries.index(cpio.directory("tmp"))] = cpio.directory("tmp", 0o1777)
    entries += [
        # The kernel opens /dev/console for /init before anything is mounted.
        cpio.char_device("dev/console", 5, 1),
        cpio.file("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.file("init", _INIT.encode(), 0o755),
        cpio.file("etc/inittab", _INITTAB.encode()),
        cpio.file("etc/init.d/rcS", _RCS.encode(), 0o755),
        cpio.file("etc/init.d/rcK", _RCK.encode(), 0o755),
        cpio.file("etc/init.d/console", _CONSOLE.encode(), 0o755),
        cpio.file("etc/init.d/net", _NET.encode(), 0o755),
        cpio.file("www/index.html", HTTP_PAGE.encode()),
        cpio.file(f"www{HTTP_BULK_PATH}", HTTP_BULK_SCRIPT.encode(), 0o755),
        cpio.file("etc/acpid.conf", _ACPID_CONF.encode()),
        cpio.file("etc/acpi/power-button", _POWER_BUTTON.encode(), 0o755),
        cpio.file("etc/profile", _PROFILE.encode()),
        cpio.file("etc/hostname", f"{HOSTNAME}\n".encode()),
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        cpio.file("etc/group", b"root:x:0:\n"),
    ]
    if modules:
        entries.append(cpio.directory(f"lib/modules/{kernel_release}"))
        entries += [cpio.file(f"lib/modules/{kernel_release}/{name}", data)
                    for name, data in sorted(modules.items())]
    return entries


def build_initramfs(busybox: bytes, modules: Mapping[str, bytes], kernel_release: str) -> bytes:
    """The gzip-compressed newc archive; the same inputs always give the same bytes."""
    archive = cpio.write_newc(initramfs_entries(busybox, modules, kernel_release))
    return gzip.compress(archive, compresslevel=9, mtime=0)
