"""``runphi state ID``: the OCI state document of a ZIC, with its live status."""

from __future__ import annotations

from runphi.backends.base import CellState
from runphi.container import oci_state
from runphi.errors import RunphiError
from runphi.oci import encode_state
from runphi.verbs._common import print_bytes


def run(args, ctx) -> int:
    """Print the state JSON exactly as runc does (2-space indent, no trailing newline).

    The status comes from the monitor's liveness; for a ``created`` container
    the cell's state is asked of its backend too (see :func:`runphi.container.live_status`).
    """
    record = ctx.store.read(args.container_id)
    cell_state = _cell_state(ctx, record) if record.status == "created" else None
    print_bytes(encode_state(oci_state(record, cell_state=cell_state)))
    return 0


def _cell_state(ctx, record) -> CellState | None:
    """The cell's state as its backend reports it, or None when it cannot be asked."""
    if not record.cell.cell_name:
        return None
    try:
        return ctx.backend(record.id).cell_state(record.cell).state
    except RunphiError:
        return None  # no backend any more, or the hypervisor is gone: the monitor decides
