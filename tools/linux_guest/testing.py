"""Test helpers for the Linux guest: the built guest (or a skip), QEMU virt's device
tree, a console transcript, the guest booted directly under QEMU on a real pty, and a
network namespace with a tap for the networked guest (with an HTTP GET from inside it).

Used by this package's tests and by tests that run the guest inside a cell or a ZIC::

    async def test_banner(linux_guest):
        async with boot_in_qemu(linux_guest) as vm:
            await vm.console.expect(BANNER)
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from runphi.backends.links import run_in_namespace
from tools.linux_guest import apt
from tools.linux_guest.errors import LinuxGuestError
from tools.linux_guest.guest import LinuxGuest, build, default_cache_dir, guest_dir, qemu_argv
from tools.linux_guest.initramfs import PROMPT

QEMU = "qemu-system-aarch64"


def guest_unavailable(cache: Path | None = None) -> str | None:
    """Why the guest cannot be had on this host (to skip with), or None.

    Only a missing QEMU, a host without apt, or a non-root user facing an empty cache
    count; any other failure (e.g. the network) is an error the caller must see.
    """
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian package qemu-system-arm)"
    if (guest_dir(cache or default_cache_dir()) / "guest.json").is_file():
        return None
    try:
        apt.require_apt()
    except LinuxGuestError as exc:
        return exc.line()
    if os.geteuid() != 0:
        return "the Linux guest is not cached and fetching it needs root (apt-get)"
    return None


def guest_or_skip(cache: Path | None = None) -> LinuxGuest:
    """The built guest for a test; skips (with the reason) only when it truly cannot be had."""
    import pytest

    reason = guest_unavailable(cache)
    if reason:
        pytest.skip(f"Linux guest: {reason}")
    try:
        return build(cache)
    except LinuxGuestError as exc:
        pytest.fail(exc.line(), pytrace=False)


def virt_dtb_argv(path: Path, qemu: str = QEMU) -> list[str]:
    """QEMU's command line that writes the GICv3 Cortex-A53 ``virt`` device tree to ``path`` and exits.

    It asks for no devices (``-nodefaults``): QEMU's default NIC needs a ROM from
    ipxe-qemu, which a ``--no-install-recommends`` install of QEMU leaves out, and
    the NIC is on PCI, so the device tree is the same without it.
    """
    return [qemu, "-M", f"virt,gic-version=3,dumpdtb={path}", "-cpu", "cortex-a53",
            "-nodefaults", "-display", "none"]


def virt_dtb_or_skip(path: Path) -> bytes:
    """QEMU ``virt``'s device tree, written to ``path`` and returned.

    Skips the test without QEMU; fails it with QEMU's own message if QEMU cannot dump it.
    """
    import pytest

    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not found (apt-get install qemu-system-arm): no QEMU virt device tree")
    done = subprocess.run(virt_dtb_argv(path), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"{QEMU} could not dump its device tree (exit {done.returncode}): {done.stderr.strip()}",
                    pytrace=False)
    return path.read_bytes()


class Transcript:
    """Every byte a console printed, kept whole, with waits for what it prints next."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self._changed = trio.Event()

    @property
    def text(self) -> str:
        """The transcript so far, decoded leniently (for assertions and failure messages)."""
        return self.data.decode(errors="replace")

    def mark(self) -> int:
        """The current end; pass it as ``after`` to wait only for output that comes later."""
        return len(self.data)

    def feed(self, chunk: bytes) -> None:
        """Append output (an empty chunk marks the end of the stream)."""
        if chunk:
            self.data += chunk
        else:
            self.closed = True
        self._changed.set()
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Feed everything ``stream`` yields until it ends (a hung-up pty counts as the end)."""
        try:
            while chunk := await stream.receive_some(65536):
                self.feed(chunk)
        except trio.BrokenResourceError:
            pass
        self.feed(b"")

    async def expect(self, text: str, after: int = 0, timeout: float = 60.0) -> int:
        """Wait until ``text`` appears at or after offset ``after``; the offset just past it.

        Fails with the transcript's tail when the deadline passes or the stream ends first.
        """
        needle = text.encode()
        with trio.move_on_after(timeout):
            while (found := self.data.find(needle, after)) < 0:
                if self.closed:
                    break
                await self._changed.wait()
            else:
                return found + len(needle)
        why = "the console closed" if self.closed else f"{timeout:g} s passed"
        raise AssertionError(f"{why} before {text!r} appeared; console tail:\n{self.text[-3000:]}")


@dataclass
class QemuGuest:
    """A guest booted by :func:`boot_in_qemu`: its process, console and QMP socket path."""

    process: trio.Process
    console: Transcript
    qmp_path: Path
    _master: trio.lowlevel.FdStream

    async def type(self, keys: str) -> int:
        """Send keystrokes to the console; the transcript offset before they were sent."""
        mark = self.console.mark()
        await self._master.send_all(keys.encode())
        return mark

    async def run(self, command: str, timeout: float = 30.0) -> str:
        """Type ``command`` and return what it printed before the next prompt."""
        mark = await self.type(command + "\n")
        echoed = await self.console.expect(command, mark, timeout)
        end = await self.console.expect(PROMPT, echoed, timeout)
        return self.console.data[echoed:end - len(PROMPT)].decode(errors="replace").strip()

    async def wait_exit(self, timeout: float = 60.0) -> int:
        """QEMU's exit status, failing the test if it is still running after ``timeout``."""
        with trio.move_on_after(timeout):
            return await self.process.wait()
        raise AssertionError(f"QEMU still running after {timeout:g} s; console tail:\n"
                             f"{self.console.text[-3000:]}")


