"""Cell planner: (platform, allocation, boot description, container id) -> CellConfig.

Pure and fast: no I/O. The result is what `create` writes with `write_cell` and what
`runphi cell-config` shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.errors import CellConfigError
from runphi.backends.jailhouse.names import cell_name
from runphi.backends.jailhouse.platform import Platform
from runphi.backends.ledger import Allocation

if TYPE_CHECKING:
    from runphi.image import BootDescription

RAM_FLAGS = cc.MEM_READ | cc.MEM_WRITE | cc.MEM_EXECUTE | cc.MEM_DMA | cc.MEM_LOADABLE
LOW_RAM_FLAGS = cc.MEM_READ | cc.MEM_WRITE | cc.MEM_EXECUTE | cc.MEM_LOADABLE
UART_FLAGS = cc.MEM_READ | cc.MEM_WRITE | cc.MEM_IO | cc.MEM_ROOTSHARED
COMM_FLAGS = cc.MEM_READ | cc.MEM_WRITE | cc.MEM_COMM_REGION
TCM_FLAGS = {"TCM_A": cc.MEM_TCM_A, "TCM_B": cc.MEM_TCM_B}
IRQS_PER_CHIP = 128
IVSHMEM_NET_PEERS = 2
IVSHMEM_CELL_DEV_ID = 1  # the root cell is peer 0 of every link


def ivshmem_net_regions(base: int, dev_id: int) -> list[cc.MemoryRegion]:
    """The four regions of a two-peer virtual-ethernet link (JAILHOUSE_SHMEM_NET_REGIONS)."""
    ro = cc.MEM_READ | cc.MEM_ROOTSHARED
    return [
        cc.MemoryRegion(phys_start=base, virt_start=base, size=0x1000, flags=ro),
        cc.MemoryRegion(phys_start=0, virt_start=0, size=0, flags=0),
        cc.MemoryRegion(phys_start=base + 0x1000, virt_start=base + 0x1000, size=0x7F000,
                        flags=ro | (cc.MEM_WRITE if dev_id == 0 else 0)),
        cc.MemoryRegion(phys_start=base + 0x80000, virt_start=base + 0x80000, size=0x7F000,
                        flags=ro | (cc.MEM_WRITE if dev_id == 1 else 0)),
    ]


def irqchips_for(irqs: set[int], platform: Platform, cell: str) -> tuple[cc.IrqChip, ...]:
    """Irqchip entries whose bitmaps give exactly `irqs` to the cell (128 pins per entry)."""
    base = platform.gic.pin_base
    chips: dict[int, list[int]] = {}
    for irq in sorted(irqs):
        if irq < base:
            raise CellConfigError(f"cell {cell!r}: IRQ {irq} is below the GIC pin base {base} and cannot be assigned")
        index, pin = divmod(irq - base, IRQS_PER_CHIP)
        words = chips.setdefault(index, [0, 0, 0, 0])
        words[pin // 32] |= 1 << (pin % 32)
    return tuple(
        cc.IrqChip(address=platform.gic.gicd, id=0, pin_base=base + IRQS_PER_CHIP * index,
                   pin_bitmap=(words[0], words[1], words[2], words[3]))
        for index, words in sorted(chips.items())
    )


#: The lessee of the hypervisor console may (and should) write to it with the hypercall.
HYPERVISOR_CONSOLE_FLAGS = cc.CELL_VIRTUAL_CONSOLE_PERMITTED | cc.CELL_VIRTUAL_CONSOLE_ACTIVE


def plan_cell(platform: Platform, allocation: Allocation, boot: BootDescription | None, container_id: str) -> cc.CellConfig:
    """The full cell configuration for `container_id` on `platform` with `allocation`.

    Regions in order: ivshmem link (when networking), UART (phys slot -> guest address),
    RAM (low RAM first under the `qemu` convention), RPU TCMs, comm region. The irqchip
    bitmap holds the UART's IRQ and the link's INTx. The reset address is the boot
    description's `starting_vaddress`, else the platform default.
    """
    name = cell_name(container_id)
    regions: list[cc.MemoryRegion] = []
    pci: list[cc.PciDevice] = []
    irqs: set[int] = set()
    ivshmem = platform.ivshmem
    if allocation.ivshmem_slot is not None:
        if ivshmem is None:
            raise CellConfigError(f"cell {name!r}: a network link was allocated but {platform.name} has no ivshmem")
        pci.append(
            cc.PciDevice(
                type=cc.PCI_TYPE_IVSHMEM, domain=ivshmem.domain, bdf=allocation.ivshmem_slot << 3,
                bar_mask=cc.IVSHMEM_BAR_MASK_INTX, shmem_regions_start=len(regions),
                shmem_dev_id=IVSHMEM_CELL_DEV_ID, shmem_peers=IVSHMEM_NET_PEERS, shmem_protocol=cc.SHMEM_PROTO_VETH,
            )  # fmt: skip
        )
        regions += ivshmem_net_regions(ivshmem.window_of(allocation.ivshmem_slot), IVSHMEM_CELL_DEV_ID)
        irqs.add(ivshmem.intx_irq(allocation.ivshmem_slot))
    console = cc.Console()
    # A per-cell UART only with a slot (a ZIC on the hypervisor console, or with none, has
    # none); a shared one is every cell's.
    if platform.uarts and (allocation.uart_slot is not None or not platform.per_cell_uarts):
        uart = platform.uarts[allocation.uart_slot if allocation.uart_slot is not None else 0]
        regions.append(cc.MemoryRegion(phys_start=uart.phys, virt_start=uart.guest, size=uart.size, flags=UART_FLAGS))
        irqs.add(uart.irq)
        console = uart.console()
    regions += _ram_regions(platform, allocation)
    for rpu in platform.rpus:
        if rpu.id in allocation.rpus:
            regions += [
                cc.MemoryRegion(phys_start=t.phys, virt_start=t.guest, size=t.size, flags=LOW_RAM_FLAGS | TCM_FLAGS[t.flag])
                for t in rpu.tcm
            ]
    comm = platform.comm_region
    regions.append(cc.MemoryRegion(phys_start=0, virt_start=comm.guest, size=comm.size, flags=COMM_FLAGS))
    reset = boot.starting_vaddress if boot is not None and boot.starting_vaddress is not None else None
    return cc.CellConfig(
        name=name,
        flags=platform.cell_flag_bits | (HYPERVISOR_CONSOLE_FLAGS if allocation.hypervisor_console else 0),
        architecture=platform.arch,
        cpus=allocation.cpus,
        rcpus=allocation.rpus,
        memory_regions=tuple(regions),
        irqchips=irqchips_for(irqs, platform, name),
        pci_devices=tuple(pci),
        vpci_irq_base=ivshmem.vpci_irq_base if ivshmem is not None else 0,
        cpu_reset_address=platform.default_reset_address if reset is None else reset,
        console=console,
    )


def _ram_regions(platform: Platform, allocation: Allocation) -> list[cc.MemoryRegion]:
    """Main RAM (and low RAM under the `qemu` convention) carved from `allocation.ram`."""
    layout = platform.memory
    main = cc.MemoryRegion(
        phys_start=allocation.ram.start, virt_start=layout.main_ram_guest, size=allocation.main_ram_size, flags=RAM_FLAGS
    )
    if layout.convention != "qemu":
        return [main]
    low = cc.MemoryRegion(
        phys_start=allocation.ram.start + allocation.main_ram_size, virt_start=0, size=layout.low_ram_size,
        flags=LOW_RAM_FLAGS,
    )  # fmt: skip
    return [low, main]


def check_image_fits(config: cc.CellConfig, address: int, size: int, what: str) -> None:
    """Raise CellConfigError unless [address, address + size) lies in one loadable region.

    Checked before `cell load` so an oversized image is refused with its size
    instead of being streamed into the hypervisor (which would fail late, or hang).
    """
    for region in config.memory_regions:
        if region.flags & cc.MEM_LOADABLE and region.virt_start <= address \
                and address + size <= region.virt_start + region.size:
            return
    room = [r for r in config.memory_regions
            if r.flags & cc.MEM_LOADABLE and r.virt_start <= address < r.virt_start + r.size]
    where = (f"only {room[0].virt_start + room[0].size - address} bytes of cell RAM follow {address:#x}"
             if room else f"no cell RAM is mapped at {address:#x}")
    raise CellConfigError(f"{what} is {size} bytes, larger than the room it is loaded into: {where}")
