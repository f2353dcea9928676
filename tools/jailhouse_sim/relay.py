"""The daemon's side of the compiled ``bin/jailhouse`` (``jailhouse_client.c``).

The C client sends its arguments, the path it was run as, its working directory and its
PATH. The daemon runs :class:`jailhouse_client.Tool` on them — the one implementation of
the tool's grammar and output — in a worker thread, with a :class:`RelayIO` standing in
for the caller's process:

* stdout/stderr text goes back to the client as frames, in the order it was written;
* files named on the command line are opened by the daemon (same user as its callers)
  relative to the caller's cwd when they are regular files; any other name (the caller's
  own file descriptors: ``/dev/stdin``, ``/dev/fd/N``, ``/proc/self/...``; FIFOs, devices)
  hands the whole call over to the Python client in the caller's process, before anything
  happened;
* management calls go to the daemon's dispatcher directly (no socket, no self-connection);
* ``cell linux`` and the other helpers become an exec the client performs itself;
* ``console -f`` streams until the client hangs up (it is killed) or the daemon stops; a
  client that went away is noticed when a frame cannot be sent to it, and a follower sends
  two on every poll of the console (every 100 ms), idle or not.

Wire format (all lengths u32 big-endian):

* request: ``MAGIC``, length, then NUL-terminated strings: execfn, cwd, PATH, argv[1:];
* reply: frames of a kind byte, length, payload — ``o`` stdout bytes, ``e`` stderr bytes,
  ``c`` a daemon call starts (payload: what the Python client would print if the daemon
  vanished during it), ``r`` it returned (a vanishing daemon now fails the next
  connection), ``x`` exit status (u32), ``X`` exec (PATH, file, argv..., NUL-terminated),
  ``F`` run the Python client instead.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from . import jailhouse_client as client

MAGIC = b"\0JHC1"
_HEAD = struct.Struct(">5sI")
_FRAME = struct.Struct(">cI")
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: Names only the caller's own process can open: they resolve through its file descriptors.
CALLER_ONLY = ("/dev/stdin", "/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/self/", "/proc/thread-self/")


@dataclass(frozen=True)
class ToolRequest:
    """One run of the compiled client: the path it was run as, its cwd and PATH, argv[1:]."""

    execfn: str
    cwd: str
    path: str
    args: tuple[str, ...]


class Hangup(Exception):
    """The client went away (killed, or its socket closed)."""


class HandedOver(Exception):
    """The client carries on by itself (an exec, or the Python client); nothing more to send."""


def parse_request(payload: bytes) -> ToolRequest:
    """Decode a request body; ValueError if it is not execfn, cwd, PATH and argv as C strings."""
    fields = payload.split(b"\0")
    if len(fields) < 4 or fields[-1] != b"":
        raise ValueError("malformed jailhouse client request")
    execfn, cwd, path, *args = (os.fsdecode(field) for field in fields[:-1])
    if not os.path.isabs(cwd):
        raise ValueError(f"client cwd is not absolute: {cwd!r}")
    return ToolRequest(execfn, cwd, path, tuple(args))


async def read_request(stream: trio.SocketStream, head: bytes) -> ToolRequest:
    """Read the rest of a request whose first bytes (starting with MAGIC) are ``head``."""
    data = bytearray(head)
    while len(data) < _HEAD.size or len(data) < _HEAD.size + _HEAD.unpack_from(data)[1]:
        if len(data) >= _HEAD.size and _HEAD.unpack_from(data)[1] > MAX_REQUEST_BYTES:
            raise ValueError("jailhouse client request too large")
        chunk = await stream.receive_some()
        if not chunk:
            raise ValueError("jailhouse client request truncated")
        data += chunk
    magic, length = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a jailhouse client request")
    return parse_request(bytes(data[_HEAD.size:_HEAD.size + length]))


def _regular_or_missing(path: str) -> bool:
    """True for a regular file, and for a name whose stat fails (opening it reports why)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


