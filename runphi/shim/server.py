"""The shim server: one trio process serving containerd's Task API for its ZICs (DESIGN §13).

Forked by ``start`` with the listening socket already bound (containerd dials it as
soon as ``start`` prints the address). Guarantees:

* every call on every connection is served concurrently (a Wait blocks for the
  task's lifetime while State, Kill, Stats arrive);
* events go out in order through one :class:`~runphi.shim.events.Publisher`, which
  reconnects when containerd restarts;
* the server exits once containerd sent Shutdown and it owns no task: it flushes
  its events (bounded) and removes its socket.
"""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec
import trio

from runphi.shim.service import TaskService
from runphi.shim.ttrpc import serve

#: How long the events still queued at exit may take to reach containerd (seconds).
FLUSH_TIMEOUT = 3.0


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What the forked server needs from ``start``."""

    namespace: str
    #: containerd's ttrpc socket (``TTRPC_ADDRESS``): where events are published.
    ttrpc_address: str
    #: The listening socket's path (removed on exit).
    socket_path: str
    debug: bool = False


def run_server(settings: ServerSettings, listener_fd: int) -> None:
    """Serve on the inherited listening socket until shut down (see the module docstring)."""
    trio.run(_serve, settings, listener_fd)


async def _serve(settings: ServerSettings, listener_fd: int) -> None:
    from runphi.shim.events import Publisher
    from runphi.shim.node import shim_node

    node = shim_node(settings.namespace, debug=settings.debug)
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=listener_fd))
    listener = trio.SocketListener(sock)
    publisher = Publisher(settings.ttrpc_address, settings.namespace, lambda line: node.log.warn(line))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            service = TaskService(node, publisher, nursery)
            await nursery.start(serve, listener, service.methods())
            await service.shutdown.wait()
            await publisher.flush(FLUSH_TIMEOUT)
            nursery.cancel_scope.cancel()
    finally:
        _remove_socket(settings.socket_path)


def _remove_socket(path: str) -> None:
    try:
        Path(path).unlink()
    except OSError:
        pass
