"""The backend protocol: everything the verbs and the monitor may ask of a hypervisor.

A backend turns one container's wishes (OCI config + the image's boot description)
into a partition, and reports on it afterwards. The verbs and the monitor only talk
to :class:`Backend`; the Jailhouse backend is one implementation.

Lean on purpose: verb processes import this module, so it uses msgspec and the
standard library only.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from runphi.errors import RunphiError

# Cell states exactly as the hypervisor reports them (jailhouse.md §2.3).
RUNNING = "running"
RUNNING_LOCKED = "running/locked"
SHUT_DOWN = "shut down"
FAILED = "failed"
COMM_ABI_MISMATCH = "Comm ABI mismatch"
INVALID = "invalid"

#: Per-container override of the graceful-shutdown deadline (milliseconds).
SHUTDOWN_TIMEOUT_ANNOTATION = "org.runphi.shutdown-timeout-ms"
#: Kernel command line of a Linux guest (absent: keep the device tree's bootargs).
LINUX_CMDLINE_ANNOTATION = "org.runphi.linux.cmdline"

#: States in which the guest is alive.
ALIVE_STATES = frozenset({RUNNING, RUNNING_LOCKED})
#: States that mean the guest crashed (DESIGN §4: exit status 139).
CRASHED_STATES = frozenset({FAILED, COMM_ABI_MISMATCH})


class BackendError(RunphiError):
    """A hypervisor operation failed; the message is the one user-facing line."""


class BackendUnavailable(BackendError):
    """The hypervisor (or its management tool) cannot be reached at all."""


class CellNotFound(BackendError):
    """The named cell does not exist (any more)."""


class ResourceBusy(BackendError):
    """A CPU, device or memory range the cell needs belongs to someone else."""


class OperationDenied(BackendError):
    """The hypervisor refused the operation in the cell's current situation."""


class InvalidConfiguration(BackendError):
    """The hypervisor rejected the cell configuration or an image placement."""


class ToolTimeout(BackendError):
    """The management tool did not answer within its deadline."""


class CellStatistics(msgspec.Struct, frozen=True):
    """Hypervisor exit counters of one cell: totals per kind and per CPU."""

    total: dict[str, int]
    per_cpu: dict[int, dict[str, int]]


class Backend(Protocol):
    """What a partitioning backend does for the verbs.

    Every method either completes or raises a :class:`~runphi.errors.RunphiError`
    (a :class:`BackendError` for hypervisor failures) whose message names the
    cause in user terms. ``launch`` is all or nothing: on failure it has undone
    its own steps in reverse order.
    """

    def launch(self, request):  # (runphi.verbs.create.LaunchRequest) -> runphi.verbs.create.Launched
        """Bring one ZIC to `created`: resources, cell created and loaded, console
        opened (pty master sent), monitor forked. Returns the cell record and the
        monitor's pid and start time."""

    def planned_cell_name(self, container_id: str) -> str:
        """The cell name `launch` gives `container_id`: deterministic, so the cell of a
        create that died before recording it can still be found."""

    def cell_state(self, cell_name: str) -> str | None:
        """The cell's current hypervisor state, or None when no such cell exists.

        Raises :class:`BackendUnavailable` when the hypervisor cannot be asked.
        """

    def cell_statistics(self, cell_name: str) -> CellStatistics:
        """The cell's exit counters (raises :class:`CellNotFound` when it is gone)."""

    def failed_cpus(self, cell_name: str) -> frozenset[int]:
        """The cell's CPUs parked on a fatal trap (empty when none or no such cell)."""

    def start_cell(self, cell_name: str) -> None:
        """Start (or restart) the cell from its reset address."""

    def shutdown_cell(self, cell_name: str, timeout: float | None = None) -> None:
        """Stop the cell's CPUs; the cell stays, `shut down`."""

    def destroy_cell(self, cell_name: str, timeout: float | None = None) -> None:
        """Remove the cell (if it still exists) and release everything its container held.

        Idempotent: calling it for a cell that is already gone only releases.
        """


class CellWatch(Protocol):
    """The monitor's view of its one cell (async where the backend must be asked).

    Made by ``runphi.backends.<backend>.watch.open_cell_watch(setup)`` inside the
    monitor, after trio is imported; never used by the verbs.
    """

    def read_state(self) -> tuple[bool, str | None]:
        """(hypervisor available, the cell's state or None when it is gone); cheap, no process."""

    async def request_shutdown(self) -> bool:
        """Ask the cell to stop (graceful); True when it is stopped or gone."""

    async def force_destroy(self) -> bool:
        """Destroy the cell; True when it is gone."""

    async def reachable(self) -> bool:
        """Whether the hypervisor's management side still answers at all."""
