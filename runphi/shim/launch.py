"""Making a ZIC's shim server, and the warm parent that makes them fast.

A server needs trio, protobuf and runphi's core imported: about half a second of
Python, on containerd's critical path (it waits for Create). :mod:`runphi.shim.warm`
keeps a process with all of that imported; ``start`` sends it its argv and cwd
(:func:`runphi.shim.handover.ask_warm_parent`) and a child of it decides and forks
the server. Guarantees:

* a server (:func:`fork_server`) has its own process group, stdio off ``start``'s
  pipe, stderr on containerd's ``log`` fifo and no other fd than its listener;
* one warm parent per runphi installation and environment (see
  :func:`runphi.shim.handover.warm_socket`): a server never runs other code or other
  settings than ``start`` would have given it; only the same user may ask it;
* without a warm parent, ``start`` does the same itself and starts one
  (:func:`start_warm_parent`) for the next ``start``.

Lean (stdlib + msgspec): this runs inside ``start``.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import msgspec



class ShimBundle(msgspec.Struct, frozen=True):
    """``<bundle>/runphi-shim.json``: this bundle's task is served by runphi's server."""

    address: str

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What a shim server needs from ``start``."""

    namespace: str
    #: containerd's ttrpc socket (``TTRPC_ADDRESS``): where events are published.
    ttrpc_address: str
    #: The listening socket's path (removed on exit).
    socket_path: str
    debug: bool = False


class StartRequest(msgspec.Struct, frozen=True, tag="start"):
    """A request to the warm parent: decide ``start`` for containerd's ``argv`` in ``cwd``
    (the bundle) and, for a ZIC, start its server. Written as ``{"type": "start", ...}`` by
    :func:`runphi.shim.handover.ask_warm_parent`, which does not import msgspec."""

    argv: list[str]
    cwd: str


def listen_unless_served(path: str, backlog: int) -> socket.socket | None:
    """A listening unix socket at ``path`` (mode 0600, directory made 0700), or None when a
    live process already listens there; a socket file nobody serves (its owner died) is
    replaced. Other failures raise OSError."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE or answers(path):
            if exc.errno == errno.EADDRINUSE:
                return None
            raise
        os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket ``path`` (100 ms at most)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.1)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def open_log(log_fifo: Path) -> int:
    """containerd's ``log`` fifo for the server's stderr (-1 when there is none)."""
    try:
        fd = os.open(log_fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
    os.set_blocking(fd, True)
    return fd


def start_warm_parent(path: str) -> None:
    """Start a warm parent for ``path`` in its own session, not waited for (it outlives ``start``)."""
    try:
        subprocess.Popen([sys.executable, "-m", "runphi.shim.warm", path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         cwd="/")
    except OSError:
        pass  # only the next start's speed depends on it


def fork_server(settings: ServerSettings, listener_fd: int, log_fd: int) -> int:
    """Fork a server process serving ``listener_fd``; its pid. The child never returns."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        become_server(settings, listener_fd, log_fd)
        code = 0
    finally:
        os._exit(code)


def become_server(settings: ServerSettings, listener_fd: int, log_fd: int) -> None:
    """In a fresh child: own process group, stdio off ``start``'s pipe (containerd waits for
    it to close), stderr on containerd's log fifo, no other fd than the listener (a
    connection the forking process still answers on must close when it does), then
    serve until shut down."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever handler the forking process had
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log_fd if log_fd >= 0 else null, 2)
    os.closerange(3, listener_fd)
    os.closerange(listener_fd + 1, os.sysconf("SC_OPEN_MAX"))
    os.chdir("/")  # pin no bundle: a pod's server outlives its first container
    from runphi.shim.server import run_server

    run_server(settings, listener_fd)
