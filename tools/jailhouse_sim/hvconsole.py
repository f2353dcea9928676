"""The hypervisor console: one 2048-byte ring shared by the HV and all cells.

:class:`HvConsole` is the ring plus the driver's rules for reading it (``read``:
one ``read()`` of ``/dev/jailhouse``, jailhouse.md §2.5). :func:`serve_device`
publishes it to processes outside the daemon: the simulator cannot make a
character device, so ``<sim root>/dev/jailhouse`` is a unix stream socket whose
every connection is one open file of ``/dev/jailhouse`` read by a blocking
reader (what ``jailhouse console -f`` and ``cat /dev/jailhouse`` do).
"""

from __future__ import annotations

import errno
import fcntl
import struct
import termios
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

RING_SIZE = 2048
_U32 = 0xFFFFFFFF  # the driver's head and the HV's tail are free-running u32 counters

# While a device reader has not taken everything sent to it, the daemon looks again after
# this long, doubling up to the driver's own poll period (a blocking read sleeps HZ/10).
_DRAIN_POLL_S = 0.005
_DRAIN_POLL_MAX_S = 0.1


class ConsoleChunk(msgspec.Struct, frozen=True):
    """One ``read()`` of ``/dev/jailhouse``: data plus the reader's new position."""

    data: bytes
    head: int
    saved_seen: int
    error: int = 0


def _delta(content: bytes | bytearray, tail: int, head: int) -> tuple[bytes, int]:
    """What the driver's ``__jailhouse_console_dump_delta`` gives a reader at ``head``:
    ``(data, new head)``; more than a ring behind, the ``<missed N ...>`` line instead."""
    delta = (tail - head) & _U32
    if delta > RING_SIZE:
        missed = delta - RING_SIZE
        return f"<missed {missed} bytes of console log>\n".encode(), (head + missed) & _U32
    return bytes(content[len(content) - delta:]) if delta else b"", tail


class HvConsole:
    """Ring buffer with a free-running tail and the snapshot saved at ``disable``.

    ``watchers`` are called (no arguments) after every change a reader could see:
    a write, the snapshot at ``disable``, the reset at ``enable``."""

    def __init__(self) -> None:
        self.content = bytearray()
        self.tail = 0
        self.saved: bytes | None = None
        self.saved_tail = 0
        self.saved_id = 0
        # Bumped at every enable: a reader's head from an earlier enable means nothing now.
        self.epoch = 0
        self.watchers: list[Callable[[], None]] = []

    def _changed(self) -> None:
        for watcher in list(self.watchers):
            watcher()

    def write(self, text: str) -> None:
        """Hypervisor ``printk`` text."""
        self.write_bytes(text.encode("utf-8", "replace"))

    def write_bytes(self, data: bytes) -> None:
        """Append raw bytes (the debug-console hypercall writes guests' bytes as they are)."""
        if not data:
            return
        self.content += data
        del self.content[:-RING_SIZE]
        self.tail = (self.tail + len(data)) & _U32
        self._changed()

    def snapshot(self) -> bytes:
        """What the sysfs ``console`` attribute shows: the last <=2048 bytes."""
        return bytes(self.content)

    def save(self) -> None:
        """Keep the final log at ``disable`` so readers can still get it (``last_console``)."""
        self.saved = self.snapshot()
        self.saved_tail = self.tail
        self.saved_id += 1
        self._changed()

    def read(self, head: int, saved_seen: int, enabled: bool, follow: bool, available: bool = True) -> ConsoleChunk:
        """One read of ``/dev/jailhouse`` following the driver's rules (jailhouse.md §2.5).

        ``follow`` is a blocking reader (``console -f``): where a non-blocking one gets
        ``EAGAIN`` it gets nothing and its head goes back to 0. ``available`` is the
        system config's ``JAILHOUSE_SYS_VIRTUAL_DEBUG_CONSOLE`` (without it: ``EPERM``).
        Empty data without an error: nothing new (a non-blocking ``read`` returns 0).
        """
        if self.saved is not None and saved_seen != self.saved_id:
            data, new_head = _delta(self.saved, self.saved_tail, head)
            if data:
                return ConsoleChunk(data, new_head, saved_seen)
            return ConsoleChunk(b"", head, self.saved_id)  # the final log is consumed
        if not enabled:
            if follow:
                return ConsoleChunk(b"", 0, saved_seen)
            return ConsoleChunk(b"", head, saved_seen, errno.EAGAIN)
        if not available:
            return ConsoleChunk(b"", head, saved_seen, errno.EPERM)
        data, new_head = _delta(self.content, self.tail, head)
        return ConsoleChunk(data, new_head, saved_seen)

    def reset_for_enable(self) -> None:
        """A new enable starts a new ring; the final log of the last one is dropped."""
        self.content.clear()
        self.tail = 0
        self.saved = None
        self.epoch += 1
        self._changed()


