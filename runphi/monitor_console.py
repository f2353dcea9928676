"""The monitor's console: a :class:`~runphi.console.session.ConsoleSession` wired to its fds.

Imported by the monitor only, after the fork (trio is already there).
Guarantees: output is read from the UART from the moment the monitor runs (the
UART was opened by ``create`` before the cell could start, so no byte is lost);
a stalled reader only costs dropped bytes, never blocks the cell watcher; at
the end :meth:`ConsoleTasks.drain` reads the UART until quiet and flushes
before the monitor exits.
"""

from __future__ import annotations

import trio

from runphi.console.session import ConsoleSession


class ConsoleTasks:
    """One container's console session: UART → stdout or pty slave, stdin or slave → UART."""

    def __init__(self, setup) -> None:
        terminal = setup.terminal_fd >= 0
        self.session = ConsoleSession(
            console_fd=setup.console_fd,
            output_fd=setup.terminal_fd if terminal else 1,
            input_fd=setup.terminal_fd if terminal else 0,
            log_dir=setup.container_dir,
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Pump both directions until :meth:`drain` (or cancellation) ends them."""
        await self.session.run(task_status=task_status)

    async def drain(self) -> int:
        """Drain the UART until quiet, flush, stop; return the bytes dropped or lost."""
        stats = await self.session.drain()
        return stats.dropped_bytes + stats.lost_bytes
