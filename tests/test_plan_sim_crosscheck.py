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


# ---- the simulator's models of the real platforms (same names as the templates) ---------------

REAL_BOARDS = ("qemu-arm64", "zcu102", "zcu104", "kria-kv260")


@pytest.mark.parametrize("name", REAL_BOARDS)
def test_real_board_models_match_their_templates(name: str) -> None:
    platform = load_platform(name, TEMPLATES)
    board = sim_board.load_board(name)
    assert board.format == PROFILE_NAMES.get(platform.format, platform.format)
    assert (board.architecture, board.root.name) == (platform.architecture, platform.root_cell)
    assert platform.cell_cpu_set < set(board.root.cpus) == set(range(board.cpus))
    gic = (board.gic.version, board.gic.gicd, board.gic.gicr, board.gic.pin_base)
    assert gic == (platform.gic.version, platform.gic.gicd, platform.gic.gicr, platform.gic.pin_base)
    assert [(p.start, p.end) for p in platform.memory.pools] == [(board.cell_ram.start, board.cell_ram.end)]
    assert platform.ivshmem is not None and board.ivshmem is not None
    assert (board.ivshmem.base, board.ivshmem.window, board.ivshmem.pci_domain, board.ivshmem.vpci_irq_base) == (
        platform.ivshmem.base, platform.ivshmem.window, platform.ivshmem.domain, platform.ivshmem.vpci_irq_base
    )  # fmt: skip
    root_links = {bdf for bdf, dev in board.root.ivshmem_endpoints if dev == 0}
    assert {slot << 3 for slot in platform.ivshmem.slots} <= root_links
    comm = platform.comm_region
    assert (board.comm_region.guest_address, board.comm_region.size) == (comm.guest, comm.size)
    # every UART the template maps into cells is a board UART, on the line the template names
    board_uarts = {u.address: u.irq for u in board.uarts}
    assert all(board_uarts.get(u.phys) == (u.phys_irq or u.irq) for u in platform.uarts)
    assert {r.id for r in platform.rpus} <= set(range(board.rcpus))
    hv = board.hypervisor
    used = [(board.cell_ram.start, board.cell_ram.end), (hv.memory_start, hv.memory_start + hv.memory_size),
            (board.ivshmem.base, board.ivshmem.base + board.ivshmem.window * (max(platform.ivshmem.slots) + 1))]
    assert all(a_end <= b or b_end <= a for i, (a, a_end) in enumerate(used) for b, b_end in used[i + 1:])


@pytest.mark.parametrize("name", REAL_BOARDS)
def test_real_board_models_accept_the_cells_runphi_plans(tmp_path: Path, name: str) -> None:
    """runphi's planner for the template, the simulator's model of the board: every kind of
    cell is created, a script guest runs in one, and all are destroyed again."""
    testing = pytest.importorskip("tools.jailhouse_sim.testing")
    platform = load_platform(name, TEMPLATES)
    small = 16 << 20  # several cells fit the 128 MiB pools of the ZynqMP boards
    requests = {"plain": ResourceRequest(memory=small), "net": ResourceRequest(memory=small, network=True),
                "hvc": ResourceRequest(memory=small, console="hypervisor")}
    if platform.rpus:
        requests["rpu"] = ResourceRequest(memory=small, rpu=True)
    with testing.SimBoard.running(tmp_path / "sim", board=name) as sim:
        alloc = Allocator(platform, tmp_path / "state", sim.layout.sysfs)
        planned = {}
        for container, request in requests.items():
            cell = plan_cell(platform, alloc.allocate(container, request), None, container)
            path = tmp_path / f"{container}.cell"
            path.write_bytes(cc.write_cell(cell, platform.profile))
            sim.jailhouse("cell", "create", path).check()
            planned[container] = cell
        listed = sim.jailhouse("cell", "list").check().stdout
        assert all(f" {cell.name} " in listed for cell in planned.values())
        hvc = planned["hvc"]
        image = tmp_path / "guest.img"
        image.write_text("#!jailhouse-sim-inmate\nconsole planned\\n\nshutdown\n")
        sim.jailhouse("cell", "load", hvc.name, image, "-a", hex(hvc.cpu_reset_address)).check()
        sim.jailhouse("cell", "start", hvc.name).check()
        hvc_id = next(int(line.split()[0]) for line in listed.splitlines() if line.split()[1:2] == [hvc.name])
        sim.wait_state(hvc_id, "shut down")
        assert "Started cell \"hvc\"\nplanned\n" in sim.console()
        for cell in planned.values():
            sim.jailhouse("cell", "destroy", cell.name).check()
        assert sim.read_sysfs("cells/0/cpus_assigned_list") == f"0-{sim_board.load_board(name).cpus - 1}\n"
