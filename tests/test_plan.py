"""Cell planner: for every shipped platform, planned cells decode field by field as intended."""

from __future__ import annotations

from pathlib import Path

import pytest

from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.allocator import Allocator, ResourceRequest
from runphi.backends.jailhouse.errors import CellConfigError
from runphi.backends.jailhouse.names import cell_name
from runphi.backends.jailhouse.plan import irqchips_for, plan_cell
from runphi.backends.jailhouse.platform import MiB, Platform, available_platforms, load_platform
from runphi.image import BootDescription

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
PLATFORMS = available_platforms(TEMPLATES)


def make_allocator(tmp_path: Path, platform: Platform) -> Allocator:
    sysfs = tmp_path / "sysfs"
    (sysfs / "cells" / "0").mkdir(parents=True)
    (sysfs / "cells" / "0" / "cpus_assigned_list").write_text("0-7\n")
    return Allocator(platform, tmp_path / "state", sysfs)


def boot(**kw) -> BootDescription:
    return BootDescription(source=Path("/boot/config.json"), inmate=Path("/boot/boot.bin"), **kw)


def decoded(platform: Platform, config: cc.CellConfig) -> cc.CellConfig:
    """Write in the platform's profile and read back as that profile: what the hypervisor will see.

    Read with the profile named, as the hypervisor knows its own format: detection may
    rightly refuse an Omnivisor file whose bytes are also a valid upstream one.
    """
    return cc.read_cell(cc.write_cell(config, platform.profile), platform.profile)[1]


def regions_overlap(a: cc.MemoryRegion, b: cc.MemoryRegion, attr: str) -> bool:
    sa, sb = getattr(a, attr), getattr(b, attr)
    return a.size > 0 and b.size > 0 and sa < sb + b.size and sb < sa + a.size


def owned_ram(config: cc.CellConfig) -> list[cc.MemoryRegion]:
    """Regions holding the cell's private RAM (not shared, not IO, not comm)."""
    shared = cc.MEM_ROOTSHARED | cc.MEM_IO | cc.MEM_COMM_REGION
    return [r for r in config.memory_regions if r.size and not r.flags & shared and not r.flags & (cc.MEM_TCM_A | cc.MEM_TCM_B)]


@pytest.mark.parametrize("name", PLATFORMS)
def test_two_planned_cells_decode_as_intended(name: str, tmp_path: Path) -> None:
    platform = load_platform(name, TEMPLATES)
    alloc = make_allocator(tmp_path, platform)
    network = platform.ivshmem is not None
    a1 = alloc.allocate("first", ResourceRequest(memory=16 * MiB, network=network))
    a2 = alloc.allocate("second", ResourceRequest(memory=16 * MiB, network=network))
    c1 = decoded(platform, plan_cell(platform, a1, None, "first"))
    c2 = decoded(platform, plan_cell(platform, a2, None, "second"))

    for cell, allocation in ((c1, a1), (c2, a2)):
        assert cell.name == allocation.container_id
        assert cell.cpus == allocation.cpus and cell.cpus <= platform.cell_cpu_set
        assert cell.flags == platform.cell_flag_bits
        if platform.profile.has_architecture:
            assert cell.architecture == cc.Architecture.ARM64
        # UART: mapped phys slot -> guest address, its IRQ in the bitmap, console at the guest address
        uart = platform.uarts[allocation.uart_slot or 0]
        uart_regions = [r for r in cell.memory_regions if r.flags & cc.MEM_IO]
        assert uart_regions == [
            cc.MemoryRegion(phys_start=uart.phys, virt_start=uart.guest, size=uart.size,
                            flags=cc.MEM_READ | cc.MEM_WRITE | cc.MEM_IO | cc.MEM_ROOTSHARED)
        ]
        irqs = {irq for chip in cell.irqchips for irq in chip.irqs()}
        assert uart.irq in irqs
        assert all(chip.address == platform.gic.gicd for chip in cell.irqchips)
        assert cell.console.address == uart.guest and cell.console.type == uart.console().type
        # RAM inside the pool, sized as requested, at the layout's guest addresses
        ram = owned_ram(cell)
        pool = platform.memory.pools[0]
        assert all(pool.start <= r.phys_start and r.phys_start + r.size <= pool.end for r in ram)
        main = [r for r in ram if r.flags & cc.MEM_DMA]
        assert len(main) == 1 and main[0].size == 16 * MiB and main[0].virt_start == platform.memory.main_ram_guest
        assert main[0].flags == cc.MEM_READ | cc.MEM_WRITE | cc.MEM_EXECUTE | cc.MEM_DMA | cc.MEM_LOADABLE
        if platform.memory.convention == "qemu":
            low = [r for r in ram if not r.flags & cc.MEM_DMA]
            assert [(r.virt_start, r.size) for r in low] == [(0, platform.memory.low_ram_size)]
        # comm region last, at the platform address
        comm = cell.memory_regions[-1]
        assert comm.flags == cc.MEM_READ | cc.MEM_WRITE | cc.MEM_COMM_REGION
        assert comm.virt_start == platform.comm_region.guest
        # no region overlaps another inside the cell, physically or virtually
        for i, r in enumerate(cell.memory_regions):
            for other in cell.memory_regions[i + 1 :]:
                assert not regions_overlap(r, other, "virt_start")
                if not r.flags & cc.MEM_COMM_REGION and not other.flags & cc.MEM_COMM_REGION:
                    assert not regions_overlap(r, other, "phys_start")
        assert cell.cpu_reset_address == platform.default_reset_address
        # networking: one ivshmem VETH link, its INTx in the bitmap, its regions where it says
        if network:
            assert platform.ivshmem is not None
            (dev,) = cell.pci_devices
            slot = allocation.ivshmem_slot
            assert slot is not None
            assert (dev.type, dev.domain, dev.bdf) == (cc.PCI_TYPE_IVSHMEM, platform.ivshmem.domain, slot << 3)
            assert (dev.shmem_dev_id, dev.shmem_peers, dev.shmem_protocol) == (1, 2, cc.SHMEM_PROTO_VETH)
            state = cell.memory_regions[dev.shmem_regions_start]
            assert state.phys_start == platform.ivshmem.window_of(slot)
            assert cell.memory_regions[dev.shmem_regions_start + 3].flags & cc.MEM_WRITE
            assert not cell.memory_regions[dev.shmem_regions_start + 2].flags & cc.MEM_WRITE
            assert platform.ivshmem.intx_irq(slot) in irqs
            assert cell.vpci_irq_base == platform.ivshmem.vpci_irq_base

    # the two cells share nothing private
    assert not c1.cpus & c2.cpus
    for r1 in owned_ram(c1):
        for r2 in owned_ram(c2):
            assert not regions_overlap(r1, r2, "phys_start")
    if platform.per_cell_uarts and len(platform.uarts) > 1:
        assert a1.uart_slot != a2.uart_slot
    if network:
        assert c1.pci_devices[0].bdf != c2.pci_devices[0].bdf


