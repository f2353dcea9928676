"""Console pump counters, and the file through which ``runphi events`` sees them.

The monitor publishes the output pump's counters to ``console-stats.json`` in
the container's state directory whenever bytes were dropped (at most once a
second) and once more when the console is drained, so a separate ``events`` or
``state`` process can report drops without talking to the monitor. Lean
(msgspec + stdlib): verb processes import this.
"""

from __future__ import annotations

import os

import msgspec

STATS_FILE = "console-stats.json"


class PumpStats(msgspec.Struct):
    """Counters of one console output pump.

    Every byte read is, by the end, exactly one of: written, dropped (the sink
    stalled and the buffer was full), or lost (the sink was gone, or still
    unflushed when the finish deadline passed).
    """

    read_bytes: int = 0
    written_bytes: int = 0
    dropped_bytes: int = 0
    lost_bytes: int = 0
    #: Why the source stopped ("end of file", "read error: ..."); None while it is open.
    source_ended: str | None = None
    #: Why writing stopped ("write error: Broken pipe"); None while the sink takes bytes.
    sink_closed: str | None = None


class InputStats(msgspec.Struct):
    """Counters of the stdin -> UART pump."""

    bytes: int = 0
    ended: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PumpStats)


def write_console_stats(state_dir: str | os.PathLike[str], stats: PumpStats) -> None:
    """Replace the published counters atomically (temp file + rename)."""
    path = os.path.join(state_dir, STATS_FILE)
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "wb") as out:
        out.write(_encoder.encode(stats))
    os.replace(temp, path)


def read_console_stats(state_dir: str | os.PathLike[str]) -> PumpStats | None:
    """The last published counters, or None if none were published (or they are unreadable)."""
    try:
        with open(os.path.join(state_dir, STATS_FILE), "rb") as source:
            return _decoder.decode(source.read())
    except (FileNotFoundError, msgspec.DecodeError):
        return None
