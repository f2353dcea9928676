"""``runphi events [--interval D] [--stats] ID``: a ZIC's statistics as JSON lines.

Each line is runc's envelope ``{"type", "id", "data"}``: ``stats`` carries the
cell's hypervisor exit counters under ``data.cell`` (a cell has no cgroup, so
runc's cgroup keys are absent); runphi adds ``cell-state`` on every change of
the cell's state and ``failed`` when it crashes. ``--stats`` prints one
``stats`` record; the stream ends when the container stops.
"""

from __future__ import annotations

import re
import sys

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


def run(args, ctx) -> int:
    """Print stats once (``--stats``), or stream stats, cell-state changes and failures
    until the container stops (a trio program: see :mod:`runphi.cell_events`)."""
    interval = parse_duration(args.interval)
    record = ctx.store.read(args.container_id)
    if live_status(record) == "stopped":
        raise RunphiError(f"container with id {record.id} is not running", container_id=record.id)
    cell = record.cell
    if args.stats:
        from runphi.cell_events import stats_line
        from runphi.core.state import zic_stats

        status, stats = zic_stats(ctx.node, record)
        _write(stats_line(record.id, cell.cell_name, status.detail, stats))
        return 0
    backend = ctx.backend(record.id)
    import trio

    from runphi.cell_events import stream

    trio.run(lambda: stream(backend, record.id, cell, interval=interval, poll=backend.poll_interval,
                            still_running=lambda: live_status(record) != "stopped"))
    return 0


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