def test_sim_cell_second_link_uses_irq_142(tmp_path: Path) -> None:
    platform = load_platform("sim-qemu-arm64", TEMPLATES)
    alloc = make_allocator(tmp_path, platform)
    alloc.allocate("one", ResourceRequest(network=True))
    two = alloc.allocate("two", ResourceRequest(network=True))
    cell = plan_cell(platform, two, None, "two")
    assert two.ivshmem_slot == 2
    assert cell.irqchips[0].irqs() == [33, 142]
    assert cell.memory_regions[4].phys_start == 0x09002000 and cell.memory_regions[4].virt_start == 0x09000000


def test_reset_address_comes_from_the_boot_description(tmp_path: Path) -> None:
    platform = load_platform("sim-qemu-arm64", TEMPLATES)
    allocation = make_allocator(tmp_path, platform).allocate("z", ResourceRequest())
    assert plan_cell(platform, allocation, boot(starting_vaddress=0x70001000), "z").cpu_reset_address == 0x70001000
    assert plan_cell(platform, allocation, boot(), "z").cpu_reset_address == 0x70000000


def test_rpu_cell_maps_its_tcm(tmp_path: Path) -> None:
    platform = load_platform("zcu104", TEMPLATES)
    alloc = make_allocator(tmp_path, platform)
    alloc.allocate("first", ResourceRequest(rpu=True, memory=4 * MiB))
    allocation = alloc.allocate("second", ResourceRequest(rpu=True, memory=4 * MiB))
    cell = decoded(platform, plan_cell(platform, allocation, boot(rpu_req=True), "second"))
    assert cell.cpus == frozenset() and cell.rcpus == {1}
    tcm = [r for r in cell.memory_regions if r.flags & (cc.MEM_TCM_A | cc.MEM_TCM_B)]
    assert [r.phys_start for r in tcm] == [0xFFE90000, 0xFFEB0000]


def test_long_ids_get_a_deterministic_31_byte_name() -> None:
    long_id = "k8s-pod-" + "a" * 64
    name = cell_name(long_id)
    assert len(name) == 31 and name == cell_name(long_id)
    assert name.startswith("k8s-pod-aaaaaaaaaaaa-")
    assert cell_name(long_id + "b") != name
    assert cell_name("x" * 31) == "x" * 31


def test_irqs_beyond_128_pins_get_a_second_chip() -> None:
    platform = load_platform("sim-qemu-arm64", TEMPLATES)
    chips = irqchips_for({33, 200}, platform, "c")
    assert [(c.pin_base, c.irqs()) for c in chips] == [(32, [33]), (160, [200])]
    with pytest.raises(CellConfigError, match="IRQ 20 is below the GIC pin base 32"):
        irqchips_for({20}, platform, "c")
