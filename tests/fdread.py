"""Reading a pipe or a pty master from a test: against a deadline, never blocking past it.

The end of the stream is EOF on a pipe and EIO on a pty master whose slave
ends are all closed; both count as "closed" here.
"""

from __future__ import annotations

import os
import select
import time

DEFAULT_TIMEOUT = 15.0


def read_until(fd: int, marker: bytes, seen: bytearray | None = None, *, start: int = 0,
               timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Read ``fd`` into ``seen`` until ``marker`` shows up at or after offset ``start``.

    Returns all ``seen`` holds then; without a ``seen``, what this call read.
    AssertionError if the deadline passes or the stream closes first.
    """
    seen = bytearray() if seen is None else seen
    deadline = time.monotonic() + timeout
    while marker not in seen[start:]:
        chunk = _next_chunk(fd, deadline, f"{marker!r} not seen", seen[start:])
        if not chunk:
            raise AssertionError(f"closed before {marker!r}; got {bytes(seen[start:])!r}")
        seen += chunk
    return bytes(seen)


def read_to_eof(fd: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Everything ``fd`` delivers until it closes; AssertionError if it is still open at the deadline."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while chunk := _next_chunk(fd, deadline, f"no EOF within {timeout} s", data):
        data += chunk
    return bytes(data)


def _next_chunk(fd: int, deadline: float, late: str, got: bytes | bytearray) -> bytes:
    """The next bytes of ``fd`` (b"" once it is closed), waiting until ``deadline`` at most."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{late}; got {bytes(got)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                return os.read(fd, 65536)
            except OSError:  # EIO: a pty master with no slave left
                return b""
