"""Starting a shim server for ``start``: through the warm parent when one runs, else forked here.

A server needs trio, protobuf and runphi's core imported: about half a second of
Python, on containerd's critical path (it waits for Create). :mod:`runphi.shim.warm`
keeps a process with all of that imported that forks servers on request; ``start``
hands it the listening socket and containerd's ``log`` fifo over a unix socket
(SCM_RIGHTS) and is done. Guarantees:

* :func:`launch_server` always leaves a server serving the listener: the warm
  parent's child, or (no warm parent yet, or it failed) a child forked right here,
  while a warm parent is started in the background for the next ``start``;
* one warm parent per runphi installation and environment (the socket name hashes
  the interpreter, runphi's version and location, and the environment containerd
  gave ``start``): a server never runs other code or other settings than ``start``
  would have given it; only the same user may ask it (peer credentials checked).

Lean (stdlib + msgspec): this runs inside ``start``.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgspec

from runphi.shim.handover import warm_socket

#: The warm parent's answer to one request: the server's pid.
REPLY_PREFIX = b"ok "
#: How long ``start`` waits for the warm parent to fork (seconds).
HAND_OVER_TIMEOUT = 5.0


class ShimBundle(msgspec.Struct, frozen=True):
    """``<bundle>/runphi-shim.json``: this bundle's task is served by runphi's server."""

    address: str

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True, tag="server"):
    """What a shim server needs from ``start`` (a request to the warm parent: fork one)."""

    namespace: str
    #: containerd's ttrpc socket (``TTRPC_ADDRESS``): where events are published.
    ttrpc_address: str
    #: The listening socket's path (removed on exit).
    socket_path: str
    debug: bool = False


class StartRequest(msgspec.Struct, frozen=True, tag="start"):
    """A request to the warm parent: decide ``start`` for containerd's ``argv`` in ``cwd``
    (the bundle) and, for a ZIC, start its server (see :func:`runphi.shim.handover.ask_warm_parent`)."""

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


def launch_server(settings: ServerSettings, listener: socket.socket, log_fifo: Path, socket_dir: str) -> None:
    """Have a server serve ``listener`` (see the module docstring)."""
    log_fd = open_log(log_fifo)
    try:
        path = warm_socket(socket_dir)
        if hand_over(path, settings, listener.fileno(), log_fd) is not None:
            return
        _start_warm_parent(path)
        fork_server(settings, listener.fileno(), log_fd)
    finally:
        if log_fd >= 0:
            os.close(log_fd)


def open_log(log_fifo: Path) -> int:
    """containerd's ``log`` fifo for the server's stderr (-1 when there is none)."""
    try:
        fd = os.open(log_fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
    os.set_blocking(fd, True)
    return fd


def hand_over(path: str, settings: ServerSettings, listener_fd: int, log_fd: int) -> int | None:
    """Ask the warm parent at ``path`` to fork the server: its pid, or None when there is
    no warm parent or it failed."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    client.settimeout(HAND_OVER_TIMEOUT)
    try:
        client.connect(path)
        fds = [listener_fd] + ([log_fd] if log_fd >= 0 else [])
        socket.send_fds(client, [msgspec.json.encode(settings)], fds)
        client.shutdown(socket.SHUT_WR)
        reply = client.recv(64)
    except OSError:
        return None
    finally:
        client.close()
    if not reply.startswith(REPLY_PREFIX):
        return None
    return int(reply[len(REPLY_PREFIX):])


def _start_warm_parent(path: str) -> None:
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
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log_fd if log_fd >= 0 else null, 2)
    os.closerange(3, listener_fd)
    os.closerange(listener_fd + 1, os.sysconf("SC_OPEN_MAX"))
    os.chdir("/")  # pin no bundle: a pod's server outlives its first container
    from runphi.shim.server import run_server

    run_server(settings, listener_fd)
