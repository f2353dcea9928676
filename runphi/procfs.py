"""What /proc says about a process (lean: stdlib only)."""

from __future__ import annotations


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2:].split()


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (R, S, T stopped, Z zombie...); None if gone."""
    fields = _stat_fields(pid)
    return None if fields is None else fields[0].decode()


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie ``pid``; None if gone."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def thread_cpu_ticks(pid: int, tid: int) -> int | None:
    """CPU time (user + system, clock ticks) thread ``tid`` of ``pid`` has used; None if gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])
