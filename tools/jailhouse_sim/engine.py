"""The contract between the simulated hypervisor and a guest engine.

The daemon owns cells, their UART ptys and the hypervisor console. When a cell
is started it hands the engine a :class:`GuestSpec` (what was loaded where, which
CPUs and RAM the cell has) and a :class:`GuestHost` (the cell's UART and the
hypervisor-side effects a guest can cause), then runs ``engine.run(spec, host)``
as a trio task inside a cancel scope.

Guarantees both sides rely on:

* ``run`` returns when the guest ended by itself; before returning it has told
  the host how (``host.set_state("shut down")`` for a power-off,
  ``host.park_cpu(...)`` for every CPU on a fault, ...).
* ``cell shutdown``/``load``/``destroy``/``disable`` cancel the task; ``run`` must
  release everything it started (processes, sockets) before the cancellation
  finishes propagating, so nothing outlives the cell.
* Bytes the guest prints go through ``host.uart_write``; bytes typed into the
  UART device arrive from ``host.uart_read``. The UART (a pty owned by the
  daemon) outlives every guest: a restart reuses the same device path.
* ``spec.nics`` are the cell's network links (the root-side taps that stand in for
  ivshmem-net, see :mod:`.netdev`). Their descriptors belong to the daemon and stay open
  for the whole run: an engine that gives one to a guest process hands it a duplicate
  made for that start and never closes the original. An engine without networking
  ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class LoadedImage:
    """One image copied into the cell by ``cell load`` (guest-physical address)."""

    address: int
    data: bytes


@dataclass(frozen=True)
class RamRegion:
    """A cell memory region as the guest sees it."""

    guest_address: int
    size: int
    flags: int


@dataclass(frozen=True)
class GuestSpec:
    """Everything an engine needs to boot one cell."""

    cell_name: str
    cell_id: int
    cpus: tuple[int, ...]
    reset_address: int
    images: tuple[LoadedImage, ...]
    ram: tuple[RamRegion, ...]
    uart_guest_address: int | None
    # Linux boots (`jailhouse cell linux`) carry the kernel, initrd and command line.
    linux: LinuxBoot | None = None
    # The cell's ivshmem-net links, each as the guest's network device (see the module docstring).
    nics: tuple[GuestNic, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GuestNic:
    """One network link of the cell: the guest's NIC on a tap whose other end is the root's netdev."""

    fd: int  # the tap's queue, owned by the daemon (duplicate it to hand it on; never close it)
    mac: str  # the guest NIC's MAC ("02:..", locally administered), the same for every start of the cell


@dataclass(frozen=True)
class LinuxBoot:
    kernel: bytes
    initrd: bytes | None
    cmdline: str


class GuestHost(Protocol):
    """What the hypervisor offers a running guest."""

    #: Read by an engine whose task is being cancelled: True for a stop the guest may be
    #: asked to carry out itself (`cell shutdown`, `load`, `start`), False for `destroy`/`disable`.
    graceful_stop: bool

    async def uart_write(self, data: bytes) -> None:
        """Put bytes on the cell's UART (towards whoever has the device open)."""

    async def uart_read(self) -> bytes:
        """Wait for and return bytes typed into the cell's UART."""

    def set_state(self, state: str) -> None:
        """Set the cell's comm-region state (`running/locked`, `shut down`, `Comm ABI mismatch`...)."""

    def park_cpu(self, cpu: int, reason: str) -> None:
        """Park one CPU after a fatal trap; `reason` is the hypervisor console line before
        `Parking CPU <n> (Cell: "<name>")`. When every CPU is parked the cell is `failed`."""

    def hv_print(self, line: str) -> None:
        """Print a line on the hypervisor console ring."""

    def hv_write(self, data: bytes) -> None:
        """Bytes the guest sent through the debug-console hypercall (``hvc #0x4a48``, x0 = 8
        ``JAILHOUSE_HC_DEBUG_CONSOLE_PUTC``, one byte per call): appended to the hypervisor
        console ring exactly as written, with no line discipline or newline translation (the
        guest sends its own ``\\r\\n``), interleaved with the hypervisor's own lines. The
        engine counts the ``hypercall`` exits itself (:meth:`count_vmexits`). For a cell
        without ``JAILHOUSE_CELL_VIRTUAL_CONSOLE_PERMITTED`` the hypercall fails with EPERM and
        nothing is written (the host also drops such bytes)."""

    def count_vmexits(self, cpu: int, kind: str, n: int = 1) -> None:
        """Advance a statistics counter (`mmio`, `hypercall`, `psci`, ...) for one CPU."""


class GuestEngine(Protocol):
    name: str

    async def run(self, spec: GuestSpec, host: GuestHost) -> None:
        """Run the guest until it ends by itself or the task is cancelled."""
