"""The simulated driver + hypervisor: cells, lifecycle, validation, console.

Every management operation is an ``async`` method that either returns (success)
or raises :class:`HvError` carrying the errno the real ioctl would fail with.
Operations are not reentrant: the daemon calls them under one lock, the way the
driver serialises ioctls with its mutex. Guests are started and stopped through
a :class:`GuestRunner` supplied by the daemon.

The root Linux's ``ivshmem-net`` netdevs are modelled by :class:`~.netdev.IvshmemNet`: a
cell's virtual-ethernet links to the root get a tap each once the cell is admitted, and
lose it when the cell is destroyed (also by ``disable``); a tap that cannot be made is
one kernel-log line, not a failed create.
"""

from __future__ import annotations

import errno
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .board import Board
from .cellfile import (
    CELL_VIRTUAL_CONSOLE_ACTIVE,
    CELL_VIRTUAL_CONSOLE_PERMITTED,
    IVSHMEM_MAX_PEERS,
    MEM_COMM_REGION,
    MEM_IO,
    MEM_LOADABLE,
    MEM_WRITE,
    PCI_TYPE_IVSHMEM,
    SYS_VIRTUAL_DEBUG_CONSOLE,
    ArchitectureMismatch,
    CellConfig,
    ConfigRejected,
    FormatProfile,
    check_signature,
    parse_cell,
)
from .engine import LoadedImage
from .hvconsole import HvConsole
from .netdev import IvshmemNet, veth_links
from .sysfs import SysfsTree, cpu_bitmap, cpu_list

RUNNING = "running"
RUNNING_LOCKED = "running/locked"
SHUT_DOWN = "shut down"
FAILED = "failed"
COMM_ABI_MISMATCH = "Comm ABI mismatch"
GUEST_STATES = (RUNNING, RUNNING_LOCKED, SHUT_DOWN, FAILED, COMM_ABI_MISMATCH)

STAT_NAMES = ("total", "mmio", "management", "hypercall", "maintenance", "virt_irq", "virt_sgi", "psci", "smccc")
_STAT_MASK = 0x7FFFFFFF


def system_flags(config: bytes, profile: FormatProfile) -> int:
    """``flags`` of a system config (right after signature, architecture byte and revision);
    0 when the data ends before them."""
    offset = len(profile.system_signature) + (1 if profile.has_architecture else 0) + 2
    if len(config) < offset + 4:
        return 0
    return int(struct.unpack_from("<I", config, offset)[0])


class HvError(Exception):
    """A management call fails with ``errno`` (the CLI prints ``<IOCTL>: <strerror>``)."""

    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass
class Cell:
    id: int
    name: str
    cpus: set[int]
    config: CellConfig | None  # None for the root cell
    state: str = SHUT_DOWN
    loadable: bool = False
    failed_cpus: set[int] = field(default_factory=set)
    images: list[LoadedImage] = field(default_factory=list)
    rcpu_images: list[tuple[str, int, bytes | None]] = field(default_factory=list)

    @property
    def is_root(self) -> bool:
        return self.id == 0


class GuestRunner(Protocol):
    def start(self, cell: Cell) -> None:
        """Begin running the cell's guest (returns at once)."""

    async def stop(self, cell: Cell, graceful: bool = True) -> None:
        """Cancel the cell's guest, if any, and wait until it released everything.

        ``graceful`` is False when the cell is destroyed: engines that can ask a guest
        to shut down (Linux under QEMU) only do so for a graceful stop."""


@dataclass(frozen=True)
class CellRef:
    """``{ ID | [--name] NAME }`` as the driver receives it (id -1 means by name)."""

    id: int
    name: str


