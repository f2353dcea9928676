"""Where a KVM cell lives on the node: ``<state_dir>/kvm-cells/<cell name>/``.

A KVM "cell" is a directory, so that it exists from ``launch`` to ``destroy_cell``
whether or not its VM process runs, as a Jailhouse cell exists in the hypervisor:

* ``vm.json`` — the :class:`~runphi.backends.kvm.machine.VmPlan`, written by ``launch``;
* ``status.json`` — :class:`CellFile`: ``created`` until the VM is brought up, ``up``
  (with the QEMU process) while it may run, and the end once known (``shut down``,
  ``failed`` with its vCPUs' host CPUs, ``gone``). One writer at a time: ``launch``,
  then the process that brought the VM up. Replaced atomically;
* ``qmp.sock`` — QEMU's control socket while the VM process lives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from runphi.backends.base import GONE, BackendError, CellState, CellStatus
from runphi.errors import MALFORMED_INPUT
from runphi.files import atomic_write

if TYPE_CHECKING:
    from runphi.backends.kvm.machine import VmPlan

CELLS_DIR = "kvm-cells"
PLAN_NAME = "vm.json"
STATUS_NAME = "status.json"
#: QEMU's stderr when nobody follows it (a VM brought up by a direct protocol caller).
QEMU_LOG_NAME = "qemu.log"

Phase = Literal["created", "up", "shut down", "failed", "gone"]


class CellFile(msgspec.Struct, frozen=True, kw_only=True):
    """``status.json``: the cell's phase, its VM process while ``up``, why it ended."""

    phase: Phase
    pid: int = 0
    start_time: int = 0
    #: Host thread of each vCPU (by index) while the VM runs.
    vcpu_threads: list[int] = []
    #: QEMU's or runphi's word for the state ("paused", "guest reset", ...).
    detail: str = ""
    #: Host CPUs of the vCPUs that were running when the guest faulted.
    failed_cpus: list[int] = []


def cells_root(state_dir: str) -> Path:
    return Path(state_dir) / CELLS_DIR


def cell_dir(state_dir: str, cell_name: str) -> Path:
    return cells_root(state_dir) / cell_name


def cell_names(state_dir: str) -> frozenset[str]:
    """Every cell that exists on the node (whatever its phase; not one being removed)."""
    try:
        return frozenset(entry.name for entry in cells_root(state_dir).iterdir()
                         if entry.is_dir() and not entry.name.startswith("."))
    except OSError:
        return frozenset()


def remove_cell_dir(directory: Path) -> None:
    """Remove a cell's directory for good: renamed away first, so that its former owner,
    still writing its status, can never recreate a file in it (never raises)."""
    import shutil

    doomed = directory.with_name(f".{directory.name}.{os.getpid()}.removed")
    try:
        os.rename(directory, doomed)
    except FileNotFoundError:
        return
    except OSError:
        doomed = directory
    shutil.rmtree(doomed, ignore_errors=True)


def read_status(directory: Path) -> CellFile | None:
    """The cell's status; None when the cell does not exist."""
    try:
        return msgspec.json.decode((directory / STATUS_NAME).read_bytes(), type=CellFile)
    except FileNotFoundError:
        return None
    except (OSError, *MALFORMED_INPUT) as exc:
        raise BackendError(f"cannot read the KVM cell status {directory / STATUS_NAME}: {exc}") from None


#: ``status.json`` phases once the VM has ended.
ENDED_PHASES = {"shut down": CellState.SHUT_DOWN, "failed": CellState.FAILED, "gone": CellState.GONE}


def status_of(file: CellFile | None) -> CellStatus | None:
    """The cell's status from ``status.json`` alone; None when only QEMU can tell (``up``)."""
    if file is None:
        return GONE
    if file.phase == "created":
        return CellStatus(CellState.CREATED, "created")
    if file.phase in ENDED_PHASES:
        return CellStatus(ENDED_PHASES[file.phase], file.detail or file.phase)
    return None


def read_plan(directory: Path) -> VmPlan:
    """The cell's VM plan (``vm.json``); BackendError naming the file when it cannot be read."""
    from runphi.backends.kvm.machine import VmPlan

    path = directory / PLAN_NAME
    try:
        return msgspec.json.decode(path.read_bytes(), type=VmPlan)
    except (OSError, *MALFORMED_INPUT) as exc:
        raise BackendError(f"cannot read the VM plan {path}: {exc}") from None


def write_status(directory: Path, status: CellFile) -> None:
    """Replace the cell's status atomically (a missing cell directory is left missing)."""
    write_atomically(directory / STATUS_NAME, msgspec.json.encode(status))


def write_atomically(path: Path, data: bytes) -> None:
    """:func:`runphi.files.atomic_write` into a cell's directory: nothing when the cell was
    destroyed meanwhile, BackendError when the write fails."""
    try:
        atomic_write(path, data)
    except FileNotFoundError:
        return  # the cell was destroyed meanwhile
    except OSError as exc:
        raise BackendError(f"cannot write {path}: {exc.strerror}") from None
