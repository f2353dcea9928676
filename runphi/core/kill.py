"""Deliver a signal to a ZIC as a cell shutdown.

The monitor turns SIGTERM, SIGINT, SIGHUP and SIGQUIT into a graceful cell
shutdown and exits 128+SIG. SIGKILL cannot be caught, so the core freezes the
monitor, destroys the cell itself, then kills the monitor (exit 137). Any other
signal would kill the monitor and orphan the cell, so it is refused.

Stopped containers: ``container not running`` — the shim's wording — except with
``all_``, which succeeds (containerd sends ``kill --all ID 9`` after an exit).
"""

from __future__ import annotations

import os
import signal

from runphi.container import GRACEFUL_STOP_SIGNALS, ContainerRecord, live_status
from runphi.core.node import DESTROY_TIMEOUT, Node
from runphi.errors import ContainerNotRunning, NotSupported, RunphiError


def kill_zic(node: Node, container_id: str, signum: int, all_: bool = False) -> None:
    """Deliver ``signum`` (see the module docstring for the rules)."""
    with node.store.locked(container_id):
        record = node.store.read(container_id)
        if live_status(record) == "stopped":
            if all_:
                return
            raise ContainerNotRunning(container_id)
        sig = stop_signal(record.id, signum)
        try:
            if sig == signal.SIGKILL:
                _kill_hard(node, record)
            else:
                os.kill(record.monitor_pid, sig)
        except ProcessLookupError:
            if not all_:
                raise ContainerNotRunning(container_id) from None


def stop_signal(container_id: str, signum: int) -> signal.Signals:
    """``signum`` if a ZIC can be stopped with it; NotSupported, with what to use instead, if not."""
    try:
        sig = signal.Signals(signum)
    except ValueError:
        raise NotSupported(f"signal {signum} is not a signal: cannot deliver it to partitioned container "
                           f"{container_id}", container_id=container_id) from None
    if sig not in GRACEFUL_STOP_SIGNALS and sig != signal.SIGKILL:
        raise NotSupported(
            f"signal {sig.name} is not supported for partitioned container {container_id}: "
            "use TERM, INT, HUP or QUIT for a graceful shutdown, or KILL",
            container_id=container_id)
    return sig


def _kill_hard(node: Node, record: ContainerRecord) -> None:
    """SIGKILL: freeze the monitor, destroy the cell, then kill the monitor (exit 137).

    Freezing first matters: a running monitor would see the cell vanish and
    exit by itself with another status before SIGKILL arrives.
    """
    os.kill(record.monitor_pid, signal.SIGSTOP)
    try:
        if record.cell.cell_name:
            node.backend(record.id).destroy_cell(record.cell.cell_name, DESTROY_TIMEOUT)
    except RunphiError as failure:
        node.log.warn(f"container {record.id} killed, but its cell could not be destroyed: "
                      f"{failure}; `runphi delete {record.id}` retries", id=record.id)
    finally:
        os.kill(record.monitor_pid, signal.SIGKILL)