@asynccontextmanager
async def boot_in_qemu(guest: LinuxGuest, workdir: Path, memory_mib: int = 96,
                       cmdline: str = "console=ttyAMA0", extra_argv: Sequence[str] = (),
                       pass_fds: Sequence[int] = ()) -> AsyncIterator[QemuGuest]:
    """Boot ``guest`` under QEMU with its PL011 on a fresh pty; QEMU is killed on exit.

    ``extra_argv`` is added to QEMU's command line (devices, e.g. :meth:`TapNamespace.qemu_argv`),
    ``pass_fds`` are the descriptors QEMU inherits under their own numbers.
    The QMP socket (``workdir/qmp.sock``) accepts connections once QEMU is running.
    """
    qmp_path = workdir / "qmp.sock"
    argv = qemu_argv(guest, memory_mib, cmdline) + ["-qmp", f"unix:{qmp_path},server=on,wait=off",
                                                    *extra_argv]
    master, slave = os.openpty()
    try:
        process = await trio.lowlevel.open_process(argv, stdin=slave, stdout=slave, stderr=slave,
                                                   pass_fds=tuple(pass_fds))
    finally:
        os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    console = Transcript()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(console.pump, stream)
            try:
                yield QemuGuest(process, console, qmp_path, stream)
            finally:
                if process.returncode is None:
                    process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
"""The only addresses test networks use (inside namespaces the tests make)."""
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


@dataclass(frozen=True)
class TapNamespace:
    """A network namespace made for a test, holding a tap (IPv4 only) with the host's address.

    ``fd`` is the tap's queue, opened inside the namespace: QEMU takes it as
    ``-netdev tap,fd=N`` (pass it in ``pass_fds``), so QEMU itself stays in the host's
    namespace and needs no ``ip netns exec``. Closing ``fd`` removes the tap.
    """

    name: str
    tap: str
    fd: int
    address: ipaddress.IPv4Interface

    def qemu_argv(self, netdev: str = "n0") -> list[str]:
        """The guest's network device: virtio-net on a virtio-mmio transport of ``virt``."""
        return ["-netdev", f"tap,id={netdev},fd={self.fd}", "-device", f"virtio-net-device,netdev={netdev}"]


def _link_local(address: str) -> ipaddress.IPv4Interface:
    interface = ipaddress.ip_interface(address)
    if not isinstance(interface, ipaddress.IPv4Interface) or not interface.network.subnet_of(LINK_LOCAL):
        raise ValueError(f"{address} is not inside {LINK_LOCAL}: test networks use link-local addresses only")
    return interface


def _open_tap(tap: str) -> int:
    """In the namespace: IPv6 off for new links, then a tap named ``tap``; its queue's fd."""
    ipv6 = Path("/proc/sys/net/ipv6/conf")
    if ipv6.is_dir():
        (ipv6 / "default" / "disable_ipv6").write_text("1\n")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", tap.encode(), _IFF_TAP | _IFF_NO_PI))
        if ipv6.is_dir() and (ipv6 / tap / "disable_ipv6").read_text().strip() != "1":
            raise OSError(f"IPv6 is still enabled on {tap}")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def tap_namespace(name: str, tap: str, address: str) -> Iterator[TapNamespace]:
    """A new network namespace ``name`` with tap ``tap`` up at ``address`` (``A.B.C.D/prefix``,
    inside 169.254.0.0/16); the namespace and the tap are gone afterwards. Needs root."""
    from pyroute2 import IPRoute, netns

    interface = _link_local(address)
    netns.create(name)
    fd = None
    try:
        fd = run_in_namespace(name, lambda: _open_tap(tap))
        with IPRoute(netns=name, flags=0) as ipr:
            (index,) = ipr.link_lookup(ifname=tap)
            ipr.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
            ipr.link("set", index=index, state="up")
        yield TapNamespace(name, tap, fd, interface)
    finally:
        if fd is not None:
            os.close(fd)
        netns.remove(name)


async def http_get_in(namespace: str, host: str, port: int = 80, path: str = "/",
                      timeout: float = 30.0) -> tuple[int, bytes]:
    """``GET path`` (HTTP/1.0) to ``host:port`` from inside network namespace ``namespace``:
    (status code, body). ``host`` must be link-local. The socket is made in the namespace
    (pyroute2's ``create_socket``), then used here like any other."""
    from pyroute2 import netns

    _link_local(host)
    sock = await trio.to_thread.run_sync(lambda: netns.create_socket(namespace, flags=0))
    request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    response = bytearray()
    with trio.fail_after(timeout):
        tsock = trio.socket.from_stdlib_socket(sock)
        await tsock.connect((host, port))
        async with trio.SocketStream(tsock) as stream:
            await stream.send_all(request)
            while chunk := await stream.receive_some(65536):
                response += chunk
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
        raise AssertionError(f"not an HTTP response from {host}:{port}: {bytes(response[:200])!r}")
    return int(status[1]), body
