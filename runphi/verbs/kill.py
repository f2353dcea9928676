"""``runphi kill [--all] ID [SIG]`` for a ZIC.

The monitor turns SIGTERM, SIGINT, SIGHUP and SIGQUIT into a graceful cell
shutdown and exits 128+SIG. SIGKILL cannot be caught, so ``kill`` freezes the
monitor, destroys the cell itself, then kills the monitor (exit 137). Any other signal would
kill the monitor and orphan the cell, so it is refused.

Stopped containers: ``container not running`` (exit 1) — the shim's wording —
except with ``--all``, which succeeds (containerd sends ``kill --all ID 9``
after an exit).
"""

from __future__ import annotations

import os
import signal

from runphi.container import GRACEFUL_STOP_SIGNALS, live_status
from runphi.errors import ContainerNotRunning, NotSupported, RunphiError
from runphi.verbs._common import DESTROY_TIMEOUT


def run(args, ctx) -> int:
    """Deliver the signal as a cell shutdown; see the module docstring for the rules."""
    with ctx.store.locked(args.container_id):
        record = ctx.store.read(args.container_id)
        if live_status(record) == "stopped":
            if args.all:
                return 0
            raise ContainerNotRunning(args.container_id)
        signum = signal.Signals(args.signal)
        if signum not in GRACEFUL_STOP_SIGNALS and signum != signal.SIGKILL:
            raise NotSupported(
                f"signal {signum.name} is not supported for partitioned container {record.id}: "
                "use TERM, INT, HUP or QUIT for a graceful shutdown, or KILL",
                container_id=record.id)
        try:
            if signum == signal.SIGKILL:
                _kill_hard(ctx, record)
            else:
                os.kill(record.monitor_pid, signum)
        except ProcessLookupError:
            if not args.all:
                raise ContainerNotRunning(args.container_id) from None
    return 0


def _kill_hard(ctx, record) -> None:
    """SIGKILL: freeze the monitor, destroy the cell, then kill the monitor (exit 137).

    Freezing first matters: a running monitor would see the cell vanish and
    exit by itself with another status before SIGKILL arrives.
    """
    os.kill(record.monitor_pid, signal.SIGSTOP)
    try:
        if record.cell.cell_name:
            ctx.backend(record.id).destroy_cell(record.cell.cell_name, DESTROY_TIMEOUT)
    except RunphiError as failure:
        ctx.log.warn(f"container {record.id} killed, but its cell could not be destroyed: "
                     f"{failure}; `runphi delete {record.id}` retries", id=record.id)
    finally:
        os.kill(record.monitor_pid, signal.SIGKILL)
