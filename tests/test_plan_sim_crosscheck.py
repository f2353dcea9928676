"""Cross-check with the simulator: same board facts, and its own reader accepts our cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.allocator import Allocator, ResourceRequest
from runphi.backends.jailhouse.plan import plan_cell
from runphi.backends.jailhouse.platform import load_platform

sim_board = pytest.importorskip("tools.jailhouse_sim.board", reason="simulator package not present")
sim_cellfile = pytest.importorskip("tools.jailhouse_sim.cellfile", reason="simulator package not present")

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
# the two projects name the runPHI fork profile differently
PROFILE_NAMES = {"runphi-rev13": "runphi-fork-rev13"}


@pytest.fixture
def platform():
    return load_platform("sim-qemu-arm64", TEMPLATES)


@pytest.fixture
def board():
    return sim_board.load_board("sim-qemu-arm64")


def test_template_and_simulator_board_agree(platform, board) -> None:
    assert board.format == PROFILE_NAMES.get(platform.format, platform.format)
    assert board.architecture == platform.architecture
    assert board.root.name == platform.root_cell
    assert platform.cell_cpu_set < set(board.root.cpus)
    assert (board.gic.gicd, board.gic.gicr, board.gic.pin_base) == (platform.gic.gicd, platform.gic.gicr, platform.gic.pin_base)
    assert [(p.start, p.end) for p in platform.memory.pools] == [(board.cell_ram.start, board.cell_ram.end)]
    assert platform.ivshmem is not None
    assert (board.ivshmem.base, board.ivshmem.window, board.ivshmem.pci_domain, board.ivshmem.vpci_irq_base) == (
        platform.ivshmem.base, platform.ivshmem.window, platform.ivshmem.domain, platform.ivshmem.vpci_irq_base
    )  # fmt: skip
    assert (board.comm_region.guest_address, board.comm_region.size) == (platform.comm_region.guest, platform.comm_region.size)
    board_uarts = {u.address: u.irq for u in board.uarts if u.index > 0}
    assert board_uarts == {u.phys: u.phys_irq for u in platform.uarts}
    root_links = {bdf for bdf, dev in board.root.ivshmem_endpoints if dev == 0}
    assert {slot << 3 for slot in platform.ivshmem.slots} <= root_links


def test_simulator_reader_accepts_planned_cells(tmp_path: Path, platform, board) -> None:
    sysfs = tmp_path / "sysfs"
    (sysfs / "cells" / "0").mkdir(parents=True)
    (sysfs / "cells" / "0" / "cpus_assigned_list").write_text("0-7\n")
    alloc = Allocator(platform, tmp_path / "state", sysfs)
    for n in range(3):
        allocation = alloc.allocate(f"zic{n}", ResourceRequest(network=n < 2))
        ours = plan_cell(platform, allocation, None, allocation.container_id)
        data = cc.write_cell(ours, platform.profile)
        sim_cellfile.check_signature(data, board.profile, board.arch_code, system=False)
        theirs = sim_cellfile.parse_cell(data, board.profile)
        assert theirs.name == ours.name and theirs.cpus == ours.cpus and theirs.flags == ours.flags
        assert theirs.memory_regions == tuple(
            sim_cellfile.MemoryRegion(r.phys_start, r.virt_start, r.size, r.flags, r.colors) for r in ours.memory_regions
        )
        assert [c.pin_bitmap for c in theirs.irqchips] == [c.pin_bitmap for c in ours.irqchips]
        assert theirs.cpu_reset_address == ours.cpu_reset_address
        # the simulator routes the console by the UART region's physical address
        io = [r for r in theirs.memory_regions if r.flags & cc.MEM_IO]
        uart = board.uart_at(io[0].phys_start, io[0].size)
        assert uart is not None and uart.index == allocation.uart_slot + 1


def test_rev14_board_rejects_fork_cells(tmp_path: Path, platform) -> None:
    rev14 = sim_board.load_board("sim-qemu-arm64-rev14")
    data = cc.write_cell(cc.CellConfig(name="x", architecture=cc.Architecture.ARM64), platform.profile)
    with pytest.raises(sim_cellfile.ConfigRejected):
        sim_cellfile.check_signature(data, rev14.profile, rev14.arch_code, system=False)
    ok = cc.write_cell(cc.CellConfig(name="x", architecture=cc.Architecture.ARM64), cc.PROFILES["rev14"])
    sim_cellfile.check_signature(ok, rev14.profile, rev14.arch_code, system=False)