class RelayIO:
    """The caller's process as :class:`jailhouse_client.Tool` sees it, for one request.

    Runs in a worker thread. ``send`` delivers frames to the client (raising Hangup when
    it is gone), ``dispatch`` answers one JSON daemon request, ``nap`` sleeps.
    """

    def __init__(self, request: ToolRequest, send: Callable[[bytes], None], dispatch: Callable[[bytes], bytes],
                 nap: Callable[[float], object]) -> None:
        self.prog = request.execfn
        self.environ_path = request.path
        self.cwd = request.cwd
        self._send, self._dispatch, self._nap = send, dispatch, nap
        self._frames: list[bytes] = []
        self.sent = False

    def flush(self) -> None:
        """Send every queued frame, in order."""
        if self._frames:
            data = b"".join(self._frames)
            self._frames.clear()
            self.sent = True
            self._send(data)

    def out(self, text: str) -> None:
        self._frames.append(frame(b"o", text.encode("utf-8", "surrogateescape")))

    def out_bytes(self, data: bytes) -> None:
        self._frames.append(frame(b"o", data))
        self.flush()

    def err(self, text: str) -> None:
        # As Python's stderr: UTF-8 with backslashreplace (an undecodable file name shows as \udcXX).
        self._frames.append(frame(b"e", text.encode("utf-8", "backslashreplace")))

    def abspath(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.cwd, path))

    def open(self, name: str):
        """Open a file named by the caller, as the caller would (relative to its cwd). Only
        regular files are read here; the caller reads anything else (its own descriptors, a
        FIFO that may never deliver, a device), so no read blocks the daemon for a caller."""
        path = os.path.join(self.cwd, name) if name else name
        if os.path.normpath(path).startswith(CALLER_ONLY) or not _regular_or_missing(path):
            self.hand_over()
        return open(path, "rb")

    def call(self, request: dict) -> dict:
        """One daemon request, answered in-process; the client learns what to say if we vanish."""
        lost = "%s: %s\n" % (request.get("ioctl", "read(console)"), os.strerror(errno.ENODEV))
        self._frames.append(frame(b"c", lost.encode()))
        self.flush()
        reply = self._dispatch(json.dumps(request).encode())
        self._frames.append(frame(b"r", b""))
        return json.loads(reply)

    def sleep(self, seconds: float) -> None:
        self.flush()
        self._nap(seconds)

    def exec(self, file: str, args: list[str], path: str) -> None:
        """Have the client exec helper ``file`` with ``args``, PATH set to ``path``."""
        fields = [os.fsencode(value) for value in (path, file, *args)]
        self._frames.append(frame(b"X", b"".join(field + b"\0" for field in fields)))
        self.flush()
        raise HandedOver()

    def hand_over(self) -> None:
        """Have the client run the Python client in its own process (only before anything was sent)."""
        assert not self.sent and not self._frames, "handing over after output"
        self._frames.append(frame(b"F", b""))
        self.flush()
        raise HandedOver()

    def finish(self, code: int) -> None:
        self._frames.append(frame(b"x", struct.pack(">I", code & 0xFFFFFFFF)))
        self.flush()


def run_tool(io: RelayIO, root: str, rcpus: int, request: ToolRequest) -> None:
    """Run one ``jailhouse`` command for the client behind ``io`` (in a worker thread), ending
    with its exit status, an exec, or a hand-over; a client that hung up ends it silently."""
    try:
        code = client.Tool(io, root, rcpus).main([request.execfn, *request.args])
    except client.Exit as e:
        code = e.code
    except (HandedOver, Hangup):
        return
    except Exception:  # noqa: BLE001 - a bug: a traceback on stderr and status 1, as the script would
        io.err(traceback.format_exc())
        code = 1
    try:
        io.finish(0 if code is None else code)
    except Hangup:
        pass


def _sender(stream: trio.SocketStream) -> Callable[[bytes], None]:
    def send(data: bytes) -> None:
        try:
            trio.from_thread.run(stream.send_all, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise Hangup() from e

    return send


async def serve_tool(stream: trio.SocketStream, head: bytes, answer: Callable[[bytes], Awaitable[bytes]],
                     root: str, rcpus: int, threads: trio.CapacityLimiter) -> None:
    """Serve one compiled-client connection whose first bytes are ``head``, until the command
    ends (or the client hangs up); ``answer`` handles a JSON daemon request. The command runs
    in a worker thread from ``threads`` (a ``console -f`` holds one while it follows)."""
    request = await read_request(stream, head)
    io = RelayIO(request, _sender(stream), lambda data: trio.from_thread.run(answer, data),
                 lambda seconds: trio.from_thread.run(trio.sleep, seconds))
    await trio.to_thread.run_sync(run_tool, io, root, rcpus, request, limiter=threads)
