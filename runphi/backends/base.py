"""The backend protocol: everything the core may ask of a hypervisor, and the types it speaks.

A backend turns one container's wishes (OCI config + the image's boot description)
into a partition, and reports on it afterwards. The core (``runphi.core``, the
monitor) only talks to :class:`Backend`; the Jailhouse backend is one
implementation. A backend never imports the core, a front end or the monitor:
everything it receives and returns is defined here.

Lean on purpose: verb processes import this module, so it uses msgspec and the
standard library only.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from runphi.errors import RunphiError
from runphi.oci import Config

if TYPE_CHECKING:
    from runphi.backends.ledger import ResourceUse

#: Per-container override of the graceful-shutdown deadline (milliseconds).
SHUTDOWN_TIMEOUT_ANNOTATION = "org.runphi.shutdown-timeout-ms"
#: Kernel command line of a Linux guest (absent: keep the device tree's bootargs).
LINUX_CMDLINE_ANNOTATION = "org.runphi.linux.cmdline"

def shutdown_timeout(annotations: dict[str, str], default_ms: int) -> float:
    """The graceful-shutdown deadline in seconds (annotation, else the backend's configured default)."""
    text = annotations.get(SHUTDOWN_TIMEOUT_ANNOTATION)
    if text is None:
        return default_ms / 1000
    if not text.isdigit() or int(text) == 0:
        raise BackendError(f"annotation {SHUTDOWN_TIMEOUT_ANNOTATION}="
                           f"{text!r} must be a positive number of milliseconds")
    return int(text) / 1000


class CellState(enum.Enum):
    """A cell's state in runphi's terms; each backend maps its hypervisor's own words onto it."""

    #: Made and loaded, never started (for backends that can tell it from SHUT_DOWN).
    CREATED = "created"
    RUNNING = "running"
    #: Stopped, still there (never started, if the backend cannot tell CREATED).
    SHUT_DOWN = "shut down"
    #: Crashed (DESIGN §4: exit status 139).
    FAILED = "failed"
    #: No such cell any more.
    GONE = "gone"
    #: Something the backend reported that runphi does not know: keep watching.
    UNKNOWN = "unknown"


class CellStatus(msgspec.Struct, frozen=True):
    """A cell's state, and the backend's own word for it (what users see: "running/locked")."""

    state: CellState
    #: The hypervisor's text; None when the cell is gone.
    detail: str | None = None


#: The status of a cell that no longer exists.
GONE = CellStatus(CellState.GONE)


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


class CellRecord(msgspec.Struct, kw_only=True):
    """What the backend remembers about a container's cell; the store persists it.

    ``allocation`` is the backend's own document (CPUs, memory, devices), kept
    as plain JSON data so that the store needs no backend types.
    """

    cell_name: str = ""
    cell_id: int | None = None
    allocation: dict[str, Any] = {}
    uart_device: str = ""
    exit_code: int | None = None
    exit_reason: str = ""


class LaunchRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One ZIC to bring to a created, loaded cell."""

    container_id: str
    bundle: str
    rootfs: str
    #: ``<root>/<id>/``: the backend may keep files of the cell there (the `.cell`, a DTB).
    container_dir: str
    config: Config
    #: True when the core hands the cell to a long-lived owner (the monitor or the shim
    #: server), whose :class:`CellWatch` brings its host side up (``bring_up``). False for
    #: a direct caller of the protocol: a backend whose cells are host processes (KVM)
    #: then starts that process in ``launch``, as the caller's child.
    owned: bool = False
    #: The container has a stdin to type into its console (a console that takes no input refuses it).
    open_stdin: bool = False


class WatchSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the ZIC's long-lived process watches the cell: which backend's watch, and its pace."""

    #: The backend whose ``watch`` module makes the :class:`CellWatch` (its registry name).
    backend: str
    #: That watch's settings (Jailhouse: ``tool``, ``sysfs``).
    backend_config: dict[str, str]
    poll_interval: float
    probe_interval: float
    #: The graceful-shutdown deadline before a destroy (seconds).
    shutdown_timeout: float
    #: Whether the owner's ``CellWatch.bring_up`` does real work that ``create`` must wait
    #: for (KVM: the VM process), so that its failure fails the create.
    owner_brings_up: bool = False


class LaunchedCell(msgspec.Struct, kw_only=True):
    """What ``launch`` hands the core: the cell, its open console source, how to watch it.

    The core owns ``console_fd`` from here on (it passes it to the ZIC's process
    and closes its own copy); -1 when the cell has no console. ``host_fds`` are fds the
    owner's :class:`CellWatch` needs to bring the cell up (KVM: QEMU's end of the
    console); the core hands them to the owner with the watch, then closes its copies.
    """

    cell: CellRecord
    console_fd: int = -1
    watch: WatchSettings
    host_fds: tuple[int, ...] = ()
    #: What ``console_fd`` is: "uart" (a UART, or QEMU's serial), or "hypervisor" (a reader of
    #: the shared hypervisor console: output only, polled, other writers' lines filtered out).
    console_kind: str = "uart"


class CellStatistics(msgspec.Struct, frozen=True):
    """Hypervisor exit counters of one cell: totals per kind and per CPU."""

    total: dict[str, int]
    per_cpu: dict[int, dict[str, int]]


class CellStats(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a monitor of the node wants to know about one cell (``Backend.stats``).

    ``vmexits`` are the hypervisor's exit counters by reason (``total`` among them) and
    ``vmexits_per_cpu`` the same per CPU (Jailhouse; empty on KVM). ``cpu_seconds`` is the
    CPU time each of the cell's CPUs ran guest code for, where the host can tell (KVM: the
    vCPU threads); ``extra`` holds backend-specific counters (KVM's per-VM statistics)."""

    status: CellStatus
    failed_cpus: frozenset[int] = frozenset()
    vmexits: dict[str, int] = {}
    vmexits_per_cpu: dict[int, dict[str, int]] = {}
    cpu_seconds: dict[int, float] = {}
    extra: dict[str, int] = {}


class PoolUse(msgspec.Struct, frozen=True, kw_only=True):
    """One of the hypervisor's own memory pools (Jailhouse: ``mem``, ``remap``), in pages."""

    name: str
    size_pages: int
    used_pages: int


class Backend(Protocol):
    """What a partitioning backend does for the verbs.

    Every method either completes or raises a :class:`~runphi.errors.RunphiError`
    (a :class:`BackendError` for hypervisor failures) whose message names the
    cause in user terms. ``launch`` is all or nothing: on failure it has undone
    its own steps in reverse order.
    """

    def launch(self, request: LaunchRequest) -> LaunchedCell:
        """Bring one ZIC's cell to created and loaded: resources, the cell, its images,
        its console source opened. All or nothing: a failure has undone every step."""

    @property
    def poll_interval(self) -> float:
        """How often a cell's state is worth reading (seconds) where nothing announces a change."""

    def planned_cell_name(self, container_id: str) -> str:
        """The cell name `launch` gives `container_id`: deterministic, so the cell of a
        create that died before recording it can still be found."""

    def cell_state(self, cell: CellRecord) -> CellStatus:
        """The cell's current state (``GONE`` when no such cell exists).

        ``cell`` is the record ``launch`` returned (the backend may use what it noted there).
        Raises :class:`BackendUnavailable` when the hypervisor cannot be asked.
        """

    def cell_statistics(self, cell: CellRecord) -> CellStatistics:
        """The cell's exit counters (raises :class:`CellNotFound` when it is gone)."""

    def failed_cpus(self, cell: CellRecord) -> frozenset[int]:
        """The cell's CPUs parked on a fatal trap (empty when none or no such cell)."""

    def stats(self, cell: CellRecord) -> CellStats:
        """State, failed CPUs and counters of the cell in one reading (status ``GONE`` and
        nothing else when no such cell exists). Raises :class:`BackendUnavailable` when
        the hypervisor cannot be asked."""

    def pools(self) -> list[PoolUse]:
        """The hypervisor's memory pools (empty when it has none, or is not enabled)."""

    def resources(self) -> list[ResourceUse]:
        """The node ledger's use of every kind of resource it lends (CPUs, RAM, console slots,
        links, RPUs)."""

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

    Made by ``runphi.backends.registry.open_cell_watch`` inside the ZIC's owner (the
    monitor, the shim server), after trio is imported; never used by the verbs. The owner
    calls ``bring_up`` once before the container counts as created, then runs ``follow``
    for as long as it supervises the cell.
    """

    def bring_up(self) -> None:
        """Make the cell's host side live in this process, its owner (synchronous, from the
        thread that will run trio). Jailhouse: nothing. KVM: the VM process, paused,
        becomes this process's child. Raises :class:`BackendError` with the one line when
        it cannot; then nothing of it is left running."""

    async def follow(self) -> None:
        """What the watch does in the background while the owner supervises (KVM: the VM's
        events, exit and errors); returns at once when there is nothing. When cancelled it
        records the cell's last state where the backend's ``cell_state`` reads it."""

    def read_state(self) -> tuple[bool, CellStatus]:
        """(hypervisor available, the cell's status); cheap, no process."""

    async def request_shutdown(self) -> bool:
        """Ask the cell to stop (graceful); True when it is stopped or gone."""

    async def force_destroy(self) -> bool:
        """Destroy the cell; True when it is gone."""

    async def reachable(self) -> bool:
        """Whether the hypervisor's management side still answers at all."""
