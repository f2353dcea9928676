"""``runphi events [--interval D] [--stats] ID``: a ZIC's statistics as JSON lines.

Each line is runc's envelope ``{"type":"stats","id":ID,"data":{...}}``; ``data``
carries the cell's hypervisor exit counters under ``cell`` (a cell has no
cgroup, so runc's cgroup keys are absent). ``--stats`` prints one record; the
stream ends when the container stops.
"""

from __future__ import annotations

import re
import sys
import time

import msgspec

from runphi.container import live_status
from runphi.errors import RunphiError, UsageError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration such as ``5s``, ``1m30s``, ``250ms``; must be > 0."""
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text or total <= 0:
        raise UsageError(f"invalid --interval {text!r}: use a positive duration such as 5s or 250ms")
    return total


class CellStats(msgspec.Struct):
    """``data.cell``: the cell's state and hypervisor exit counters."""

    name: str
    state: str | None
    exits: dict[str, int]
    per_cpu: dict[int, dict[str, int]]


class Event(msgspec.Struct):
    """One line of the stream (runc's envelope)."""

    type: str
    id: str
    data: dict[str, CellStats]


def _sample(backend, container_id: str, cell_name: str) -> bytes:
    stats = backend.cell_statistics(cell_name)
    cell = CellStats(name=cell_name, state=backend.cell_state(cell_name),
                     exits=stats.total, per_cpu=stats.per_cpu)
    return msgspec.json.encode(Event(type="stats", id=container_id, data={"cell": cell})) + b"\n"


def run(args, ctx) -> int:
    """Print stats once (``--stats``) or every interval until the container stops."""
    interval = parse_duration(args.interval)
    record = ctx.store.read(args.container_id)
    if live_status(record) == "stopped":
        raise RunphiError(f"container with id {record.id} is not running", container_id=record.id)
    backend = ctx.backend(record.id)
    while True:
        sys.stdout.buffer.write(_sample(backend, record.id, record.cell.cell_name))
        sys.stdout.buffer.flush()
        if args.stats:
            return 0
        time.sleep(interval)  # the sampling period itself, not synchronisation
        if live_status(record) == "stopped":
            return 0
