"""What /proc says about a process (lean: stdlib only)."""

from __future__ import annotations


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie ``pid``; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    state, start_time = fields[0], fields[19]
    if state in (b"Z", b"X"):
        return None
    return int(start_time)
