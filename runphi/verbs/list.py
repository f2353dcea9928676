"""``runphi list [--format table|json] [-q]``: runc's containers and runphi's, merged.

runc's part comes from ``runc list --format json`` under the same root and
global flags; runphi's from its records, with live status and ``owner`` = the
owner of the container's state directory (like runc). Output formats are
runc's: a tabwriter table, one-line JSON (``null`` when empty), or ids only.
"""

from __future__ import annotations

import os
import sys

import msgspec

from runphi.container import oci_state
from runphi.forward import runc_states
from runphi.oci import State, encode_state_list


def _owner(path) -> str:
    import pwd

    try:
        uid = os.stat(path).st_uid
    except FileNotFoundError:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def runphi_states(ctx) -> list[State]:
    """OCI states of runphi's own containers, owner filled."""
    return [oci_state(record, owner=_owner(ctx.store.container_dir(record.id)))
            for record in ctx.store.records()]


def format_table(states: list[State]) -> str:
    """runc's table: Go tabwriter with min width 12 and padding 3; last column unpadded."""
    rows = [["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]]
    rows += [[s.id, str(s.pid), s.status, s.bundle, s.created, s.owner] for s in states]
    widths = [max(12, max(len(row[col]) for row in rows) + 3) for col in range(5)]
    lines = ["".join(cell.ljust(width) for cell, width in zip(row, widths)) + row[5] for row in rows]
    return "\n".join(lines) + "\n"


def run(args, ctx) -> int:
    """Print the merged list in the requested format."""
    ours = runphi_states(ctx)
    states = runc_states(ctx, {s.id for s in ours}) + ours
    if args.quiet:
        sys.stdout.write("".join(f"{s.id}\n" for s in states))
    elif args.format == "json":
        sys.stdout.write(encode_state_list(states).decode() + "\n")
    else:
        sys.stdout.write(format_table(states))
    return 0
