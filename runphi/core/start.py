"""Start a created ZIC: start the cell, release the monitor, poststart hooks.

Only a ``created`` container starts (runc's wording for the others). The cell is
started before the monitor is told, so the monitor's "started" means the guest
runs. A failing poststart hook stops the container (SIGTERM to the monitor: a
graceful cell shutdown) and fails the start (runtime-spec 1.3, like runc).
"""

from __future__ import annotations

import os
import signal

from runphi.container import ContainerRecord, live_status, transition
from runphi.core.latency import timed
from runphi.core.node import START_FIFO_NAME, Node, container_config, state_json
from runphi.errors import IllegalTransition, StateError

_REFUSALS = {
    "stopped": "cannot start a container that has stopped",
    "running": "cannot start an already running container",
}


def start_zic(node: Node, container_id: str) -> ContainerRecord:
    """Start a created ZIC; refuse any other status with runc's wording. Returns the ``running`` record."""
    with timed(node.state_dir, "start"), node.store.locked(container_id):
        record = node.store.read(container_id)
        status = live_status(record)
        if status != "created":
            message = _REFUSALS.get(status, f"cannot start a container in the {status} state")
            raise IllegalTransition(f"{message} (container {record.id})", container_id=record.id)
        config = container_config(node, record)
        node.backend(record.id).start_cell(record.cell.cell_name)
        _release_monitor(node, record.id)
        record = transition(record, "running")
        node.store.write(record)
    poststart = config.hooks.poststart if config.hooks else []
    if poststart:
        from runphi.hooks import HookFailed, run_hooks

        try:
            run_hooks("poststart", poststart, state_json(record, "running"), record.id)
        except HookFailed:
            os.kill(record.monitor_pid, signal.SIGTERM)
            raise
    return record


def _release_monitor(node: Node, container_id: str) -> None:
    """Write the one byte the monitor waits for on the start fifo."""
    fifo = node.store.container_dir(container_id) / START_FIFO_NAME
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StateError(f"cannot release the monitor of container {container_id}: "
                         f"{fifo}: {exc.strerror}", container_id=container_id) from None
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
