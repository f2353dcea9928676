"""Small pieces shared by the verbs (front-end side only; the ZIC operations are in runphi.core)."""

from __future__ import annotations


def print_bytes(data: bytes) -> None:
    """Write ``data`` to stdout as is (no newline added), flushed."""
    import sys

    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