class Hypervisor:
    """State of the simulated board's Jailhouse; see the module docstring."""

    def __init__(self, board: Board, sysfs: SysfsTree, runner: GuestRunner, kernel_log: Path,
                 netdevs: IvshmemNet | None = None) -> None:
        self.board = board
        self.sysfs = sysfs
        self.runner = runner
        self.kernel_log = kernel_log
        # None: the root has no ivshmem-net driver (no link gets a netdev, nothing is logged).
        self.netdevs = netdevs
        self.console = HvConsole()
        self.enabled = False
        # The enabled system config has JAILHOUSE_SYS_VIRTUAL_DEBUG_CONSOLE: the HV keeps the
        # console ring and the root may read it (without: only the debug UART, reads get EPERM).
        self.virtual_console = False
        self.cells: dict[int, Cell] = {}
        self.cpu_stats: dict[int, dict[str, int]] = {c: dict.fromkeys(STAT_NAMES, 0) for c in range(board.cpus)}
        self.stats_dirty: set[int] = set()
        # Called with every console line (the board's debug UART listens here).
        self.console_listeners: list[Callable[[bytes], None]] = []
        sysfs.reset()
        self._write_globals()

    # ---- helpers -------------------------------------------------------------------------

    def dmesg(self, line: str, source: str = "jailhouse") -> None:
        """Append ``<source>: <line>`` to the simulated kernel log (``<root>/var/log/kern.log``)."""
        with open(self.kernel_log, "a") as f:
            f.write(f"{source}: {line}\n")

    def hv_print(self, line: str) -> None:
        """Print a line on the hypervisor console (ring, sysfs ``console``, debug UART)."""
        self._console_out((line + "\n").encode("utf-8", "replace"))

    def hv_write(self, data: bytes) -> None:
        """Raw bytes on the hypervisor console: what ``JAILHOUSE_HC_DEBUG_CONSOLE_PUTC`` does
        for each byte a guest passes (the caller checked the cell may; see
        :meth:`virtual_console_permitted`). No translation: the guest sends ``\\r\\n`` itself."""
        self._console_out(data)

    def _console_out(self, data: bytes) -> None:
        """The HV's ``printk`` output: the debug UART (``\\n`` sent as ``\\r\\n``) and, only with
        ``JAILHOUSE_SYS_VIRTUAL_DEBUG_CONSOLE``, the ring (and with it sysfs ``console``)."""
        if not data:
            return
        if self.virtual_console:
            self.console.write_bytes(data)
            self.sysfs.write("console", self.console.snapshot())
        for listener in self.console_listeners:
            listener(data.replace(b"\n", b"\r\n"))

    def _pool_used(self) -> int:
        return 200 + 17 * (len(self.cells) - 1) if self.enabled else 0

    def _write_globals(self) -> None:
        hv = self.board.hypervisor
        self.sysfs.write("enabled", "1\n" if self.enabled else "0\n")
        self.sysfs.write("mem_pool_size", f"{hv.mem_pool_pages if self.enabled else 0}\n")
        self.sysfs.write("mem_pool_used", f"{self._pool_used()}\n")
        self.sysfs.write("remap_pool_size", f"{hv.remap_pool_pages if self.enabled else 0}\n")
        self.sysfs.write("remap_pool_used", f"{40 if self.enabled else 0}\n")
        if not (self.sysfs.base / "console").exists():
            self.sysfs.write("console", b"")

    def _pool_line(self, when: str) -> str:
        hv = self.board.hypervisor
        return f"Page pool usage after {when}: mem {self._pool_used()}/{hv.mem_pool_pages}, remap 40/{hv.remap_pool_pages}"

    def _cell_files(self, cell: Cell) -> dict[str, str]:
        files = {
            "name": f"{cell.name}\n",
            "state": f"{cell.state}\n",
            "cpus_assigned": cpu_bitmap(cell.cpus, self.board.cpus) + "\n",
            "cpus_assigned_list": cpu_list(cell.cpus) + "\n",
            "cpus_failed": cpu_bitmap(cell.failed_cpus, self.board.cpus) + "\n",
            "cpus_failed_list": cpu_list(cell.failed_cpus) + "\n",
        }
        files.update(self._stat_files(cell))
        if self.board.rcpus:
            rcpus = set(cell.config.rcpus) if cell.config else set()
            files["rcpus_assigned"] = cpu_bitmap(rcpus, self.board.rcpus) + "\n"
            files["rcpus_assigned_list"] = cpu_list(rcpus) + "\n"
        return files

    def _stat_files(self, cell: Cell) -> dict[str, str]:
        files = {}
        for stat in STAT_NAMES:
            files[f"statistics/vmexits_{stat}"] = f"{sum(self.cpu_stats[c][stat] for c in cell.cpus)}\n"
            for cpu in cell.cpus:
                files[f"statistics/cpu{cpu}/vmexits_{stat}"] = f"{self.cpu_stats[cpu][stat]}\n"
        return files

    def _write_cpus(self, cell: Cell) -> None:
        base = f"cells/{cell.id}/"
        self.sysfs.write(base + "cpus_assigned", cpu_bitmap(cell.cpus, self.board.cpus) + "\n")
        self.sysfs.write(base + "cpus_assigned_list", cpu_list(cell.cpus) + "\n")
        self.sysfs.write(base + "cpus_failed", cpu_bitmap(cell.failed_cpus, self.board.cpus) + "\n")
        self.sysfs.write(base + "cpus_failed_list", cpu_list(cell.failed_cpus) + "\n")

    def _rebuild_stats_dir(self, cell: Cell) -> None:
        """Recreate ``statistics/`` after CPUs moved (cpu<N> kobjects move between cells)."""
        stats = self.sysfs.base / "cells" / str(cell.id) / "statistics"
        shutil.rmtree(stats, ignore_errors=True)
        for rel, value in self._stat_files(cell).items():
            path = self.sysfs.base / "cells" / str(cell.id) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sysfs.write(f"cells/{cell.id}/{rel}", value)

    def set_state(self, cell: Cell, state: str) -> None:
        """Change a cell's comm-region state and publish it in sysfs at once."""
        if cell.state != state:
            cell.state = state
            if cell.id in self.cells:
                self.sysfs.write(f"cells/{cell.id}/state", f"{state}\n")

    def park_cpu(self, cell: Cell, cpu: int) -> None:
        """Park a CPU after a fatal trap; all CPUs parked makes the cell ``failed``."""
        if cpu not in cell.cpus or cpu in cell.failed_cpus:
            return
        self.hv_print(f'Parking CPU {cpu} (Cell: "{cell.name}")')
        cell.failed_cpus.add(cpu)
        self._write_cpus(cell)
        if cell.failed_cpus >= cell.cpus:
            self.set_state(cell, FAILED)

    def count_vmexits(self, cpu: int, kind: str, n: int = 1) -> None:
        """Advance a per-CPU counter (and ``total``); sysfs is refreshed by :meth:`flush_stats`."""
        if kind not in STAT_NAMES:
            raise ValueError(f"unknown vmexit counter {kind!r} (one of {', '.join(STAT_NAMES)})")
        stats = self.cpu_stats[cpu]
        if kind != "total":
            stats[kind] = (stats[kind] + n) & _STAT_MASK
        stats["total"] = (stats["total"] + n) & _STAT_MASK
        self.stats_dirty.add(cpu)

    def flush_stats(self) -> None:
        """Publish changed statistics counters."""
        dirty, self.stats_dirty = self.stats_dirty, set()
        for cell in list(self.cells.values()):
            if cell.cpus & dirty and cell.id in self.cells:
                for rel, value in self._stat_files(cell).items():
                    self.sysfs.write(f"cells/{cell.id}/{rel}", value)

    def _reset_stats(self, cpus: set[int]) -> None:
        for cpu in cpus:
            self.cpu_stats[cpu] = dict.fromkeys(STAT_NAMES, 0)

    def lookup(self, ref: CellRef) -> Cell:
        """Find a cell like the driver: EINVAL when disabled, ENOENT when unknown."""
        if not self.enabled:
            raise HvError(errno.EINVAL)
        for cell in self.cells.values():
            if cell.id == ref.id or (ref.id == -1 and cell.name == ref.name):
                return cell
        raise HvError(errno.ENOENT)

    def _lookup_non_root(self, ref: CellRef) -> Cell:
        cell = self.lookup(ref)
        if cell.is_root:
            raise HvError(errno.EINVAL)
        return cell

    def _locked_cell(self, *, other_than: Cell | None = None) -> Cell | None:
        for cell in self.cells.values():
            if not cell.is_root and cell is not other_than and cell.state == RUNNING_LOCKED:
                return cell
        return None

    # ---- enable / disable ----------------------------------------------------------------

    async def enable(self, config: bytes) -> None:
        if self.enabled:
            raise HvError(errno.EBUSY)
        try:
            check_signature(config, self.board.profile, self.board.arch_code, system=True)
        except ConfigRejected as e:
            self.dmesg(e.log or "invalid configuration")
            raise HvError(e.errno) from None
        except ArchitectureMismatch as e:
            self.dmesg(str(e))
            raise HvError(errno.EINVAL) from None
        self.console.reset_for_enable()
        self.virtual_console = bool(system_flags(config, self.board.profile) & SYS_VIRTUAL_DEBUG_CONSOLE)
        self.sysfs.write("console", self.console.snapshot())
        self.enabled = True
        root_cpus = set(self.board.root.cpus)
        self._reset_stats(root_cpus)
        root = Cell(0, self.board.root.name, root_cpus, None, state=RUNNING)
        self.cells[0] = root
        hv = self.board.hypervisor
        self.hv_print(f"\nInitializing Jailhouse hypervisor {hv.version} on CPU {min(root_cpus)}")
        self.hv_print(f"Code location: 0x{0x0000ffffc0200800:016x}")
        self.hv_print(f"Page pool usage after early setup: mem 39/{hv.mem_pool_pages}, remap 0/{hv.remap_pool_pages}")
        self.hv_print("Initializing processors:")
        for cpu in sorted(root_cpus):
            self.hv_print(f" CPU {cpu}... OK")
        self.hv_print("Initializing unit: irqchip")
        self.hv_print("Initializing unit: ARM SMMU v3")
        self.hv_print("Initializing unit: PVU IOMMU")
        self.hv_print("Initializing unit: PCI")
        for bdf, _ in self.board.root.ivshmem_endpoints:
            self.hv_print(f'Adding virtual PCI device {bdf >> 8:02x}:{bdf >> 3 & 0x1f:02x}.{bdf & 7:x} to cell "{root.name}"')
        self.hv_print(self._pool_line("late setup"))
        self.hv_print("Activating hypervisor")
        self.sysfs.publish_cell(0, self._cell_files(root))
        self._write_globals()
        self.dmesg("The Jailhouse is opening.")

    async def disable(self) -> None:
        if not self.enabled:
            raise HvError(errno.EINVAL)
        for cell in sorted(self.cells.values(), key=lambda c: c.id, reverse=True):
            if not cell.is_root:
                await self._destroy(cell, announce=False)
        root = self.cells.pop(0)
        self.hv_print("Shutting down hypervisor")
        for cpu in sorted(root.cpus):
            self.hv_print(f" Releasing CPU {cpu}")
        self.sysfs.withdraw_cell(0)
        self.enabled = False
        if self.virtual_console:
            self.console.save()  # the driver's last_console, only kept where there is a ring
        self._write_globals()
        self.dmesg("The Jailhouse was closed.")

    # ---- cell create ---------------------------------------------------------------------

    async def create(self, data: bytes) -> int | None:
        """Create a cell; returns its id, or None for the silent architecture-mismatch quirk."""
        profile = self.board.profile
        try:
            check_signature(data, profile, self.board.arch_code, system=False)
        except ConfigRejected as e:
            self.dmesg(e.log or "invalid configuration")
            raise HvError(e.errno) from None
        except ArchitectureMismatch as e:
            self.dmesg(str(e))
            return None
        if not self.enabled:
            raise HvError(errno.EINVAL)
        try:
            config = parse_cell(data, profile)
        except ConfigRejected as e:
            self.dmesg(e.log or "invalid configuration")
            raise HvError(e.errno) from None
        if any(c.name == config.name for c in self.cells.values()):
            raise HvError(errno.EEXIST)
        root = self.cells[0]
        if not config.cpus <= root.cpus or (config.cpus and config.cpus == root.cpus):
            raise HvError(errno.EBUSY)
        if self._locked_cell() is not None:
            raise HvError(errno.EPERM)
        self._check_irqchips(config)
        self._check_ivshmem(config)
        self._check_rcpus(config)
        cell_id = self._admit(config)
        self._attach_netdevs(self.cells[cell_id])
        return cell_id

    def _check_irqchips(self, config: CellConfig) -> None:
        for chip in config.irqchips:
            if chip.pin_base % 32 or chip.address != self.board.gic.gicd:
                raise HvError(errno.EINVAL)

    def _ivshmem_endpoints(self) -> set[tuple[int, int]]:
        taken = {(bdf, dev) for bdf, dev in self.board.root.ivshmem_endpoints}
        for cell in self.cells.values():
            if cell.config:
                taken |= {(d.bdf, d.shmem_dev_id) for d in cell.config.pci_devices if d.type == PCI_TYPE_IVSHMEM}
        return taken

    def _check_ivshmem(self, config: CellConfig) -> None:
        taken = self._ivshmem_endpoints()
        for dev in config.pci_devices:
            if dev.type != PCI_TYPE_IVSHMEM:
                continue
            if dev.shmem_regions_start + 2 + dev.shmem_peers > len(config.memory_regions):
                raise HvError(errno.EINVAL)
            if dev.shmem_dev_id >= IVSHMEM_MAX_PEERS:
                raise HvError(errno.EINVAL)
            # Peers are matched by bdf only; the PCI domain is ignored.
            if (dev.bdf, dev.shmem_dev_id) in taken:
                raise HvError(errno.EBUSY)
            taken.add((dev.bdf, dev.shmem_dev_id))

    def _check_rcpus(self, config: CellConfig) -> None:
        if any(r >= self.board.rcpus for r in config.rcpus):
            raise HvError(errno.EBUSY)
        for cell in self.cells.values():
            if cell.config and cell.config.rcpus & config.rcpus:
                raise HvError(errno.EBUSY)

    def _admit(self, config: CellConfig) -> int:
        cell_id = next(i for i in range(1, len(self.cells) + 1) if i not in self.cells)
        root = self.cells[0]
        cpus = set(config.cpus)
        root.cpus -= cpus
        self._reset_stats(cpus)
        cell = Cell(cell_id, config.name, cpus, config)
        self.cells[cell_id] = cell
        self._announce_ivshmem(cell)
        self.hv_print(f'Created cell "{cell.name}"')
        self.hv_print(self._pool_line("cell creation"))
        self._write_cpus(root)
        self._rebuild_stats_dir(root)
        self.sysfs.publish_cell(cell_id, self._cell_files(cell))
        self._write_globals()
        self.dmesg(f'Created Jailhouse cell "{cell.name}"')
        return cell_id

    def _announce_ivshmem(self, cell: Cell) -> None:
        assert cell.config is not None
        for dev in cell.config.pci_devices:
            if dev.type != PCI_TYPE_IVSHMEM:
                continue
            bdf = dev.bdf
            self.hv_print(f'Adding virtual PCI device {bdf >> 8:02x}:{bdf >> 3 & 0x1f:02x}.{bdf & 7:x} to cell "{cell.name}"')
            peers = [c.name for c in self.cells.values() if c is not cell and self._has_ivshmem(c, bdf)]
            if peers:
                self.hv_print("Shared memory connection established, peer cells:")
                for peer in peers:
                    self.hv_print(f' "{peer}"')

    def _attach_netdevs(self, cell: Cell) -> None:
        """Give each of the cell's ivshmem-net links to the root its root-side netdev (a tap)."""
        if self.netdevs is None:
            return
        assert cell.config is not None
        root_bdfs = (bdf for bdf, _ in self.board.root.ivshmem_endpoints)
        links = veth_links(cell.config.pci_devices, root_bdfs)
        for link, error in self.netdevs.attach(cell.id, cell.name, links):
            self.dmesg(f"cannot register net device: {error.strerror or error}",
                       source=f"ivshmem-net {link.pci_name}")

    def _has_ivshmem(self, cell: Cell, bdf: int) -> bool:
        if cell.is_root:
            return any(b == bdf for b, _ in self.board.root.ivshmem_endpoints)
        assert cell.config is not None
        return any(d.type == PCI_TYPE_IVSHMEM and d.bdf == bdf for d in cell.config.pci_devices)

    # ---- load / shutdown / start / destroy ----------------------------------------------

    async def _set_loadable(self, cell: Cell) -> None:
        await self.runner.stop(cell)
        cell.failed_cpus.clear()
        self._write_cpus(cell)
        self.set_state(cell, SHUT_DOWN)
        if not cell.loadable:
            cell.loadable = True
            self.hv_print(f'Cell "{cell.name}" can be loaded')

    async def load(self, ref: CellRef, images: list[LoadedImage],
                   rcpu_images: list[tuple[str, int, bytes | None]] = ()) -> None:
        """``cell load`` (and, with no images, ``cell shutdown``)."""
        cell = self._lookup_non_root(ref)
        await self._set_loadable(cell)
        assert cell.config is not None
        for image in images:
            if not image.data:
                continue
            region = next((r for r in cell.config.memory_regions if r.contains_guest(image.address)), None)
            if region is None or region.flags & (MEM_WRITE | MEM_LOADABLE) != (MEM_WRITE | MEM_LOADABLE):
                raise HvError(errno.EINVAL)
            if len(image.data) > region.size - (image.address - region.virt_start):
                raise HvError(errno.EINVAL)
            cell.images.append(image)
        for name, rcpu, data in rcpu_images:
            if rcpu not in cell.config.rcpus:
                self.dmesg(f"rcpu ID {rcpu} not valid")
                raise HvError(errno.EINVAL)
            if data is None:
                self.dmesg(f"Direct firmware load for {name} failed with error -2")
                raise HvError(errno.ENOENT)
            cell.rcpu_images.append((name, rcpu, data))

    async def start(self, ref: CellRef) -> None:
        cell = self._lookup_non_root(ref)
        await self.runner.stop(cell)
        cell.loadable = False
        cell.failed_cpus.clear()
        self._write_cpus(cell)
        # The comm page is zeroed at start, so the state reads `running` again.
        cell.state = ""
        self.set_state(cell, RUNNING)
        self.hv_print(f'Started cell "{cell.name}"')
        self.runner.start(cell)

    async def destroy(self, ref: CellRef) -> None:
        cell = self._lookup_non_root(ref)
        if self._locked_cell(other_than=cell) is not None:
            raise HvError(errno.EPERM)
        await self._destroy(cell, announce=True)

    async def _destroy(self, cell: Cell, *, announce: bool) -> None:
        await self.runner.stop(cell, graceful=False)
        if self.netdevs is not None:
            self.netdevs.detach(cell.id)
        self.set_state(cell, SHUT_DOWN)
        self.hv_print(f'Closing cell "{cell.name}"')
        del self.cells[cell.id]
        self.sysfs.withdraw_cell(cell.id)
        root = self.cells[0]
        self._reset_stats(cell.cpus)
        root.cpus |= cell.cpus
        self.hv_print(self._pool_line("cell destruction"))
        self._write_cpus(root)
        self._rebuild_stats_dir(root)
        self._write_globals()
        self.dmesg(f'Destroyed Jailhouse cell "{cell.name}"')

    # ---- guest-facing facts --------------------------------------------------------------

    def uart_of(self, cell: Cell):
        """The board UART a cell's console goes to: its IO region covering a board UART.

        Returns ``(uart, guest_address)`` or ``(None, None)``.
        """
        assert cell.config is not None
        for region in cell.config.memory_regions:
            if region.flags & MEM_IO and not region.flags & MEM_COMM_REGION and region.size:
                uart = self.board.uart_at(region.phys_start, region.size)
                if uart is not None:
                    return uart, region.virt_start + (uart.address - region.phys_start)
        return None, None

    @staticmethod
    def virtual_console_permitted(cell: Cell) -> bool:
        assert cell.config is not None
        return bool(cell.config.flags & (CELL_VIRTUAL_CONSOLE_PERMITTED | CELL_VIRTUAL_CONSOLE_ACTIVE))
