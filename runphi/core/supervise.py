"""Supervise one ZIC's cell from `created` to its exit status, inside a trio process.

The ZIC's long-lived owner runs a :class:`Supervisor`: the monitor process of the
runc-CLI mode (stop requests come from OS signals) or the shim server (stop
requests come from containerd's Kill calls). Guarantees:

* :meth:`Supervisor.run` returns exactly one :class:`~runphi.core.outcome.MonitorExit`
  with the DESIGN §4 status, once the cell's fate is decided and the console drained;
* the first graceful stop request (TERM, INT, HUP, QUIT) asks the cell to shut
  down, escalating to a destroy after the shutdown deadline; it decides the status
  (128+N), later graceful requests change nothing;
* SIGKILL destroys the cell at once and decides the status (137), even while a
  graceful stop is under way;
* the container counts as started once the start fifo delivers its byte or the
  cell is seen running;
* every activity is a task of one nursery: the cell watcher decides the end and
  cancels the rest;
* the cell is read every ``poll_interval`` while something happens (the first
  :data:`ACTIVE_WINDOW` seconds, and that long after any change of its state or any
  stop request), and every :data:`QUIET_POLL_INTERVAL` (at least) while it runs
  unchanged: an idle ZIC's owner costs next to no CPU, an end is seen within that.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Protocol

import msgspec
import trio

from runphi.backends.base import CellState, CellWatch, WatchSettings
from runphi.core.outcome import EXIT_SELF_SHUTDOWN, MonitorExit, decide_exit, utc_now

#: How long after a change the cell is watched at the backend's poll interval (seconds).
ACTIVE_WINDOW = 2.0
#: How often a cell that has not changed for :data:`ACTIVE_WINDOW` is read (seconds).
QUIET_POLL_INTERVAL = 0.25


class Console(Protocol):
    """A ZIC's console pumps as the supervisor drives them."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pump until drained or cancelled."""

    async def drain(self) -> int:
        """Finish the output once the cell stopped; the bytes dropped or lost."""


class Supervisor:
    """The cell watcher, stop handling, start detection and console of one ZIC."""

    def __init__(self, cell: CellWatch, watch: WatchSettings, *, start_fd: int = -1,
                 console: Console | None = None) -> None:
        self._cell = cell
        self._watch = watch
        self._start_fd = start_fd
        self._console = console
        #: Set once the guest runs (start fifo byte, or the cell seen running).
        self.started = trio.Event()
        #: The stop request that decides the exit status, once there is one.
        self.signal_number: int | None = None
        self._unreachable = False
        self._destroying = False
        self._stop_send, self._stop_receive = trio.open_memory_channel[int](math.inf)
        #: Until when the cell is read at the fast pace (trio clock).
        self._active_until = 0.0

    def stop(self, signum: int) -> None:
        """Ask the cell to stop because of ``signum`` (never blocks; see the module docstring)."""
        self._stop_send.send_nowait(signum)
        self._stay_active()

    def _stay_active(self) -> None:
        self._active_until = trio.current_time() + ACTIVE_WINDOW

    def _next_poll(self) -> float:
        """Seconds to the next read of the cell (module docstring)."""
        if trio.current_time() < self._active_until:
            return self._watch.poll_interval
        return max(self._watch.poll_interval, QUIET_POLL_INTERVAL)

    async def run(self) -> MonitorExit:
        """Supervise until the exit status is decided and the console drained."""
        outcome: MonitorExit | None = None
        dropped = 0
        async with trio.open_nursery() as outer:
            outer.start_soon(self._cell.follow)
            if self._console is not None:
                await outer.start(self._console.run)
            async with trio.open_nursery() as nursery:
                if self._start_fd >= 0:
                    nursery.start_soon(self._wait_for_start)
                nursery.start_soon(self._handle_stops)
                nursery.start_soon(self._probe_backend)

                async def decide() -> None:
                    nonlocal outcome
                    outcome = await self._watch_cell()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(decide)
            if self._console is not None:
                dropped = await self._console.drain()
            outer.cancel_scope.cancel()
        assert outcome is not None
        return msgspec.structs.replace(outcome, time=utc_now(), dropped_console_bytes=dropped)

    async def _wait_for_start(self) -> None:
        """Set `started` once ``start`` has started the cell and written its byte."""
        while True:
            await trio.lowlevel.wait_readable(self._start_fd)
            try:
                if os.read(self._start_fd, 64):
                    self.started.set()
                    return
            except BlockingIOError:
                continue

    async def _handle_stops(self) -> None:
        """Turn stop requests into a graceful shutdown or a destroy (module docstring)."""
        graceful = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            async for signum in self._stop_receive:
                if signum == signal.SIGKILL:
                    self.signal_number = signum
                    graceful.cancel()
                    if not self._destroying:
                        self._destroying = True
                        nursery.start_soon(self._destroy)
                elif self.signal_number is None:
                    self.signal_number = signum
                    nursery.start_soon(self._stop_gracefully, graceful)

    async def _stop_gracefully(self, scope: trio.CancelScope) -> None:
        """Graceful shutdown until it works or the deadline passes, then destroy."""
        with scope:
            with trio.move_on_after(self._watch.shutdown_timeout):
                while not await self._cell.request_shutdown():
                    await trio.sleep(self._watch.poll_interval)  # the cell refused: ask again
                return
            # Forced: the guest did not stop in time, so the cell is destroyed.
            await self._destroy()

    async def _destroy(self) -> None:
        """Destroy the cell; if even that is refused, keep asking (the watcher keeps the ZIC
        alive while the cell runs, and a KILL remains)."""
        while not await self._cell.force_destroy():
            await trio.sleep(max(self._watch.poll_interval, 0.2))

    async def _probe_backend(self) -> None:
        """Every probe interval, check the hypervisor still answers (see CellWatch.reachable)."""
        while True:
            await trio.sleep(self._watch.probe_interval)
            if not await self._cell.reachable():
                self._unreachable = True

    async def _watch_cell(self) -> MonitorExit:
        """Poll the cell state until it decides the exit status."""
        shut_down_seen = False
        last = None
        self._stay_active()
        while True:
            available, status = self._cell.read_state()
            if status != last:
                last = status
                self._stay_active()
            available = available and not self._unreachable
            if status.state is CellState.RUNNING:
                self.started.set()  # the cell runs, whatever the fifo says
            decision = decide_exit(status, available=available, started=self.started.is_set(),
                                   signal_number=self.signal_number)
            if decision is not None and decision[0] == EXIT_SELF_SHUTDOWN and not shut_down_seen:
                # A destroy also passes through `shut down` just before the cell disappears:
                # only a cell still there one poll later really shut itself down.
                shut_down_seen = True
            elif decision is not None:
                code, reason = decision
                return MonitorExit(code=code, reason=reason, signal=self.signal_number,
                                   cell_state=status.detail)
            else:
                shut_down_seen = False
            await trio.sleep(self._next_poll())  # sysfs offers no change notification
