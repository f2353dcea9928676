"""A ZIC's console as its supervisor drives it: a :class:`~runphi.console.session.ConsoleSession`.

Imported by the ZIC's long-lived owner only (the monitor after the fork, the shim
server), where trio is already there.
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
    """One container's console session: UART → ``output_fd``, ``input_fd`` → UART (None: no input)."""

    def __init__(self, *, console_fd: int, output_fd: int, input_fd: int | None, log_dir: str,
                 kind: str = "uart", cell_name: str = "") -> None:
        self.session = ConsoleSession(console_fd=console_fd, output_fd=output_fd, input_fd=input_fd,
                                      log_dir=log_dir, source_kind="hypervisor" if kind == "hypervisor" else "uart",
                                      cell_name=cell_name)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Pump both directions until :meth:`drain` (or cancellation) ends them."""
        await self.session.run(task_status=task_status)

    async def drain(self) -> int:
        """Drain the UART until quiet, flush, stop; return the bytes dropped or lost."""
        stats = await self.session.drain()
        return stats.dropped_bytes + stats.lost_bytes
