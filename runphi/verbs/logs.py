"""``runphi logs ID [-f]``: print the console log a ZIC's monitor keeps.

The log is the last N KiB the guest printed (see :mod:`runphi.console.ringlog`),
kept in the container's state directory until ``delete``, so it is there after
the container stopped too. ``-f`` keeps printing new output until the monitor
is gone. Bytes are printed unchanged (the guest's ``\\r\\n``, control bytes).
"""

from __future__ import annotations

import os
import sys

from runphi.console.ringlog import follow_console_log, read_console_log
from runphi.errors import ContainerNotFound


def run(args, ctx) -> int:
    """Print the console log of ``args.container_id``; with ``args.follow``, keep following."""
    if not ctx.store.holds(args.container_id):
        raise ContainerNotFound(args.container_id)
    state_dir = ctx.store.container_dir(args.container_id)
    out = sys.stdout.buffer
    try:
        if not args.follow:
            _write(out, read_console_log(state_dir))
            return 0
        for chunk in follow_console_log(state_dir):
            _write(out, chunk)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `runphi logs -f ID | head`: the reader left, which is not an error.
        _silence_stdout()
    return 0


def _write(out, data: bytes) -> None:
    if data:
        out.write(data)
        out.flush()


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
