"""``runphi start ID`` for a ZIC: start the cell, release the monitor, poststart hooks.

Only a ``created`` container starts (runc's wording for the others). The cell is
started before the monitor is told, so the monitor's "started" means the guest
runs. A failing poststart hook stops the container (SIGTERM to the monitor: a
graceful cell shutdown) and fails ``start`` (runtime-spec 1.3, like runc).
"""

from __future__ import annotations

import os
import signal

from runphi.container import live_status, transition
from runphi.errors import IllegalTransition, StateError
from runphi.verbs._common import START_FIFO_NAME, container_config, state_json

_REFUSALS = {
    "stopped": "cannot start a container that has stopped",
    "running": "cannot start an already running container",
}


def run(args, ctx) -> int:
    """Start a created ZIC; refuse any other status with runc's wording."""
    with ctx.store.locked(args.container_id):
        record = ctx.store.read(args.container_id)
        status = live_status(record)
        if status != "created":
            message = _REFUSALS.get(status, f"cannot start a container in the {status} state")
            raise IllegalTransition(f"{message} (container {record.id})", container_id=record.id)
        config = container_config(ctx, record)
        ctx.backend(record.id).start_cell(record.cell.cell_name)
        _release_monitor(ctx, record.id)
        record = transition(record, "running")
        ctx.store.write(record)
    poststart = config.hooks.poststart if config.hooks else []
    if poststart:
        from runphi.hooks import HookFailed, run_hooks

        try:
            run_hooks("poststart", poststart, state_json(record, "running"), record.id)
        except HookFailed:
            os.kill(record.monitor_pid, signal.SIGTERM)
            raise
    return 0


def _release_monitor(ctx, container_id: str) -> None:
    """Write the one byte the monitor waits for on the start fifo."""
    fifo = ctx.store.container_dir(container_id) / START_FIFO_NAME
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StateError(f"cannot release the monitor of container {container_id}: "
                         f"{fifo}: {exc.strerror}", container_id=container_id) from None
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
