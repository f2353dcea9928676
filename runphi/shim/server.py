"""The shim server: one trio process serving containerd's Task API for its ZICs (DESIGN §13).

Forked by ``start`` with the listening socket already bound (containerd dials it as
soon as ``start`` prints the address). Guarantees:

* every call on every connection is served concurrently (a Wait blocks for the
  task's lifetime while State, Kill, Stats arrive);
* events go out in order through one :class:`~runphi.shim.events.Publisher`, which
  reconnects when containerd restarts;
* the server exits once containerd sent Shutdown and it owns no task: it lets
  containerd read the answer and hang up (bounded by :data:`HANG_UP_GRACE`), flushes
  its events (bounded by :data:`FLUSH_TIMEOUT`) and removes its socket.
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio

from runphi.shim.launch import ServerSettings
from runphi.shim.service import TaskService
from runphi.shim.ttrpc import Services, serve_connection

#: How long the events still queued at exit may take to reach containerd (seconds).
FLUSH_TIMEOUT = 3.0
#: How long containerd gets to read Shutdown's answer and close its connection (seconds).
HANG_UP_GRACE = 1.0


class Connections:
    """The ttrpc connections being served, so that shutting down can wait for the peer to hang up."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._open = 0
        self._all_closed = trio.Event()
        self._all_closed.set()

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (see :func:`runphi.shim.ttrpc.serve_connection`)."""
        self._open += 1
        if self._open == 1:
            self._all_closed = trio.Event()
        try:
            await serve_connection(stream, self._services)
        finally:
            self._open -= 1
            if self._open == 0:
                self._all_closed.set()

    async def all_closed(self) -> None:
        """Return once no connection is open."""
        await self._all_closed.wait()


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
            connections = Connections(service.methods())
            await nursery.start(trio.serve_listeners, connections.serve, [listener])
            await service.shutdown.wait()
            with trio.move_on_after(HANG_UP_GRACE):
                await connections.all_closed()
            await publisher.flush(FLUSH_TIMEOUT)
            nursery.cancel_scope.cancel()
    finally:
        _remove_socket(settings.socket_path)


def _remove_socket(path: str) -> None:
    try:
        Path(path).unlink()
    except OSError:
        pass
