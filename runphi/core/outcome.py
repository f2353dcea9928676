"""How a ZIC ended: the DESIGN §4 exit status, decided from the cell, and its record.

Shared by the ZIC's long-lived owners (the monitor process of the runc-CLI mode and
the shim server): :func:`decide_exit` maps what the cell looks like to a status,
:func:`write_monitor_exit` and :func:`record_exit_in_container_record` leave the
outcome where ``state``, ``events`` and ``delete`` read it. Lean: no trio.

====================================================  ======
the guest shut itself down (`shut down` unrequested)   0
``kill`` with signal N caused the shutdown             128+N
the cell `failed` or reports `Comm ABI mismatch`       139
the cell vanished / the hypervisor is unreachable      255
====================================================  ======
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import msgspec

from runphi.backends.base import CellState, CellStatus

EXIT_SELF_SHUTDOWN = 0
EXIT_CRASHED = 139
EXIT_VANISHED = 255

MONITOR_EXIT_FILE = "monitor-exit.json"


class MonitorExit(msgspec.Struct, frozen=True):
    """Why the monitor ended (written just before it exits)."""

    code: int
    reason: str
    signal: int | None = None
    cell_state: str | None = None
    time: str = ""
    dropped_console_bytes: int = 0


def decide_exit(status: CellStatus, *, available: bool, started: bool,
                signal_number: int | None) -> tuple[int, str] | None:
    """The DESIGN §4 exit status for what the cell looks like now, or None to keep watching.

    ``available`` is False when the hypervisor cannot be asked at all.
    """
    state = status.state
    if not available:
        return EXIT_VANISHED, "the hypervisor is unreachable"
    if state is CellState.FAILED:
        return EXIT_CRASHED, f"the cell is `{status.detail or state.value}`"
    if signal_number is not None and state in (CellState.GONE, CellState.SHUT_DOWN):
        name = signal.Signals(signal_number).name
        return 128 + signal_number, f"stopped by {name}"
    if state is CellState.GONE:
        return EXIT_VANISHED, "the cell vanished (destroyed outside runphi)"
    if state is CellState.SHUT_DOWN and started:
        return EXIT_SELF_SHUTDOWN, "the guest shut itself down"
    return None


def write_monitor_exit(container_dir: str | os.PathLike[str], outcome: MonitorExit) -> None:
    """Atomically record `outcome` (temp file + fsync + rename)."""
    final = Path(container_dir, MONITOR_EXIT_FILE)
    temp = final.with_name(f".{final.name}.{os.getpid()}")
    with open(temp, "wb") as out:
        out.write(msgspec.json.encode(outcome))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, final)


def record_exit_in_container_record(container_dir: str, outcome: MonitorExit, wait: float = 1.0) -> bool:
    """Copy the exit code and reason into the container record, under its lock.

    Never blocks on the lock for long: a verb holding it (``kill``, ``delete``)
    may be about to kill this process. Returns False when the record could not
    be updated; `monitor-exit.json` still says why.
    """
    import fcntl

    from runphi.store import LOCK_NAME, Store

    directory = Path(container_dir)
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)  # the lock is the thing polled, against a deadline
        store = Store(directory.parent)
        try:
            record = store.read(directory.name)
        except Exception:
            return False
        cell = msgspec.structs.replace(record.cell, exit_code=outcome.code, exit_reason=outcome.reason)
        status = "stopped" if record.status in ("created", "running") else record.status
        try:
            store.write(msgspec.structs.replace(record, cell=cell, status=status))
        except Exception:
            return False
        return True
    finally:
        os.close(fd)


def utc_now() -> str:
    """Now, as an ISO 8601 UTC time (the `time` of an outcome)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat()
