"""The minimal busybox initramfs of the runphi Linux guest.

Boot sequence inside the guest:

* ``/init`` (the kernel's first process) mounts proc, sysfs, devtmpfs and devpts,
  installs the busybox applet links and hands PID 1 over to busybox ``init``;
* ``/etc/init.d/rcS`` loads the power-key drivers when the kernel has them as
  modules, starts busybox ``acpid`` on the input devices and prints :data:`BANNER`;
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
for module in evdev gpio_keys; do
    file=/lib/modules/$(uname -r)/$module.ko
    [ -e "$file" ] && insmod "$file"
done
# acpid only watches the input devices present when it starts.
ls /dev/input/event* >/dev/null 2>&1 && acpid -c /etc/acpi -l /dev/null
echo "{BANNER} ($(uname -s) $(uname -r) $(uname -m)); poweroff ends it"
"""

_CONSOLE = """#!/bin/sh
# The interactive session. cttyhack reopens the real console (from console=) and makes it
# the controlling tty, which only a session leader may do: hence setsid.
setsid cttyhack sh -l
poweroff
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
                "var/run")


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
