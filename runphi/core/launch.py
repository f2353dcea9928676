"""Bring one ZIC to `created`: the backend's cell, then its console ends and its monitor.

The core half of ``create`` (DESIGN §2-3), the same for every backend:

1. ``Backend.launch`` makes the cell: resources, the cell created and loaded, its
   console source open (all or nothing on the backend's side);
2. for a terminal, a pty whose master goes to the caller's console socket;
3. the start fifo, opened for the monitor;
4. the monitor — the ZIC's long-lived process, whose exit status is the
   container's — forked with exactly those fds (and the cell's ``host_fds``); when
   the backend's cell has a host side that its owner brings up (KVM: the VM process),
   ``create`` waits until the monitor says it did, so that its failure fails the
   create. Or, when the front end is itself the ZIC's long-lived process (the shim
   server), an ``adopt`` callback that keeps what it needs instead (no pty, no fork:
   it serves the console itself and brings the cell up).

Every step registers its undo; a failure runs them in reverse order (monitor
killed, fds closed, the cell destroyed and its resources released through the
protocol) and re-raises the one error, so a failed launch leaves nothing behind.
Synchronous and without trio: it runs in the lean ``create`` verb.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from runphi.backends.base import CellRecord, LaunchedCell, LaunchRequest
from runphi.container import identify_process
from runphi.core.node import DESTROY_TIMEOUT
from runphi.errors import RunphiError
from runphi.undo import UndoStack

if TYPE_CHECKING:
    from runphi.backends.base import Backend

class Launched(msgspec.Struct, frozen=True, kw_only=True):
    """A ZIC at `created`: its cell and the monitor that now owns it."""

    cell: CellRecord
    monitor_pid: int
    monitor_start_time: int


class LaunchFailed(RunphiError):
    """A host-side step of the launch failed (a pty, the fifo, the fork)."""


#: Takes over a launched cell instead of a forked monitor: given the cell and the start
#: fifo's fd, it keeps its own duplicates of the fds it needs and returns the
#: (pid, start time) of the process that now owns the ZIC.
Adopt = Callable[[LaunchedCell, int], tuple[int, int]]


def launch_zic(backend: Backend, request: LaunchRequest, *, console_socket: str, start_fifo: str,
               monitor_log: tuple[str, str, str], warn: Callable[[str], None],
               adopt: Adopt | None = None) -> Launched:
    """Launch the cell and hand it to its owner (module docstring); undo everything on failure.

    ``console_socket`` ("" for none) receives the pty master of a terminal ZIC;
    ``monitor_log`` is (path, format, level) of the runtime log the monitor writes to;
    ``adopt`` replaces the monitor (then ``console_socket`` is unused).
    """
    launched = backend.launch(request)
    undo = UndoStack()
    name = launched.cell.cell_name
    undo.push(f"destroy cell {name}", lambda: backend.destroy_cell(name, DESTROY_TIMEOUT))
    if launched.console_fd >= 0:
        undo.push("close the console source", lambda: _close(launched.console_fd))
    for fd in launched.host_fds:
        undo.push("close a host-side fd of the cell", functools.partial(_close, fd))
    try:
        start_fd = os.open(start_fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        undo.push("close the start fifo", lambda: _close(start_fd))
        terminal = -1
        if adopt is not None:
            pid, start_time = adopt(launched, start_fd)
        else:
            terminal = _open_terminal(request, console_socket, undo)
            pid, start_time = _spawn_monitor(request, launched, start_fd, terminal, monitor_log, undo)
    except BaseException as exc:
        for problem in undo.unwind():
            warn(f"while undoing the create of {request.container_id}: {problem}")
        if isinstance(exc, OSError):
            raise LaunchFailed(str(exc)) from None
        raise
    # Success: this process's copies of the fds go; the monitor holds its own.
    undo.discard()
    for fd in (launched.console_fd, terminal, start_fd, *launched.host_fds):
        if fd >= 0:
            _close(fd)
    return Launched(cell=launched.cell, monitor_pid=pid, monitor_start_time=start_time)


def _open_terminal(request: LaunchRequest, console_socket: str, undo: UndoStack) -> int:
    """The pty slave the monitor serves as the ZIC's terminal (-1 without a console socket).

    The master goes to ``console_socket`` at once, as runc does; this process keeps none of it.
    """
    if not console_socket:
        return -1
    from runphi.console.terminal import open_console_pty, send_console_master

    process = request.config.process
    size = process.console_size if process else None
    pty = open_console_pty(height=size.height if size else None, width=size.width if size else None)
    undo.push("close the console pty", pty.close)
    send_console_master(console_socket, pty.master, container_id=request.container_id)
    os.close(pty.master)
    pty.master = -1
    return pty.slave


def _spawn_monitor(request: LaunchRequest, launched: LaunchedCell, start_fd: int, terminal: int,
                   monitor_log: tuple[str, str, str], undo: UndoStack) -> tuple[int, int]:
    """Fork the monitor with the console source, the terminal and the start fifo; (pid, start time)."""
    from runphi.monitor import MonitorSetup, spawn_monitor

    setup = MonitorSetup(
        container_id=request.container_id, container_dir=request.container_dir,
        cell_name=launched.cell.cell_name, watch=launched.watch, start_fd=start_fd,
        console_fd=launched.console_fd, console_kind=launched.console_kind, terminal_fd=terminal,
        host_fds=launched.host_fds, log_path=monitor_log[0], log_format=monitor_log[1], log_level=monitor_log[2])
    keep = [fd for fd in (start_fd, launched.console_fd, terminal, *launched.host_fds) if fd >= 0]
    if terminal >= 0:
        # Terminal mode: never keep create's fds 0/1/2 (the shim's buffer pipe).
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            monitor = spawn_monitor(setup, (null, null, null), keep)
        finally:
            os.close(null)
    else:
        monitor = spawn_monitor(setup, (0, 1, 2), keep)
    undo.push("kill the monitor", lambda: _kill(monitor.pid))
    try:
        identity = identify_process(monitor.pid)
    except ProcessLookupError:
        raise LaunchFailed("its monitor exited at once") from None
    monitor.wait_until_ready()
    return identity


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
