"""The hypervisor console as one ZIC's console: its own lines out of the shared ring.

Jailhouse's debug console is one untagged 2 KiB ring: the hypervisor's own messages
(``Created cell "…"``, ``Page pool usage …``, …) and whatever cells print with the
debug-console hypercall, interleaved. runphi leases it to one ZIC at a time, so what is
not the hypervisor's is that ZIC's. :class:`RingFilter` turns the ring's byte stream into
the ZIC's: it skips everything before the ``Created cell "<cell>"`` line of the ZIC's cell
(history of earlier tenants), drops the hypervisor's lines (exact formats in
jailhouse.md §4.7), and turns ``<missed N bytes of console log>`` into N dropped bytes,
counted as the UART path counts them. A partial line is held until its newline, or passed
on when the ring has been quiet for one poll (a prompt).

:class:`HypervisorSource` is the pump's source for it: a non-blocking reader of the device
(``/dev/jailhouse``, or the simulator's socket) polled at the driver's rhythm.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import trio

from runphi.console.pump import HYPERVISOR_CONSOLE_POLL_SECONDS, PolledSource

#: The hypervisor's own console lines (jailhouse.md §4.7), matched at a line's start.
HYPERVISOR_LINES = re.compile(
    rb"(Initializing Jailhouse hypervisor |Code location: |Page pool usage after |Initializing processors:"
    rb"| CPU \d+\.\.\. |Initializing unit: |Adding virtual PCI device |Adding PCI device |Removing PCI device "
    rb"|Activating hypervisor|Shared memory connection established|Created cell \"|Cell \".*\" can be loaded"
    rb"|Started cell \"|Closing cell \"|Shutting down hypervisor| Releasing CPU \d+|Unhandled |Parking CPU \d+"
    rb"|FATAL: | \".*\"\r?$)")
#: The driver's note that a reader fell more than the ring behind; it starts a read, so in a
#: stream it may follow a partial line.
MISSED = re.compile(rb"<missed (\d+) bytes of console log>\n")


class RingFilter:
    """Feed it the ring's bytes in order; it returns the ZIC's (module docstring)."""

    def __init__(self, cell_name: str, on_missed: Callable[[int], None]) -> None:
        self._created = f'Created cell "{cell_name}"'.encode()
        self._on_missed = on_missed
        self._ours = False
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        """The complete lines of ``data`` (with what was pending) that are the ZIC's."""
        pieces = MISSED.split(data)  # text, count, text, count, ..., text
        kept = [self._lines(pieces[0])]
        for count, text in zip(pieces[1::2], pieces[2::2], strict=True):
            self._on_missed(int(count))
            self._ours = True  # the ZIC's Created line may be among what was missed
            kept.append(self._lines(text))
        return b"".join(kept)

    def _lines(self, data: bytes) -> bytes:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        return b"".join(self._keep(line + b"\n") for line in lines)

    def flush(self) -> bytes:
        """The pending partial line, when the ring went quiet (it is the ZIC's, e.g. a prompt)."""
        pending, self._pending = self._pending, b""
        if not self._ours or not pending or HYPERVISOR_LINES.match(pending) or b"<missed" in pending:
            self._pending = pending
            return b""
        return pending

    def _keep(self, line: bytes) -> bytes:
        body = line.rstrip(b"\n")
        if not self._ours:
            self._ours = body.rstrip(b"\r") == self._created
            return b""
        return b"" if HYPERVISOR_LINES.match(body) else line


class HypervisorSource:
    """The ZIC's bytes from a non-blocking reader of the hypervisor console (never ends by itself:
    0 bytes is "nothing new" on the device; the ZIC's owner finishes the pump when the cell stops)."""

    def __init__(self, fd: int, cell_name: str, on_missed: Callable[[int], None],
                 interval: float = HYPERVISOR_CONSOLE_POLL_SECONDS) -> None:
        self._device = PolledSource(fd, interval)
        self.filter = RingFilter(cell_name, on_missed)

    async def receive_some(self, max_bytes: int) -> bytes:
        """The next bytes the ZIC printed (cancelled: none taken)."""
        await trio.lowlevel.checkpoint()
        while True:
            data = self._device.read_now(max_bytes)
            kept = self.filter.feed(data) if data else self.filter.flush()
            if kept:
                return kept
            await trio.sleep(self._device.interval)
