"""The simulator's own .cell reader against the shipped vectors and built files."""

from __future__ import annotations

import errno

import pytest

from tools.jailhouse_sim.cellfile import (
    ARCH_ARM64,
    PROFILES,
    ArchitectureMismatch,
    ConfigRejected,
    check_signature,
    parse_cell,
)

from . import cells

FORK = PROFILES["runphi-fork-rev13"]


def test_profiles_have_the_documented_header_sizes():
    sizes = {name: p.header_size for name, p in PROFILES.items()}
    assert sizes == {"rev12": 132, "rev13": 132, "rev14": 132, "runphi-fork-rev13": 136, "omnivisor-rev14": 140}


def test_zephyr_demo_decodes_field_by_field(zephyr_demo):
    data = zephyr_demo.read_bytes()
    check_signature(data, FORK, ARCH_ARM64, system=False)
    cell = parse_cell(data, FORK)
    assert (cell.name, cell.flags, sorted(cell.cpus)) == ("qemu-arm64-zephyr-demo", 0x40000001, [0, 1])
    assert (cell.cpu_reset_address, cell.vpci_irq_base, cell.size) == (0x70000000, 108, 808)
    assert len(cell.memory_regions) == 13
    low_ram = cell.memory_regions[10]
    assert (low_ram.phys_start, low_ram.virt_start, low_ram.size, low_ram.flags) == (0x7F900000, 0, 0x10000, 0x47)
    assert cell.memory_regions[12].flags == 0x23 and cell.memory_regions[12].virt_start == 0x80000000
    assert cell.irqchips[0].pin_bitmap == (0x2, 0, 0, 0x3000)
    assert [(d.bdf, d.shmem_dev_id, d.shmem_peers) for d in cell.pci_devices] == [(0, 2, 3), (8, 1, 2)]
    assert (cell.console.address, cell.console.type, cell.console.flags) == (0x09000000, 3, 3)


@pytest.mark.parametrize("profile", ["rev14", "rev12", "omnivisor-rev14"])
def test_fork_file_is_rejected_by_other_profiles(zephyr_demo, profile):
    with pytest.raises(ConfigRejected) as rejected:
        check_signature(zephyr_demo.read_bytes(), PROFILES[profile], ARCH_ARM64, system=False)
    assert rejected.value.errno == errno.EINVAL


def test_rev14_architecture_mismatch_is_its_own_outcome(tmp_path):
    data = cells.encode(cells.runphi_cell("x86-cell", {1}, architecture=0), "rev14")
    with pytest.raises(ArchitectureMismatch):
        check_signature(data, PROFILES["rev14"], ARCH_ARM64, system=False)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_built_cells_round_trip_in_every_profile(profile):
    built = cells.runphi_cell("round-trip", {2, 3}, rcpus={0} if profile == "omnivisor-rev14" else set(),
                              ivshmem=[cells.Ivshmem(bdf=8, dev_id=1)])
    data = cells.encode(built, profile)
    check_signature(data, PROFILES[profile], ARCH_ARM64, system=False)
    cell = parse_cell(data, PROFILES[profile])
    assert cell.name == "round-trip" and cell.cpus == {2, 3} and cell.size == len(data)
    assert [r.virt_start for r in cell.memory_regions[:4]] == [0x09000000, 0, 0x70000000, 0x80000000]
    assert cell.pci_devices[0].shmem_regions_start == 4
    assert cell.rcpus == built.rcpus


def test_truncated_arrays_are_rejected(zephyr_demo):
    data = zephyr_demo.read_bytes()[:-10]
    with pytest.raises(ConfigRejected):
        parse_cell(data, FORK)


def test_short_file_is_not_a_cell_configuration():
    with pytest.raises(ConfigRejected) as rejected:
        check_signature(b"JHCELL\x0d\x00", FORK, ARCH_ARM64, system=False)
    assert rejected.value.log == "Not a cell configuration"


def test_name_is_cut_to_31_characters():
    cell = parse_cell(cells.encode(cells.runphi_cell("n" * 40, {1})), FORK)
    assert cell.name == "n" * 31
