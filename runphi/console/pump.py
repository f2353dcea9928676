"""Byte pumps of the monitor: guest console -> containerd, and containerd -> guest.

Everything here runs inside the monitor's trio nursery. Readiness comes from
``trio.lowlevel.wait_readable``/``wait_writable`` on the descriptors themselves:
no thread, no polling loop (the one exception is the shared hypervisor console,
whose driver has no readiness notification; it is read at the driver's own
100 ms rhythm).

:class:`ConsolePump` moves console output to the sink through a
:class:`~runphi.console.bytequeue.DropOldestQueue`. The source is read whenever
it has bytes, whatever the sink does: when the sink stalls (nobody reads the
shim's FIFO) the queue fills up and the *oldest* bytes are dropped and counted,
so the UART never overruns and nothing waits on the reader. When the sink goes
away (EPIPE, or EIO on a pty whose master was closed) writing stops and later
output is counted as lost; reading goes on. When the cell stops,
:meth:`ConsolePump.finish` drains the source until it has been quiet for a short
window, flushes what the sink will take, all within one deadline.

:func:`pump_input` copies stdin (a pipe, or the pty slave in tty mode) to the
UART unchanged. Its end (EOF, a closed terminal) ends nothing else.

The pumps never close the descriptors they are given: the caller closes them
after the pump returns (call ``trio.lowlevel.notify_closing`` first if another
task may still wait on one).
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Protocol

import trio

from runphi.console.bytequeue import DropOldestQueue
from runphi.console.stats import InputStats, PumpStats

__all__ = [
    "ConsolePump", "FdSource", "InputStats", "PolledSource", "PumpStats", "pump_input", "write_some",
]

DEFAULT_BUFFER_LIMIT = 1 << 20
DEFAULT_CHUNK_SIZE = 1 << 16
DEFAULT_QUIET_SECONDS = 0.1
DEFAULT_FINISH_DEADLINE_SECONDS = 2.0
HYPERVISOR_CONSOLE_POLL_SECONDS = 0.1

# Errors that mean "the other end is gone for good", as opposed to a bug.
_GONE_ERRNOS = frozenset({errno.EPIPE, errno.EIO, errno.ECONNRESET, errno.ENXIO})


class ByteSource(Protocol):
    """Where console output comes from."""

    async def receive_some(self, max_bytes: int) -> bytes:
        """Wait for and return some bytes; ``b""`` means the source has ended."""


class ByteTee(Protocol):
    """A side copy of everything read (the console log). Must never raise or block."""

    def write(self, data: bytes) -> None: ...


class FdSource:
    """A readable descriptor (UART tty, pipe, pty slave) as a :class:`ByteSource`.

    End of input is EOF, or EIO (a pty or tty whose other side hung up).
    """

    def __init__(self, fd: int) -> None:
        set_nonblocking(fd)
        self.fd = fd

    async def receive_some(self, max_bytes: int) -> bytes:
        """Return the next bytes as soon as the fd has some; ``b""`` once it has ended.

        Cancellation can only happen before bytes are taken off the fd, never
        after: a cancelled call has consumed nothing.
        """
        # A source that is always ready must still let other tasks run.
        await trio.lowlevel.checkpoint()
        while True:
            try:
                return os.read(self.fd, max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise


class PolledSource:
    """The shared hypervisor console: a read of 0 bytes means "nothing new yet".

    ``/dev/jailhouse`` has no poll support and its blocking read sleeps inside
    the driver, so the only trio-friendly way is a non-blocking read at the
    driver's own rhythm. This source never ends by itself; the pump is finished
    by the monitor when the cell stops.
    """

    def __init__(self, fd: int, interval: float = HYPERVISOR_CONSOLE_POLL_SECONDS) -> None:
        set_nonblocking(fd)
        self.fd = fd
        self.interval = interval

    def read_now(self, max_bytes: int) -> bytes:
        """What is there now; b"" when nothing new (or the hypervisor is not enabled yet)."""
        try:
            return os.read(self.fd, max_bytes)
        except BlockingIOError:
            return b""

    async def receive_some(self, max_bytes: int) -> bytes:
        """Return the next bytes printed on the hypervisor console (cancelled: none taken)."""
        await trio.lowlevel.checkpoint()
        while not (data := self.read_now(max_bytes)):
            await trio.sleep(self.interval)
        return data


def set_nonblocking(fd: int) -> None:
    """Set O_NONBLOCK on ``fd`` (on its open file description, shared with its dups)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


