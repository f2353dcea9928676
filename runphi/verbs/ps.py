"""``runphi ps [--format table|json] ID [ps-args]``: host processes of a ZIC.

A cell runs no Linux processes; its host-side process is the monitor, so that
is what ``ps`` reports (``[]`` once it is gone), in runc's formats.
"""

from __future__ import annotations

import subprocess
import sys

import msgspec

from runphi.container import monitor_alive
from runphi.errors import RunphiError


def run(args, ctx) -> int:
    """JSON: the pid array. Table: ``ps`` (default ``-ef``) filtered to those pids."""
    record = ctx.store.read(args.container_id)
    pids = [record.monitor_pid] if monitor_alive(record) else []
    if args.format == "json":
        sys.stdout.write(msgspec.json.encode(pids).decode() + "\n")
        return 0
    sys.stdout.write(_ps_table(args.ps_args or ["-ef"], set(pids), record.id))
    return 0


def _ps_table(ps_args: list[str], pids: set[int], container_id: str) -> str:
    try:
        result = subprocess.run(["ps", *ps_args], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise RunphiError("ps is not installed (needed for the table format; try --format json)",
                          container_id=container_id) from None
    if result.returncode != 0:
        raise RunphiError(f"ps {' '.join(ps_args)} failed: {result.stderr.strip()}",
                          container_id=container_id)
    lines = result.stdout.splitlines()
    if not lines:
        return ""
    header = lines[0].split()
    if "PID" not in header:
        raise RunphiError("couldn't find PID field in ps output", container_id=container_id)
    column = header.index("PID")
    kept = [line for line in lines[1:]
            if len(line.split()) > column and line.split()[column].isdigit()
            and int(line.split()[column]) in pids]
    return "\n".join([lines[0], *kept]) + "\n"
