"""Delete a ZIC (runc semantics, oci-runtime.md §5.4).

* stopped → destroy the cell, remove the record, run poststop hooks;
* created → like runc (and what containerd needs): kill it first, then as stopped;
* running without ``force`` → ``cannot delete container <id> that is not
  stopped: running``, nothing changes; with ``force``: kill first.
"""

from __future__ import annotations

from runphi.container import ContainerRecord, live_status
from runphi.core.latency import timed
from runphi.core.node import DESTROY_TIMEOUT, Node, container_config, state_json, stop_monitor
from runphi.errors import BundleError, IllegalTransition
from runphi.pausepoint import pause_point


def delete_zic(node: Node, container_id: str, force: bool = False, owned_here: bool = False) -> None:
    """Delete the container; the id is free again afterwards.

    ``owned_here``: the caller is the ZIC's long-lived process (the shim server), which
    has already seen its cell's end: its own process is not stopped.
    """
    with timed(node.state_dir, "delete"), node.store.locked(container_id):
        record = node.store.read(container_id)
        status = live_status(record)
        if status == "running" and not force:
            raise IllegalTransition(
                f"cannot delete container {record.id} that is not stopped: {status}",
                container_id=record.id)
        poststop = _poststop_hooks(node, record)
        if not owned_here:
            stop_monitor(record)
        pause_point("delete:monitor-stopped")
        name = record.cell.cell_name or _cell_of_crashed_create(node, record)
        if name:
            # Idempotent: a cell already gone only has its resources released.
            node.backend(record.id).destroy_cell(name, DESTROY_TIMEOUT)
        pause_point("delete:released")
        node.store.remove(record.id)
    if poststop:
        from runphi.hooks import run_hooks_best_effort

        failures = run_hooks_best_effort("poststop", poststop, state_json(record, "stopped"), record.id)
        for failure in failures:
            node.log.warn(str(failure), id=record.id)


def _cell_of_crashed_create(node: Node, record: ContainerRecord) -> str:
    """The cell name a ``create`` that died before recording its cell was working on.

    Such a create may already hold a ledger entry, a cell and a monitor: they all
    carry the name the backend plans from the id, so destroying that name releases them.
    """
    if record.status != "creating":
        return ""
    return node.backend(record.id).planned_cell_name(record.id)


def _poststop_hooks(node: Node, record: ContainerRecord) -> list:
    """The poststop hooks from create's config copy ([] when the copy is unreadable)."""
    try:
        config = container_config(node, record)
    except BundleError:
        return []
    return config.hooks.poststop if config.hooks else []
