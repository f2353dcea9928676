"""``runphi run [create flags] [-d] [--keep] ID``: create + start (+ wait + delete).

Plain containers go to runc whole. For a ZIC, runphi becomes a child
subreaper first, so the double-forked monitor is re-parented to it and its
exit status (the container's) can be reaped; in the foreground ``run`` exits
with that status and deletes the container unless ``--keep``. Meanwhile
SIGTERM/SIGINT/SIGHUP/SIGQUIT sent to ``run`` are forwarded to the container
(a graceful cell shutdown, exit 128+N), as runc forwards them to its init. A ZIC with
``process.terminal`` needs ``--console-socket`` (as with ``create``).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from runphi.errors import RunphiError
from runphi.forward import exec_runc
from runphi.verbs import create, delete, start

_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise RunphiError(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")


def _exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


#: Signals `run` passes on to the container (the monitor turns them into a graceful
#: cell shutdown), as runc forwards them to the container's init.
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _forward_signals_to(monitor_pid: int) -> dict:
    """From now on, a signal to `run` goes to the container; returns the previous handlers."""

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(monitor_pid, signum)
        except ProcessLookupError:
            pass

    return {sig: signal.signal(sig, forward) for sig in _FORWARDED}


def run(args, ctx) -> int:
    """Create and start; in the foreground wait for the container and return its status."""
    bundle = Path(args.bundle).absolute()
    if not create.decide_zic(bundle, args.container_id):
        exec_runc(ctx)
    if not args.detach:
        _become_subreaper()
    create.create_zic(args, ctx, bundle)
    record = ctx.store.read(args.container_id)
    previous = {} if args.detach else _forward_signals_to(record.monitor_pid)
    cleanup = argparse.Namespace(verb="delete", container_id=args.container_id, force=True)
    try:
        start.run(args, ctx)
    except BaseException:
        delete.run(cleanup, ctx)
        raise
    if args.detach:
        return 0
    # waitpid is retried after each forwarding handler runs (PEP 475): it returns on exit only.
    _, wait_status = os.waitpid(record.monitor_pid, 0)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if not args.keep:
        delete.run(cleanup, ctx)
    return _exit_status(wait_status)
