"""The warm parent: ``python -m runphi.shim.warm SOCKET`` — forks shim servers with everything imported.

Started in the background by the first ``start`` that finds none (see
:mod:`runphi.shim.launch`), with that ``start``'s environment. It imports trio,
protobuf, the shim server and the configured backend once, then for each request
on ``SOCKET`` forks a child for it, on receiving
containerd's argv and the bundle of a ``start``: the child decides, starts the ZIC's
server if it is one, and answers ``runc``, ``address <A>`` or ``error <line>``
(:func:`runphi.shim.handover.ask_warm_parent`).
Guarantees:

* it never runs trio itself, so every child starts a fresh trio run;
* only a peer with its own uid is served; a malformed request is answered with
  nothing and changes nothing;
* one per socket: a second one finding a live parent exits at once;
* it exits (removing its socket) after :data:`IDLE_SECONDS` without a request or on
  SIGTERM, and reaps the servers it forked; a server outlives it unharmed.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

import msgspec

from runphi.shim.launch import StartRequest, listen_unless_served

IDLE_SECONDS = 600.0
MAX_REQUEST = 64 * 1024

def preload() -> None:
    """Import what a server needs on its way to answering Create: trio, protobuf, the shim,
    the core's supervisor and console, the configured backend and its cell watch."""
    import trio  # noqa: F401
    import google.protobuf  # type: ignore[import-untyped]  # noqa: F401

    import runphi.monitor_console  # noqa: F401
    import runphi.shim.server  # noqa: F401
    import runphi.shim.metrics  # noqa: F401
    from runphi.backends import registry
    from runphi.config import load_runtime_config
    from runphi.errors import RunphiError

    try:
        backend = load_runtime_config().backend
    except RunphiError:
        return  # a broken runphi.toml: each server reports it in its own words
    if backend and backend != "none":
        try:
            registry.preload(backend)
        except ImportError:
            return  # an unknown backend: the server says so at Create


def serve(listener: socket.socket, idle: float = IDLE_SECONDS) -> None:
    """Fork a server per request until idle for ``idle`` seconds."""
    listener.settimeout(idle)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return
        with conn:
            _answer(conn, listener)


def _answer(conn: socket.socket, listener: socket.socket) -> None:
    """Handle one request (module docstring); never raises for a bad one."""
    conn.settimeout(5.0)
    try:
        if not _same_user(conn):
            return
        data = b""
        while len(data) <= MAX_REQUEST and (chunk := conn.recv(MAX_REQUEST)):
            data += chunk
        _fork_starter(msgspec.json.decode(data, type=StartRequest), listener, conn)
    except (OSError, msgspec.ValidationError, msgspec.DecodeError):
        return


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def _fork_starter(request: StartRequest, listener: socket.socket, conn: socket.socket) -> None:
    """Fork a child that decides ``start`` for ``request`` and answers on ``conn`` (the warm
    parent goes back to its socket at once; the child's answer is the last thing it does)."""
    if os.fork() != 0:
        return
    try:
        listener.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the child waits for what it runs
        # The parent's SIGTERM handler raises SystemExit: in a server forked from here it would
        # unwind through whatever code a signal interrupts (a library's forked helper too).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        conn.sendall(_decide(request))
    finally:
        os._exit(0)


def _decide(request: StartRequest) -> bytes:
    """``<kind> <text>`` of :func:`runphi.shim.bootstrap.decide`, or nothing when it fails in a
    way only ``start`` itself can report (then ``start`` does it all again itself)."""
    from runphi.errors import RunphiError
    from runphi.shim.bootstrap import decide
    from runphi.shim.main import parse_flags

    try:
        os.chdir(request.cwd)
        kind, text = decide(parse_flags(request.argv), request.cwd)
    except RunphiError as error:
        kind, text = "error", error.message
    except (Exception, SystemExit):
        return b""
    return f"{kind} {text}".encode()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    """``python -m runphi.shim.warm SOCKET [IDLE_SECONDS]``."""
    if len(argv) not in (1, 2):
        sys.stderr.write("usage: python -m runphi.shim.warm SOCKET [IDLE_SECONDS]\n")
        return 2
    try:
        listener = listen_unless_served(argv[0], backlog=16)
    except OSError as exc:
        sys.stderr.write(f"runphi.shim.warm: cannot listen on {argv[0]}: {exc.strerror}\n")
        return 1
    if listener is None:
        return 0  # another warm parent serves this socket
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # servers are reaped as they end
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so that the socket goes with it
    try:
        preload()
        serve(listener, float(argv[1]) if len(argv) == 2 else IDLE_SECONDS)
    finally:
        try:
            os.unlink(argv[0])
        except OSError:
            pass
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