async def write_some(fd: int, data: memoryview) -> int:
    """Write part of ``data`` to ``fd`` as soon as it accepts bytes; return how many.

    Cancellation can only happen before anything is written. Writes first and
    waits only on EAGAIN, so sinks epoll cannot watch
    (``/dev/null`` and regular files under ``--null-io`` or ``file://``) work too.
    """
    await trio.lowlevel.checkpoint()
    while True:
        try:
            return os.write(fd, data)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


class ConsolePump:
    """Console output: ``source`` -> bounded drop-oldest buffer -> ``sink_fd``.

    Guarantees: the source is drained whatever the sink does; at most
    ``buffer_limit`` bytes are held; bytes reach the sink unchanged and in order,
    minus the oldest ones dropped on overflow (counted in :attr:`stats`); a sink
    error stops writing, never reading; every wait is a trio checkpoint, so
    cancelling the enclosing scope stops the pump at once, and nothing read is
    forgotten by a cancellation (:meth:`finish` still flushes it).
    """

    def __init__(
        self,
        source: ByteSource,
        sink_fd: int,
        *,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        tee: ByteTee | None = None,
    ) -> None:
        set_nonblocking(sink_fd)
        self.stats = PumpStats()
        self._source = source
        self._sink_fd = sink_fd
        self._chunk_size = chunk_size
        self._tee = tee
        self._queue = DropOldestQueue(buffer_limit)
        self._running = False
        self._reading = False
        self._writing = False
        self._last_read = float("-inf")
        self._read_scope = trio.CancelScope()
        self._write_scope = trio.CancelScope()
        self._queue_changed = trio.lowlevel.ParkingLot()
        self._drops_changed = trio.lowlevel.ParkingLot()
        self._read_changed = trio.lowlevel.ParkingLot()

    @property
    def buffered_bytes(self) -> int:
        """Bytes read but not yet written."""
        return len(self._queue)

    async def wait_dropped(self, more_than: int) -> int:
        """Wait until more than ``more_than`` bytes have been dropped; return the count."""
        while self.stats.dropped_bytes <= more_than:
            await self._drops_changed.park()
        return self.stats.dropped_bytes

    def restart_quiet_window(self) -> None:
        """Count the source as active now: :meth:`finish` then waits a whole quiet window for
        bytes still on their way (a polled source that skipped what it read looks quiet)."""
        self._last_read = trio.current_time()

    def count_dropped(self, count: int) -> None:
        """Count ``count`` bytes the source itself lost before they reached the pump (the
        hypervisor console's missed bytes) as dropped, as the pump's own drops are."""
        self.stats.dropped_bytes += count
        self._drops_changed.unpark_all()

    async def wait_read(self, more_than: int) -> int:
        """Wait until more than ``more_than`` bytes have been read; return the count."""
        while self.stats.read_bytes <= more_than:
            await self._read_changed.park()
        return self.stats.read_bytes

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> PumpStats:
        """Pump until the source has ended and everything read is written (or the
        sink is gone), until :meth:`finish` stops it, or until cancelled."""
        if self._running:
            raise RuntimeError("this console pump is already running")
        self._running = True
        self._read_scope = trio.CancelScope()
        self._write_scope = trio.CancelScope()
        self._last_read = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._reading = self.stats.source_ended is None
                self._writing = self.stats.sink_closed is None
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._write_loop)
                task_status.started()
        finally:
            self._running = False
        return self.stats

    async def finish(
        self,
        *,
        quiet: float = DEFAULT_QUIET_SECONDS,
        deadline: float = DEFAULT_FINISH_DEADLINE_SECONDS,
    ) -> PumpStats:
        """The cell has stopped: drain the source until it is quiet for ``quiet``
        seconds, flush the buffer, then stop the pump; all within ``deadline`` seconds.

        Works whether :meth:`run` is still running in the caller's nursery (it
        returns promptly afterwards) or was cancelled already (the pump then
        runs once more, here). Guarantees: returns within ``deadline`` (plus
        scheduling); bytes read but not written by then count as lost.
        """
        with trio.move_on_after(deadline):
            async with trio.open_nursery() as nursery:
                if not self._running:
                    await nursery.start(self.run)
                await self._until_source_quiet(quiet)
                self._read_scope.cancel()
                await self._until_flushed()
                self._write_scope.cancel()
        self._read_scope.cancel()
        self._write_scope.cancel()
        self.stats.lost_bytes += self._queue.clear()
        return self.stats

    async def _read_loop(self) -> None:
        try:
            with self._read_scope:
                while self.stats.source_ended is None:
                    await self._read_once()
        finally:
            self._reading = False
            self._queue_changed.unpark_all()

    async def _read_once(self) -> None:
        try:
            data = await self._source.receive_some(self._chunk_size)
        except OSError as exc:
            self.stats.source_ended = f"read error: {exc.strerror or exc}"
            return
        if not data:
            self.stats.source_ended = "end of file"
            return
        self._last_read = trio.current_time()
        self.stats.read_bytes += len(data)
        self._read_changed.unpark_all()
        if self._tee is not None:
            self._tee.write(data)
        if self.stats.sink_closed is None:
            dropped = self._queue.push(data)
            self._queue_changed.unpark_all()
            if dropped:
                self.stats.dropped_bytes += dropped
                self._drops_changed.unpark_all()
        else:
            self.stats.lost_bytes += len(data)

    async def _write_loop(self) -> None:
        try:
            with self._write_scope:
                while self.stats.sink_closed is None:
                    if self._queue:
                        await self._write_oldest()
                    elif self._reading:
                        await self._queue_changed.park()
                    else:
                        break
        finally:
            self._writing = False
            self._queue_changed.unpark_all()

    async def _write_oldest(self) -> None:
        # The reader may drop the bytes we were about to write while we wait for
        # the sink, so the view is taken only once the sink is known writable.
        while self._queue:
            try:
                written = os.write(self._sink_fd, self._queue.peek())
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sink_fd)
                continue
            except OSError as exc:
                if exc.errno not in _GONE_ERRNOS:
                    raise
                self.stats.sink_closed = f"write error: {exc.strerror}"
                self.stats.lost_bytes += self._queue.clear()
                return
            self._queue.consume(written)
            self.stats.written_bytes += written
            self._queue_changed.unpark_all()
            await trio.lowlevel.checkpoint()
            return

    async def _until_source_quiet(self, quiet: float) -> None:
        while self._reading:
            quiet_at = self._last_read + quiet
            if trio.current_time() >= quiet_at:
                return
            await trio.sleep_until(quiet_at)

    async def _until_flushed(self) -> None:
        while self._writing and self._queue:
            await self._queue_changed.park()


async def pump_input(source_fd: int, uart_fd: int, *, chunk_size: int = 4096) -> InputStats:
    """Copy stdin (pipe or pty slave) to the guest UART, bytes unchanged, until stdin ends.

    Guarantees: every byte read is written to the UART in order before the next
    read (the UART's own buffer is the back-pressure, nothing is dropped); EOF
    or EIO on stdin, or the UART going away, just ends this pump and is
    recorded in the returned stats.
    """
    stats = InputStats()
    source = FdSource(source_fd)
    set_nonblocking(uart_fd)
    while True:
        try:
            data = await source.receive_some(chunk_size)
        except OSError as exc:
            stats.ended = f"stdin read error: {exc.strerror or exc}"
            return stats
        if not data:
            stats.ended = "end of stdin"
            return stats
        view = memoryview(data)
        try:
            while view:
                written = await write_some(uart_fd, view)
                stats.bytes += written
                view = view[written:]
        except OSError as exc:
            if exc.errno not in _GONE_ERRNOS:
                raise
            stats.ended = f"UART write error: {exc.strerror}"
            return stats
