"""One container's record and its status machine.

The record (:class:`ContainerRecord`) is what runphi knows about a ZIC between
verb calls; ``runphi.store`` keeps it on disk. Its status follows::

    creating ──► created ──► running ──► stopped
        │           │                       ▲
        └───────────┴───────────────────────┘   (any → stopped when the monitor dies)

:func:`transition` refuses everything else. The stored status is only a claim:
:func:`live_status` checks the recorded monitor process (pid *and* its start
time from ``/proc/<pid>/stat``, so a recycled pid does not count) and reports
``stopped`` once it is gone. While ``creating``, the recorded process is the
``create`` verb itself, so a create that crashed half-way reads as stopped.

Lean: msgspec and the stdlib only.
"""

from __future__ import annotations

import os
import signal
from typing import Literal

import msgspec

from runphi.backends.base import CellRecord, CellState
from runphi.errors import IllegalTransition
from runphi.procfs import process_start_time
from runphi.oci import State

ContainerStatus = Literal["creating", "created", "running", "stopped"]

#: Signals a ZIC's monitor turns into a graceful cell shutdown (exit 128+N); ``kill``
#: delivers these to it and handles SIGKILL itself.
GRACEFUL_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})

_LEGAL: dict[str, frozenset[str]] = {
    "creating": frozenset({"created", "stopped"}),
    "created": frozenset({"running", "stopped"}),
    "running": frozenset({"stopped"}),
    "stopped": frozenset(),
}


#: ``ContainerRecord.owner`` of a ZIC served by runphi's containerd shim.
SHIM_OWNER = "containerd-shim-runphi-v2"


class ContainerRecord(msgspec.Struct, kw_only=True):
    """A ZIC as runphi records it under ``<root>/<id>/``."""

    id: str
    bundle: str
    rootfs: str
    #: RFC 3339 with nanoseconds, UTC (runc's ``created``).
    created: str
    status: ContainerStatus
    oci_version: str
    annotations: dict[str, str] = {}
    #: The process whose liveness is the container's (the monitor; ``create`` while creating).
    monitor_pid: int = 0
    #: Its start time in clock ticks since boot (field 22 of /proc/<pid>/stat).
    monitor_start_time: int = 0
    #: sha256 of config.json as read at create (later edits must have no effect).
    config_digest: str = ""
    #: The partition behind the container, as the backend describes it.
    cell: CellRecord = msgspec.field(default_factory=CellRecord)
    #: Which front end owns the ZIC's long-lived process: "" the runc-CLI mode's monitor,
    #: :data:`SHIM_OWNER` runphi's containerd shim (only containerd may then act on it).
    owner: str = ""


def transition(record: ContainerRecord, new_status: ContainerStatus) -> ContainerRecord:
    """A copy of ``record`` in ``new_status``; :class:`IllegalTransition` if not allowed."""
    if new_status not in _LEGAL[record.status]:
        raise IllegalTransition(
            f"container {record.id} cannot go from {record.status} to {new_status}",
            container_id=record.id)
    return msgspec.structs.replace(record, status=new_status)


def identify_process(pid: int) -> tuple[int, int]:
    """(pid, start time) to record for a live process, e.g. ``os.getpid()``."""
    start = process_start_time(pid)
    if start is None:
        raise ProcessLookupError(pid)
    return pid, start


def monitor_alive(record: ContainerRecord) -> bool:
    """Whether the recorded monitor is the same process and still running."""
    if record.monitor_pid <= 0:
        return False
    return process_start_time(record.monitor_pid) == record.monitor_start_time


def live_status(record: ContainerRecord, cell_state: CellState | None = None) -> ContainerStatus:
    """The status right now: the stored one, or ``stopped`` if its process is gone.

    ``cell_state`` (the hypervisor's view, when the caller read it) turns a
    ``created`` container whose cell already runs into ``running``: a ``start``
    that died between starting the cell and recording it.
    """
    if record.status == "stopped" or not monitor_alive(record):
        return "stopped"
    if record.status == "created" and cell_state is CellState.RUNNING:
        return "running"
    return record.status


def oci_state(record: ContainerRecord, owner: str = "", cell_state: CellState | None = None) -> State:
    """The OCI state document of ``record`` with its live status (pid 0 when stopped)."""
    status = live_status(record, cell_state)
    return State(
        oci_version=record.oci_version,
        id=record.id,
        pid=0 if status == "stopped" else record.monitor_pid,
        status=status,
        bundle=record.bundle,
        rootfs=record.rootfs,
        created=record.created,
        annotations=record.annotations or None,
        owner=owner,
    )


def current_process_identity() -> tuple[int, int]:
    """(pid, start time) of this process: the placeholder monitor while creating."""
    return identify_process(os.getpid())
