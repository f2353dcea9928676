"""One node as the core sees it, and the small pieces every ZIC operation shares.

A front end hands the core a :class:`Node`: where the container records live, how
to reach the backend (opened only when an operation needs it: most verb calls
never do), and where warnings go. Lean: stdlib + msgspec, no trio.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from runphi import oci
from runphi.container import ContainerRecord, ContainerStatus, live_status, monitor_alive
from runphi.errors import RunphiError

if TYPE_CHECKING:
    from runphi.backends.base import Backend
    from runphi.store import Store

#: A copy of config.json taken at create: later edits of the bundle have no effect.
CONFIG_COPY_NAME = "config.json"
#: The fifo ``start`` writes one byte into to release the monitor.
START_FIFO_NAME = "start.fifo"
#: How long ``kill KILL`` and ``delete`` give the cell to be destroyed (seconds).
DESTROY_TIMEOUT = 5.0
#: How long one hypervisor management call of a ZIC's owner (monitor or shim) may take (seconds).
TOOL_TIMEOUT = 10.0


class Log(Protocol):
    """Where the core reports what it could not do (runphi.log.VerbLog fits)."""

    def warn(self, msg: str, **context: Any) -> None: ...

    def info(self, msg: str, **context: Any) -> None: ...

    def debug(self, msg: str, **context: Any) -> None: ...


class Node:
    """The records under one state root, the node's backend, and the log."""

    def __init__(self, store: Store, open_backend: Callable[[str | None], Backend], log: Log,
                 monitor_log: tuple[str, str, str] = ("", "json", "info"), state_dir: str = "") -> None:
        self.store = store
        self._open_backend = open_backend
        self.log = log
        #: The node's state directory (ledger, verb latencies); "" where none is configured.
        self.state_dir = state_dir
        #: (path, format, level) of the runtime log a ZIC's monitor appends its exit line to.
        self.monitor_log = monitor_log

    def backend(self, container_id: str | None = None) -> Backend:
        """The node's backend; raises BackendNotConfigured when there is none."""
        return self._open_backend(container_id)


def container_config(node: Node, record: ContainerRecord) -> oci.Config:
    """The config.json as it was at create (the copy in the container's directory)."""
    return oci.load_config(node.store.container_dir(record.id))


def state_json(record: ContainerRecord, status: ContainerStatus | None = None) -> bytes:
    """Hook stdin for ``record`` (status overridable: hooks see the status of their moment)."""
    live = status or live_status(record)
    return oci.encode_hook_state(oci.HookState(
        oci_version=record.oci_version, id=record.id, status=live,
        pid=0 if live == "stopped" else record.monitor_pid, bundle=record.bundle,
        annotations=record.annotations or None))


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
