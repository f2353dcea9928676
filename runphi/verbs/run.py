"""``runphi run [create flags] [-d] [--keep] ID``: create + start (+ wait + delete).

Plain containers go to runc whole. For a ZIC, runphi becomes a child
subreaper first, so the double-forked monitor is re-parented to it and its
exit status (the container's) can be reaped; in the foreground ``run`` exits
with that status and deletes the container unless ``--keep``. Meanwhile
SIGTERM/SIGINT/SIGHUP/SIGQUIT sent to ``run`` are forwarded to the container
(a graceful cell shutdown, exit 128+N), as runc forwards them to its init.

A ZIC with ``process.terminal`` run in the foreground without
``--console-socket`` gets runphi's own terminal, as with runc: the pty master
comes back over a private console socket and ``run`` relays it to its stdio
(``runphi.console.foreground``). Detached, such a ZIC needs ``--console-socket``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from runphi.core.create import load_zic_config
from runphi.core.delete import delete_zic
from runphi.core.start import start_zic
from runphi.errors import RunphiError
from runphi.forward import exec_runc
from runphi.oci import Config
from runphi.verbs import create

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
    loaded = load_zic_config(ctx.node, bundle, args.container_id)
    if args.detach:
        create.create_loaded(args, ctx, bundle, loaded)
        with _deleted_on_failure(args, ctx):
            start_zic(ctx.node, args.container_id)
        return 0
    _become_subreaper()
    master = None
    if _needs_own_terminal(args, loaded[1]):
        master = _create_with_own_terminal(args, ctx, bundle, loaded)
    else:
        create.create_loaded(args, ctx, bundle, loaded)
    try:
        with _deleted_on_failure(args, ctx):
            record = ctx.store.read(args.container_id)
            previous = _forward_signals_to(record.monitor_pid)
            start_zic(ctx.node, args.container_id)
            if master is not None:
                from runphi.console.foreground import relay_terminal

                relay_terminal(master)
    finally:
        if master is not None:
            os.close(master)
    # waitpid is retried after each forwarding handler runs (PEP 475): it returns on exit only.
    _, wait_status = os.waitpid(record.monitor_pid, 0)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if not args.keep:
        delete_zic(ctx.node, args.container_id, force=True)
    return _exit_status(wait_status)


def _needs_own_terminal(args, config: Config) -> bool:
    """Whether ``run`` must be the terminal itself: ``process.terminal`` and no console socket."""
    return not args.console_socket and bool(config.process and config.process.terminal)


def _create_with_own_terminal(args, ctx, bundle: Path, loaded: tuple[bytes, Config]) -> int:
    """``create`` against a private console socket; returns the pty master it sent."""
    from runphi.console.foreground import PrivateConsoleSocket

    console = PrivateConsoleSocket()
    try:
        args.console_socket = console.path
        create.create_loaded(args, ctx, bundle, loaded)
        with _deleted_on_failure(args, ctx):
            return console.receive_master(args.container_id)
    finally:
        console.close()


@contextlib.contextmanager
def _deleted_on_failure(args, ctx) -> Iterator[None]:
    """If the body fails, the container just created is deleted (forcibly) before the error goes on."""
    try:
        yield
    except BaseException:
        delete_zic(ctx.node, args.container_id, force=True)
        raise