# ---- <sim root>/dev/jailhouse ------------------------------------------------------------------


def unread_bytes(sock: trio.socket.SocketType) -> int:
    """What the peer of a unix stream socket has not read yet of what we sent (``SIOCOUTQ``,
    which is ``TIOCOUTQ``; for ``AF_UNIX`` it counts until the peer has read the bytes)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


class ConsoleDevice:
    """The readers of ``<sim root>/dev/jailhouse``: each connection is one open file.

    ``state()`` returns ``(enabled, available)``: whether the hypervisor is enabled and
    whether its system config has ``JAILHOUSE_SYS_VIRTUAL_DEBUG_CONSOLE``.

    Per connection the daemon keeps the driver's per-file ``head`` and ``last_console_id``
    and plays a blocking reader: whenever the ring changes and the reader has taken
    everything sent so far (nothing of it left in the socket), it sends what the next
    ``read()`` would return. A reader that does not read is never waited for and nothing
    is queued for it: it falls behind, and when it reads again it gets what was already
    in flight, then ``<missed N bytes of console log>`` and the newest data. The stream is
    byte for byte what ``jailhouse console -f`` prints. Where the device's read fails
    (``EPERM``: enabled without the system flag) the connection is closed, as the tool
    ends; it is also closed when the daemon stops.
    """

    def __init__(self, console: HvConsole, state: Callable[[], tuple[bool, bool]]) -> None:
        self.console = console
        self.state = state
        self._change = trio.Event()
        console.watchers.append(self._notify)

    def _notify(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        """One open file, until the reader hangs up, the read fails, or the daemon stops."""
        try:
            await self._feed(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the reader went away
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _feed(self, stream: trio.SocketStream) -> None:
        head, saved_seen, epoch = 0, 0, self.console.epoch
        while True:
            change = self._change
            await self._drained(stream)
            if epoch != self.console.epoch:
                # Re-enabled since the last read: a polling reader saw the disabled state in
                # between (EAGAIN resets its head), whatever the timing here.
                head, epoch = 0, self.console.epoch
            enabled, available = self.state()
            chunk = self.console.read(head, saved_seen, enabled, follow=True, available=available)
            if chunk.error:
                return
            head, saved_seen = chunk.head, chunk.saved_seen
            if chunk.data:
                await stream.send_all(chunk.data)
            else:
                await change.wait()

    @staticmethod
    async def _drained(stream: trio.SocketStream) -> None:
        """Wait until the reader has read everything sent to it so far."""
        delay = _DRAIN_POLL_S
        while unread_bytes(stream.socket):
            await trio.sleep(delay)
            delay = min(delay * 2, _DRAIN_POLL_MAX_S)


async def serve_device(path: Path, console: HvConsole, state: Callable[[], tuple[bool, bool]],
                       *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``path`` as the stand-in for ``/dev/jailhouse`` until cancelled (the socket file is
    removed on the way out). Reports started once readers can connect."""
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        sock.listen(64)
        device = ConsoleDevice(console, state)
        task_status.started()
        await trio.serve_listeners(device.serve, [trio.SocketListener(sock)])
    finally:
        sock.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass
