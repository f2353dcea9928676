"""What a ZIC is doing now: its OCI state, and its cell's statistics."""

from __future__ import annotations

from runphi.backends.base import CellState, CellStatistics, CellStatus
from runphi.container import ContainerRecord, live_status, oci_state
from runphi.core.node import Node
from runphi.errors import RunphiError
from runphi.oci import State


def zic_state(node: Node, container_id: str) -> State:
    """The OCI state of the ZIC with its live status.

    The status comes from the monitor's liveness; for a ``created`` container the
    cell's state is asked of its backend too (see :func:`runphi.container.live_status`).
    """
    record = node.store.read(container_id)
    cell_state = _cell_state(node, record) if record.status == "created" else None
    return oci_state(record, cell_state=cell_state)


def zic_stats(node: Node, record: ContainerRecord) -> tuple[CellStatus, CellStatistics]:
    """The cell's status and exit counters (raises a BackendError when the cell is gone)."""
    backend = node.backend(record.id)
    return backend.cell_state(record.cell), backend.cell_statistics(record.cell)


def _cell_state(node: Node, record: ContainerRecord) -> CellState | None:
    """The cell's state as its backend reports it, or None when it cannot be asked."""
    if not record.cell.cell_name:
        return None
    try:
        return node.backend(record.id).cell_state(record.cell).state
    except RunphiError:
        return None  # no backend any more, or the hypervisor is gone: the monitor decides
