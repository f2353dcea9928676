"""Board UARTs as ptys owned by the simulator daemon.

The daemon holds each pty master for its whole life; the slave is published as
a stable symlink ``<root>/dev/ttyAMA<n>``. Like a real UART with nobody on the
line, bytes sent while no process has the slave open are dropped (the master
reports POLLHUP then). While a reader is attached, writers wait for room in the
pty instead of dropping, so a flooding guest runs exactly as fast as its reader.
"""

from __future__ import annotations

import errno
import os
import select
import tty
from pathlib import Path

import trio

# How often a UART with nobody attached checks whether someone opened it. The
# master gives no event for "slave opened", only POLLHUP while it is closed.
_HANGUP_RECHECK_S = 0.02


class PtyUart:
    """One board UART: pty master, slave symlink, and the guests listening to it."""

    def __init__(self, index: int, link: Path) -> None:
        self.index = index
        self.link = link
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.slave_path = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(self.master, False)
        self._poll = select.poll()
        self._poll.register(self.master, select.POLLOUT)
        self.listeners: set[trio.MemorySendChannel[bytes]] = set()
        self.dropped = 0
        self._write_lock = trio.Lock()
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.tmp")
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(self.slave_path)
        os.replace(tmp, link)

    def attached(self) -> bool:
        """True while some process has the slave end open."""
        return not any(ev & select.POLLHUP for _, ev in self._poll.poll(0))

    async def write(self, data: bytes) -> None:
        """Send bytes towards the reader, waiting for room; dropped if nobody is attached."""
        async with self._write_lock:
            await self._write(memoryview(data))

    async def _write(self, view: memoryview) -> None:
        while view:
            if not self.attached():
                self.dropped += len(view)
                return
            try:
                written = os.write(self.master, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.master)
                continue
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                self.dropped += len(view)
                return
            view = view[written:]

    def write_nowait(self, data: bytes) -> None:
        """Best-effort write that never waits (hypervisor debug console lines)."""
        if not self.attached():
            return
        try:
            os.write(self.master, data)
        except OSError:
            pass

    async def pump_input(self) -> None:
        """Forever: deliver bytes typed into the UART to every attached guest."""
        while True:
            await trio.lowlevel.wait_readable(self.master)
            try:
                data = os.read(self.master, 4096)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                await trio.sleep(_HANGUP_RECHECK_S)
                continue
            for channel in list(self.listeners):
                try:
                    channel.send_nowait(data)
                except trio.WouldBlock:
                    pass  # receiver overrun: a real UART FIFO drops too
                except trio.BrokenResourceError:
                    self.listeners.discard(channel)

    def close(self) -> None:
        """Remove the symlink and close the master (the pty disappears)."""
        try:
            if self.link.is_symlink() and os.readlink(self.link) == self.slave_path:
                self.link.unlink()
        except OSError:
            pass
        os.close(self.master)
