"""The event stream of one ZIC (``runphi events``), as a trio program.

One JSON object per line in runc's envelope ``{"type", "id", "data"}``:

* ``stats`` — every interval (and once for ``--stats``): the cell's state and its
  hypervisor exit counters, in total and per CPU (``data.cell``);
* ``cell-state`` — runphi's own type, on every change of the cell's state
  (``data.state``, ``data.previous``; ``null`` state = the cell is gone);
* ``failed`` — when the cell crashes (`failed` / `Comm ABI mismatch`), with the
  failed CPUs.

The stream ends (exit 0) when the container stops, after a last ``cell-state``.
Two tasks in one nursery: the state watcher (sysfs polled at the configured
interval) ends the stream by cancelling the stats ticker.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import msgspec
import trio

from runphi.backends.base import Backend, BackendError, CellRecord, CellState, CellStatistics


class CellStats(msgspec.Struct):
    """``data.cell`` of a ``stats`` event."""

    name: str
    state: str | None
    exits: dict[str, int]
    per_cpu: dict[int, dict[str, int]]


class StatsEvent(msgspec.Struct):
    type: str
    id: str
    data: dict[str, CellStats]


class CellStateData(msgspec.Struct):
    state: str | None
    previous: str | None


class CellStateEvent(msgspec.Struct):
    type: str
    id: str
    data: CellStateData


class FailedData(msgspec.Struct):
    state: str
    failed_cpus: list[int]


class FailedEvent(msgspec.Struct):
    type: str
    id: str
    data: FailedData


def stats_line(container_id: str, cell_name: str, state: str | None, stats: CellStatistics) -> bytes:
    """One ``stats`` line."""
    cell = CellStats(name=cell_name, state=state, exits=stats.total, per_cpu=stats.per_cpu)
    return msgspec.json.encode(StatsEvent(type="stats", id=container_id, data={"cell": cell})) + b"\n"


def state_line(container_id: str, state: str | None, previous: str | None) -> bytes:
    event = CellStateEvent(type="cell-state", id=container_id, data=CellStateData(state=state, previous=previous))
    return msgspec.json.encode(event) + b"\n"


def failed_line(container_id: str, state: str, failed_cpus: list[int]) -> bytes:
    event = FailedEvent(type="failed", id=container_id, data=FailedData(state=state, failed_cpus=failed_cpus))
    return msgspec.json.encode(event) + b"\n"


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


async def stream(backend: Backend, container_id: str, cell: CellRecord, *, interval: float, poll: float,
                 still_running: Callable[[], bool], write: Callable[[bytes], None] = _write) -> None:
    """Write events until the container stops (see the module docstring)."""

    async def stats_ticker() -> None:
        while True:
            await trio.sleep(interval)
            try:
                stats = backend.cell_statistics(cell)
            except BackendError:
                continue  # the watcher reports the cell going away
            write(stats_line(container_id, cell.cell_name, backend.cell_state(cell).detail, stats))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stats_ticker)
        previous = backend.cell_state(cell)
        write(state_line(container_id, previous.detail, None))
        while True:
            await trio.sleep(poll)  # the backend offers no change notification
            status = backend.cell_state(cell)
            if status != previous:
                write(state_line(container_id, status.detail, previous.detail))
                if status.state is CellState.FAILED:
                    write(failed_line(container_id, status.detail or status.state.value,
                                      sorted(backend.failed_cpus(cell))))
                previous = status
            if not still_running():
                break
        nursery.cancel_scope.cancel()
