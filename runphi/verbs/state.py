"""``runphi state ID``: the OCI state document of a ZIC, with its live status."""

from __future__ import annotations

from runphi.container import oci_state
from runphi.oci import encode_state
from runphi.verbs._common import print_bytes


def run(args, ctx) -> int:
    """Print the state JSON exactly as runc does (2-space indent, no trailing newline).

    The status comes from the monitor's liveness; for a ``created`` container
    the cell's sysfs state is read too (see :func:`runphi.container.live_status`).
    """
    record = ctx.store.read(args.container_id)
    cell_state = _cell_state(ctx, record) if record.status == "created" else None
    print_bytes(encode_state(oci_state(record, cell_state=cell_state)))
    return 0


def _cell_state(ctx, record) -> str | None:
    """The cell's state from the hypervisor's sysfs (two small reads), or None."""
    from pathlib import Path

    if record.cell.cell_id is None or ctx.config.backend != "jailhouse":
        return None
    cell_dir = Path(ctx.config.jailhouse.sysfs) / "cells" / str(record.cell.cell_id)
    try:
        if (cell_dir / "name").read_text().rstrip("\n") != record.cell.cell_name[:31]:
            return None
        return (cell_dir / "state").read_text().rstrip("\n")
    except OSError:
        return None
