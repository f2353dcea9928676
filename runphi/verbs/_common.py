"""Small pieces shared by the ZIC verbs (lean: stdlib + msgspec)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runphi import oci
from runphi.container import ContainerRecord, live_status, monitor_alive
from runphi.errors import BundleError, RunphiError

if TYPE_CHECKING:
    from runphi.context import Context

#: A copy of config.json taken at create: later edits of the bundle have no effect.
CONFIG_COPY_NAME = "config.json"
#: The fifo ``start`` writes one byte into to release the monitor.
START_FIFO_NAME = "start.fifo"
#: How long ``kill KILL`` and ``delete`` give the cell to be destroyed (seconds).
DESTROY_TIMEOUT = 5.0


def container_config(ctx: Context, record: ContainerRecord) -> oci.Config:
    """The config.json as it was at create (the copy in the container's directory)."""
    return oci.load_config(ctx.store.container_dir(record.id))


def state_json(record: ContainerRecord, status: str | None = None) -> bytes:
    """Hook stdin for ``record`` (status overridable: hooks see the status of their moment)."""
    live = status or live_status(record)
    return oci.encode_hook_state(oci.HookState(
        oci_version=record.oci_version, id=record.id, status=live,
        pid=0 if live == "stopped" else record.monitor_pid, bundle=record.bundle,
        annotations=record.annotations or None))


def write_pid_file(path: str, pid: int) -> None:
    """Write ``pid`` like runc: decimal, no newline, temp file + rename (atomic)."""
    target = Path(os.path.abspath(path))
    tmp = target.with_name(f".{target.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        raise BundleError(f"cannot write pid file {target}: {exc.strerror}") from None


def stop_monitor(record: ContainerRecord, timeout: float = 10.0) -> None:
    """SIGKILL the monitor and wait until it is gone (runc's 10 s budget).

    The monitor is not our child, so waiting means watching /proc (the thing
    observed is a procfs file, polled against a deadline).
    """
    if not monitor_alive(record):
        return
    try:
        os.kill(record.monitor_pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while monitor_alive(record):
        if time.monotonic() >= deadline:
            raise RunphiError(f"container init still running: monitor {record.monitor_pid} of "
                              f"container {record.id} survived SIGKILL for {timeout:.0f} s",
                              container_id=record.id)
        time.sleep(0.01)


def print_bytes(data: bytes) -> None:
    """Write ``data`` to stdout as is (no newline added), flushed."""
    import sys

    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
