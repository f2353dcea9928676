"""The monitor's console tasks: guest UART -> stdout (or the pty slave), stdin -> UART.

Built from :mod:`runphi.console.pump` (bounded drop-oldest buffer, drain) and
:mod:`runphi.console.ringlog` (the console log ``runphi logs`` reads). Imported
by the monitor only, after the fork, so trio is already there.

Guarantees: output is read from the UART from the moment the monitor runs (the
UART was opened by ``create`` before the cell could start, so no byte is lost);
a stalled reader only costs dropped bytes, never blocks the cell watcher; at the
end :meth:`ConsoleTasks.drain` reads the UART until quiet and flushes before the
monitor exits.
"""

from __future__ import annotations

import trio

from runphi.console.pump import ConsolePump, FdSource, pump_input
from runphi.console.ringlog import ConsoleLogWriter


class ConsoleTasks:
    """One container's console pumps, run in the monitor's outer nursery."""

    def __init__(self, setup) -> None:
        self.setup = setup
        self.sink = setup.terminal_fd if setup.terminal_fd >= 0 else 1
        self.input = setup.terminal_fd if setup.terminal_fd >= 0 else 0
        self.log = _open_log(setup.container_dir)
        self.pump = ConsolePump(FdSource(setup.console_fd), self.sink, tee=self.log)
        self._scope = trio.CancelScope()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Pump both directions until :meth:`drain` (or cancellation) ends them."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pump.run)
                nursery.start_soon(pump_input, self.input, self.setup.console_fd)
                task_status.started()

    async def drain(self) -> int:
        """Drain the UART until quiet, flush, stop everything; return bytes dropped."""
        stats = await self.pump.finish()
        self._scope.cancel()
        if self.log is not None:
            self.log.close()
        return stats.dropped_bytes + stats.lost_bytes


def _open_log(container_dir: str) -> ConsoleLogWriter | None:
    try:
        return ConsoleLogWriter(container_dir)
    except OSError:
        return None  # no console log, but the stream itself still works
