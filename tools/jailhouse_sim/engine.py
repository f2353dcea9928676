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
    extra: dict[str, str] = field(default_factory=dict)


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

    def count_vmexits(self, cpu: int, kind: str, n: int = 1) -> None:
        """Advance a statistics counter (`mmio`, `hypercall`, `psci`, ...) for one CPU."""


class GuestEngine(Protocol):
    name: str

    async def run(self, spec: GuestSpec, host: GuestHost) -> None:
        """Run the guest until it ends by itself or the task is cancelled."""
