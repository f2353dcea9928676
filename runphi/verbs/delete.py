"""``runphi delete [--force] ID`` for a ZIC (runc semantics, oci-runtime.md §5.4).

* stopped → destroy the cell, remove the record, run poststop hooks; exit 0;
* created → like runc (and what containerd needs): kill it first, then as stopped;
* running without ``--force`` → ``cannot delete container <id> that is not
  stopped: running``, nothing changes; with ``--force``: kill first.

Unknown ids never get here (the CLI forwards them to runc, which answers
``container does not exist``, exit 0 with ``--force``).
"""

from __future__ import annotations

from runphi.container import live_status
from runphi.errors import BundleError, IllegalTransition
from runphi.pausepoint import pause_point
from runphi.verbs._common import DESTROY_TIMEOUT, container_config, state_json, stop_monitor


def run(args, ctx) -> int:
    """Delete the container; the id is free again afterwards."""
    with ctx.store.locked(args.container_id):
        record = ctx.store.read(args.container_id)
        status = live_status(record)
        if status == "running" and not args.force:
            raise IllegalTransition(
                f"cannot delete container {record.id} that is not stopped: {status}",
                container_id=record.id)
        poststop = _poststop_hooks(ctx, record)
        stop_monitor(record)
        pause_point("delete:monitor-stopped")
        name = record.cell.cell_name or _cell_of_crashed_create(ctx, record)
        if name:
            # Idempotent: a cell already gone only has its resources released.
            ctx.backend(record.id).destroy_cell(name, DESTROY_TIMEOUT)
        pause_point("delete:released")
        ctx.store.remove(record.id)
    if poststop:
        from runphi.hooks import run_hooks_best_effort

        failures = run_hooks_best_effort("poststop", poststop, state_json(record, "stopped"), record.id)
        for failure in failures:
            ctx.log.warn(str(failure), id=record.id)
    return 0


def _cell_of_crashed_create(ctx, record) -> str:
    """The cell name a ``create`` that died before recording its cell was working on.

    Such a create may already hold a ledger entry, a cell and a monitor: they all
    carry the name the backend plans from the id, so destroying that name releases them.
    """
    if record.status != "creating":
        return ""
    return ctx.backend(record.id).planned_cell_name(record.id)


def _poststop_hooks(ctx, record):
    """The poststop hooks from create's config copy ([] when the copy is unreadable)."""
    try:
        config = container_config(ctx, record)
    except BundleError:
        return []
    return config.hooks.poststop if config.hooks else []
