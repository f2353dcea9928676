"""Everything console-related one ZIC's monitor runs, as one object.

The monitor inherits from ``create`` the console source fd (UART, or the shared
hypervisor console) and either the shim's stdio (fds 0 and 1) or, in terminal
mode, the pty slave. A :class:`ConsoleSession` joins them:

* output: source -> :class:`~runphi.console.pump.ConsolePump` -> stdout or pty
  slave, teed into the container's console log (``runphi logs``);
* input: stdin or pty slave -> UART (not for the read-only hypervisor console).

Monitor usage (one nursery, the cell watcher decides the end)::

    session = ConsoleSession(console_fd=..., output_fd=..., input_fd=..., log_dir=...)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        ...  # the cell stops -> nursery.cancel_scope.cancel()
    stats = await session.drain()   # after the nursery, or instead of cancelling

:meth:`ConsoleSession.drain` works both while :meth:`run` is still going and
after it was cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import trio

from runphi.console import ConsoleError
from runphi.console.pump import (
    DEFAULT_BUFFER_LIMIT,
    DEFAULT_FINISH_DEADLINE_SECONDS,
    DEFAULT_QUIET_SECONDS,
    ConsolePump,
    FdSource,
    InputStats,
    PumpStats,
    pump_input,
)
from runphi.console.hvconsole import HypervisorSource
from runphi.console.ringlog import DEFAULT_LOG_LIMIT, ConsoleLogWriter
from runphi.console.stats import write_console_stats

#: At most one drop report (log line + stats file) per this many seconds.
DROP_REPORT_INTERVAL_SECONDS = 1.0
#: The shortest quiet window that ends a hypervisor console's drain: several of the
#: driver's 100 ms polls (seconds).
HYPERVISOR_DRAIN_QUIET_SECONDS = 0.5
#: How often, at most, the console counters are published while output flows (seconds).
STATS_PUBLISH_INTERVAL_SECONDS = 1.0


class ConsoleSession:
    """Output pump, input pump and console log of one container.

    Guarantees: :meth:`run` never ends the container (stdin EOF, a gone sink or
    a vanished UART only end the part concerned); :meth:`drain` returns within
    its deadline with the final output counters and closes the console log,
    whose failure to open is recorded in :attr:`log_error` instead of failing
    the container. The session does not close the fds it was given.

    The counters are published to ``console-stats.json`` at most once per
    :data:`STATS_PUBLISH_INTERVAL_SECONDS` while output flows (for ``runphi metrics``).
    Drops are reported as they happen, at most once per
    :data:`DROP_REPORT_INTERVAL_SECONDS`: ``on_drops(stats)`` is called (the
    monitor logs a warning there) and, with ``log_dir``, the counters are
    published to ``console-stats.json`` for ``runphi events``
    (:func:`runphi.console.stats.read_console_stats`); they are published once
    more by :meth:`drain`.
    """

    def __init__(
        self,
        *,
        console_fd: int,
        output_fd: int,
        input_fd: int | None,
        source_kind: Literal["uart", "hypervisor"] = "uart",
        log_dir: str | None = None,
        log_limit: int = DEFAULT_LOG_LIMIT,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        on_drops: Callable[[PumpStats], None] | None = None,
        cell_name: str = "",
    ) -> None:
        self.log_error: str | None = None
        self._log_dir = log_dir or None
        self._on_drops = on_drops
        self._scope = trio.CancelScope()
        self.input_stats: InputStats | None = None
        self._log = self._open_log(log_dir, log_limit)
        source = FdSource(console_fd) if source_kind == "uart" else HypervisorSource(
            console_fd, cell_name, on_missed=lambda count: self._pump.count_dropped(count))
        self._pump = ConsolePump(source, output_fd, buffer_limit=buffer_limit, tee=self._log)
        # The hypervisor console is read-only: nothing to type into.
        self._input_fd = input_fd if source_kind == "uart" else None
        self._hypervisor = source_kind == "hypervisor"
        self._console_fd = console_fd

    @property
    def stats(self) -> PumpStats:
        """Live output counters (read/written/dropped/lost), for ``events``."""
        return self._pump.stats

    async def wait_dropped(self, more_than: int) -> int:
        """Wait until more than ``more_than`` output bytes were dropped; return the count."""
        return await self._pump.wait_dropped(more_than)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pump both directions until :meth:`drain` is done or the caller cancels."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._pump.run)
                if self._input_fd is not None:
                    nursery.start_soon(self._pump_input)
                nursery.start_soon(self._report_drops)
                nursery.start_soon(self._publish_progress)
                task_status.started()

    async def drain(
        self,
        *,
        quiet: float = DEFAULT_QUIET_SECONDS,
        deadline: float = DEFAULT_FINISH_DEADLINE_SECONDS,
    ) -> PumpStats:
        """The cell has stopped: finish the output within ``deadline`` and close the log.

        From the hypervisor console the last bytes may still be on their way (read by
        polling, behind the hypervisor's own lines): the quiet window then starts now and
        is at least :data:`HYPERVISOR_DRAIN_QUIET_SECONDS`."""
        if self._hypervisor:
            self._pump.restart_quiet_window()
            quiet = max(quiet, HYPERVISOR_DRAIN_QUIET_SECONDS)
        try:
            stats = await self._pump.finish(quiet=quiet, deadline=deadline)
            self._publish(stats)
            return stats
        finally:
            self._scope.cancel()
            if self._log is not None:
                if self._log.error is not None:
                    self.log_error = self._log.error
                self._log.close()
                self._log = None

    async def _report_drops(self) -> None:
        reported = 0
        while True:
            reported = await self._pump.wait_dropped(reported)
            if self._on_drops is not None:
                self._on_drops(self.stats)
            self._publish(self.stats)
            await trio.sleep(DROP_REPORT_INTERVAL_SECONDS)

    async def _publish_progress(self) -> None:
        """Publish the counters after output arrived, at most once per
        :data:`STATS_PUBLISH_INTERVAL_SECONDS` (``runphi metrics`` reads them); a quiet console
        costs nothing."""
        if self._log_dir is None:
            return
        published = 0
        while True:
            published = await self._pump.wait_read(published)
            self._publish(self.stats)
            await trio.sleep(STATS_PUBLISH_INTERVAL_SECONDS)

    def _publish(self, stats: PumpStats) -> None:
        if self._log_dir is None:
            return
        try:
            write_console_stats(self._log_dir, stats)
        except OSError as exc:
            self.log_error = f"console stats in {self._log_dir} not published: {exc.strerror}"

    async def _pump_input(self) -> None:
        assert self._input_fd is not None
        self.input_stats = await pump_input(self._input_fd, self._console_fd)

    def _open_log(self, log_dir: str | None, limit: int) -> ConsoleLogWriter | None:
        if not log_dir:
            return None
        try:
            return ConsoleLogWriter(log_dir, limit=limit)
        except (ConsoleError, OSError) as exc:
            self.log_error = f"console log in {log_dir} not kept: {exc}"
            return None
