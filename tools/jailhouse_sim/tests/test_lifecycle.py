"""The simulated driver/hypervisor: every applicable row of jailhouse.md §1.7 and
the ten facts of §7, observed only through the CLI, sysfs and the console."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tools.jailhouse_sim.cellfile import PROFILES, minimal_system_config
from tools.jailhouse_sim.testing import SimBoard

from . import cells

CREATE_EINVAL = "JAILHOUSE_CELL_CREATE: Invalid argument\n"


def create(sim: SimBoard, tmp_path: Path, cell: cells.Cell, profile: str = "runphi-fork-rev13"):
    return sim.jailhouse("cell", "create", cells.write(tmp_path, cell, profile))


def fails(result, stderr: str) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (1, "", stderr)


def silent_success(result) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def script(tmp_path: Path, body: str, name: str = "guest") -> Path:
    path = tmp_path / name
    path.write_text("#!jailhouse-sim-inmate\n" + body)
    return path


# ---- §1.7: enable / disable -------------------------------------------------------------------


def test_enable_while_enabled_is_ebusy(jailhouse_sim):
    config = jailhouse_sim.layout.system_config("sim-qemu-arm64")
    fails(jailhouse_sim.jailhouse("enable", config), "JAILHOUSE_ENABLE: Device or resource busy\n")


def test_enable_rejects_non_system_config_and_wrong_revision(tmp_path, zephyr_demo):
    with SimBoard.running(tmp_path / "sim", enabled=False) as sim:
        fails(sim.jailhouse("enable", zephyr_demo), "JAILHOUSE_ENABLE: Invalid argument\n")
        assert "jailhouse: Not a system configuration" in sim.kernel_log()
        wrong_rev = tmp_path / "rev12.cell"
        wrong_rev.write_bytes(b"JHSYST" + struct.pack("<HI", 12, 1))
        fails(sim.jailhouse("enable", wrong_rev), "JAILHOUSE_ENABLE: Invalid argument\n")
        assert "jailhouse: Configuration revision mismatch" in sim.kernel_log()
        assert sim.read_sysfs("enabled") == "0\n"
        silent_success(sim.jailhouse("enable", sim.layout.system_config("sim-qemu-arm64")))
        assert sim.read_sysfs("enabled") == "1\n"
        assert sim.read_sysfs("cells/0/name") == "sim-qemu-arm64\n"
        assert "The Jailhouse is opening." in sim.kernel_log()


def test_enable_architecture_mismatch_is_einval(tmp_path):
    with SimBoard.running(tmp_path / "sim", "sim-qemu-arm64-rev14", enabled=False) as sim:
        x86 = tmp_path / "x86.cell"
        x86.write_bytes(minimal_system_config(PROFILES["rev14"], 0))
        fails(sim.jailhouse("enable", x86), "JAILHOUSE_ENABLE: Invalid argument\n")
        assert "Configuration architecture mismatch" in sim.kernel_log()


def test_disable_while_disabled_is_einval(tmp_path):
    with SimBoard.running(tmp_path / "sim", enabled=False) as sim:
        fails(sim.jailhouse("disable"), "JAILHOUSE_DISABLE: Invalid argument\n")


def test_cell_calls_while_disabled_are_einval(tmp_path, zephyr_demo):
    with SimBoard.running(tmp_path / "sim", enabled=False) as sim:
        fails(sim.jailhouse("cell", "create", zephyr_demo), CREATE_EINVAL)
        fails(sim.jailhouse("cell", "start", "1"), "JAILHOUSE_CELL_START: Invalid argument\n")
        fails(sim.jailhouse("cell", "shutdown", "x"), "JAILHOUSE_CELL_LOAD: Invalid argument\n")
        fails(sim.jailhouse("cell", "load", "x", "-s", "a"), "JAILHOUSE_CELL_LOAD: Invalid argument\n")
        fails(sim.jailhouse("cell", "destroy", "1"), "JAILHOUSE_CELL_DESTROY: Invalid argument\n")


# ---- §1.7: create -------------------------------------------------------------------------------


def test_create_rejects_bad_signature_and_short_files(jailhouse_sim, tmp_path):
    junk = tmp_path / "junk.cell"
    junk.write_bytes(b"not a cell at all" * 20)
    fails(jailhouse_sim.jailhouse("cell", "create", junk), CREATE_EINVAL)
    short = tmp_path / "short.cell"
    short.write_bytes(b"JHCELL\x0d\x00")
    fails(jailhouse_sim.jailhouse("cell", "create", short), CREATE_EINVAL)
    assert jailhouse_sim.kernel_log().count("jailhouse: Not a cell configuration") == 2
    assert not jailhouse_sim.sysfs_path("cells/1").exists()


def test_create_rejects_other_revisions(jailhouse_sim, tmp_path):
    fails(create(jailhouse_sim, tmp_path, cells.runphi_cell("r12", {1}), "rev12"), CREATE_EINVAL)
    assert "jailhouse: Configuration revision mismatch" in jailhouse_sim.kernel_log()


def test_runphi_vectors_create_on_the_fork_board(jailhouse_sim, vectors):
    for vector in ("zephyr-demo", "linux-demo"):
        # These two share ivshmem endpoints; create each on a clean board.
        silent_success(jailhouse_sim.jailhouse("cell", "create", vectors / f"runphi-fork-rev13-qemu-arm64-{vector}.cell"))
        silent_success(jailhouse_sim.jailhouse("cell", "destroy", "1"))


def test_runphi_vectors_are_rejected_by_a_rev14_board(tmp_path, vectors):
    with SimBoard.running(tmp_path / "sim", "sim-qemu-arm64-rev14") as sim:
        for vector in sorted(vectors.glob("runphi-fork-rev13-*.cell")):
            fails(sim.jailhouse("cell", "create", vector), CREATE_EINVAL)
        assert sim.jailhouse("cell", "list").stdout.count("\n") == 2
        # The same cell in the board's own format is fine.
        silent_success(create(sim, tmp_path, cells.runphi_cell("upstream", {1}), "rev14"))


def test_create_architecture_mismatch_returns_0_and_creates_nothing(tmp_path):
    with SimBoard.running(tmp_path / "sim", "sim-qemu-arm64-rev14") as sim:
        silent_success(create(sim, tmp_path, cells.runphi_cell("x86", {1}, architecture=0), "rev14"))
        assert not sim.sysfs_path("cells/1").exists()
        assert "jailhouse: Configuration architecture mismatch" in sim.kernel_log()
        assert sim.read_sysfs("cells/0/cpus_assigned_list") == "0-7\n"


def test_create_name_collision_is_eexist(jailhouse_sim, tmp_path):
    silent_success(create(jailhouse_sim, tmp_path, cells.runphi_cell("twin", {1})))
    fails(create(jailhouse_sim, tmp_path, cells.runphi_cell("twin", {2})), "JAILHOUSE_CELL_CREATE: File exists\n")


def test_create_with_cpus_not_owned_by_root_is_ebusy(jailhouse_sim, tmp_path, vectors):
    silent_success(jailhouse_sim.jailhouse("cell", "create", vectors / "runphi-fork-rev13-qemu-arm64-zephyr-demo.cell"))
    busy = "JAILHOUSE_CELL_CREATE: Device or resource busy\n"
    # inmate-demo wants CPU 1, which the zephyr demo holds (jailhouse.md §6.1).
    fails(jailhouse_sim.jailhouse("cell", "create", vectors / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell"), busy)
    fails(create(jailhouse_sim, tmp_path, cells.runphi_cell("beyond", {9})), busy)
    assert not jailhouse_sim.sysfs_path("cells/2").exists()


def test_a_locked_cell_blocks_create_and_destroy_of_others(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    silent_success(create(sim, tmp_path, cells.runphi_cell("other", {2}, uart=2)))
    silent_success(create(sim, tmp_path, cells.runphi_cell("locker", {1})))
    sim.jailhouse("cell", "load", "locker", script(tmp_path, "lock\n"), "-a", "0x70000000").check()
    sim.jailhouse("cell", "start", "locker").check()
    sim.wait_state(2, "running/locked")
    fails(create(sim, tmp_path, cells.runphi_cell("third", {3})), "JAILHOUSE_CELL_CREATE: Operation not permitted\n")
    fails(sim.jailhouse("cell", "destroy", "other"), "JAILHOUSE_CELL_DESTROY: Operation not permitted\n")
    # The locked cell itself can still be shut down and destroyed (passive comm region).
    silent_success(sim.jailhouse("cell", "shutdown", "locker"))
    silent_success(sim.jailhouse("cell", "destroy", "other"))


def test_ivshmem_endpoint_clash_is_ebusy_and_matched_by_bdf_only(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    silent_success(create(sim, tmp_path, cells.runphi_cell("a", {1}, ivshmem=[cells.Ivshmem(bdf=0x08, dev_id=1)])))
    fails(create(sim, tmp_path, cells.runphi_cell("b", {2}, ivshmem=[cells.Ivshmem(bdf=0x08, dev_id=1)])),
          "JAILHOUSE_CELL_CREATE: Device or resource busy\n")
    # The root cell holds dev 0 of every link.
    fails(create(sim, tmp_path, cells.runphi_cell("c", {2}, ivshmem=[cells.Ivshmem(bdf=0x10, dev_id=0)])),
          "JAILHOUSE_CELL_CREATE: Device or resource busy\n")
    silent_success(create(sim, tmp_path, cells.runphi_cell("d", {2}, ivshmem=[cells.Ivshmem(bdf=0x08, dev_id=2)])))
    assert 'Shared memory connection established, peer cells:\n "sim-qemu-arm64"\n "a"\n' in sim.console()


def test_bad_irqchip_and_short_ivshmem_regions_are_einval(jailhouse_sim, tmp_path):
    fails(create(jailhouse_sim, tmp_path, cells.runphi_cell("pin", {1}, pin_base=40)), CREATE_EINVAL)
    cell = cells.runphi_cell("few", {1}, ivshmem=[cells.Ivshmem(bdf=0x08, dev_id=1)])
    data = bytearray(cells.encode(cell))
    # Claim the shared-memory regions start past the end of the region list.
    pci_at = len(data) - 56
    struct.pack_into("<I", data, pci_at + 48, 7)
    bad = tmp_path / "few.cell"
    bad.write_bytes(bytes(data))
    fails(jailhouse_sim.jailhouse("cell", "create", bad), CREATE_EINVAL)
    fails(create(jailhouse_sim, tmp_path, cells.runphi_cell("devid", {1}, ivshmem=[cells.Ivshmem(0x08, 12)])),
          CREATE_EINVAL)


# ---- §1.7: load / start / shutdown / destroy ------------------------------------------------


def test_unknown_cells_are_enoent(jailhouse_sim):
    fails(jailhouse_sim.jailhouse("cell", "load", "nope", "-s", "x"), "JAILHOUSE_CELL_LOAD: No such file or directory\n")
    fails(jailhouse_sim.jailhouse("cell", "shutdown", "3"), "JAILHOUSE_CELL_LOAD: No such file or directory\n")
    fails(jailhouse_sim.jailhouse("cell", "start", "nope"), "JAILHOUSE_CELL_START: No such file or directory\n")
    fails(jailhouse_sim.jailhouse("cell", "destroy", "9"), "JAILHOUSE_CELL_DESTROY: No such file or directory\n")


def test_root_cell_operations_are_einval(jailhouse_sim):
    for argv, name in ((("load", "0", "-s", "x"), "LOAD"), (("shutdown", "sim-qemu-arm64"), "LOAD"),
                       (("start", "0"), "START"), (("destroy", "0"), "DESTROY")):
        fails(jailhouse_sim.jailhouse("cell", *argv), f"JAILHOUSE_CELL_{name}: Invalid argument\n")


def test_load_address_rules(jailhouse_sim, tmp_path):
    """§7.8: guest addresses, default 0, first region, WRITE|LOADABLE, must fit."""
    sim = jailhouse_sim
    silent_success(create(sim, tmp_path, cells.runphi_cell("ld", {1}, ram_size=0x100000)))
    einval = "JAILHOUSE_CELL_LOAD: Invalid argument\n"
    image = tmp_path / "img"
    image.write_bytes(b"\xaa" * 0x100)
    silent_success(sim.jailhouse("cell", "load", "ld", image))                       # default 0: low RAM
    silent_success(sim.jailhouse("cell", "load", "ld", image, "-a", "0x70000000"))
    silent_success(sim.jailhouse("cell", "load", "ld", "-s", "x" * 0xFF, "-a", "0xff00"))  # 0x100 with NUL: fits
    fails(sim.jailhouse("cell", "load", "ld", "-s", "x" * 0x100, "-a", "0xff00"), einval)  # NUL overflows
    fails(sim.jailhouse("cell", "load", "ld", image, "-a", "0x50010000"), einval)   # a physical address
    fails(sim.jailhouse("cell", "load", "ld", image, "-a", "0x09000000"), einval)   # UART: not LOADABLE
    fails(sim.jailhouse("cell", "load", "ld", image, "-a", "0x80000000"), einval)   # comm region
    fails(sim.jailhouse("cell", "load", "ld", image, "-a", "0x700fff80"), einval)   # does not fit
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    silent_success(sim.jailhouse("cell", "load", "ld", empty, "-a", "0x12345678"))  # zero-length: skipped


# ---- §7 facts ---------------------------------------------------------------------------------


def test_fact1_shutdown_is_a_load_with_zero_images(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    silent_success(create(sim, tmp_path, cells.runphi_cell("s", {1})))
    assert 'Cell "s" can be loaded' not in sim.console()
    silent_success(sim.jailhouse("cell", "shutdown", "s"))          # from `shut down` (fresh)
    assert sim.console().count('Cell "s" can be loaded') == 1
    silent_success(sim.jailhouse("cell", "shutdown", "s"))          # already loadable: no new line
    assert sim.console().count('Cell "s" can be loaded') == 1
    silent_success(sim.jailhouse("cell", "start", "s"))
    assert sim.state(1) == "running"
    silent_success(sim.jailhouse("cell", "shutdown", "s"))          # from running
    assert sim.state(1) == "shut down"
    assert sim.console().count('Cell "s" can be loaded') == 2
    sim.jailhouse("cell", "load", "s", script(tmp_path, "fault\n"), "-a", "0x70000000").check()
    sim.jailhouse("cell", "start", "s").check()
    sim.wait_state(1, "failed")
    silent_success(sim.jailhouse("cell", "shutdown", "s"))          # from failed
    assert sim.state(1) == "shut down" and sim.read_sysfs("cells/1/cpus_failed_list") == "\n"
    fails(sim.jailhouse("cell", "shutdown", "gone"), "JAILHOUSE_CELL_LOAD: No such file or directory\n")


def test_fact2_states_fresh_cell_and_load_stops_a_running_cell(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    silent_success(create(sim, tmp_path, cells.runphi_cell("st", {1})))
    assert sim.state(1) == "shut down"
    silent_success(sim.jailhouse("cell", "start", "st"))   # start without load is allowed
    assert sim.state(1) == "running"
    # A load whose image copy fails still leaves the cell stopped.
    fails(sim.jailhouse("cell", "load", "st", "-s", "x", "-a", "0x09000000"), "JAILHOUSE_CELL_LOAD: Invalid argument\n")
    assert sim.state(1) == "shut down"
    sim.jailhouse("cell", "load", "st", script(tmp_path, "comm-abi-mismatch\n"), "-a", "0x70000000").check()
    sim.jailhouse("cell", "start", "st").check()
    sim.wait_state(1, "Comm ABI mismatch")
    sim.jailhouse("cell", "load", "st", script(tmp_path, "lock\nunlock\nhalt\n"), "-a", "0x70000000").check()
    sim.jailhouse("cell", "start", "st").check()
    sim.wait_state(1, "running")


def test_fact5_ids_lowest_free_and_reused(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    for n in (1, 2, 3):
        silent_success(create(sim, tmp_path, cells.runphi_cell(f"id{n}", {n}, uart=n)))
    silent_success(sim.jailhouse("cell", "destroy", "1"))
    assert not sim.sysfs_path("cells/1").exists()
    silent_success(create(sim, tmp_path, cells.runphi_cell("again", {4})))
    assert sim.read_sysfs("cells/1/name") == "again\n"
    silent_success(create(sim, tmp_path, cells.runphi_cell("next", {5})))
    assert sim.read_sysfs("cells/4/name") == "next\n"


def test_fact9_console_ring_rules(tmp_path):
    with SimBoard.running(tmp_path / "sim", enabled=False) as sim:
        fails(sim.jailhouse("console"), "read(console): Resource temporarily unavailable\n")
        assert sim.read_sysfs("console") == ""
        sim.jailhouse("enable", sim.layout.system_config("sim-qemu-arm64")).check()
        first = sim.jailhouse("console").check().stdout
        assert first.startswith("\nInitializing Jailhouse hypervisor") and first.endswith("Activating hypervisor\n")
        # Overflow the 2048-byte ring with cell lifecycle messages.
        for n in range(20):
            create(sim, tmp_path, cells.runphi_cell(f"console-filler-{n:02}", {1})).check()
            sim.jailhouse("cell", "destroy", "1").check()
        out = sim.jailhouse("console").check().stdout
        missed, rest = out.split("\n", 1)
        assert missed.startswith("<missed ") and missed.endswith(" bytes of console log>")
        assert len(rest.encode()) == 2048 and rest == sim.read_sysfs("console")
        sim.jailhouse("disable").check()
        final = sim.jailhouse("console").check().stdout
        assert final.endswith("Shutting down hypervisor\n" + "".join(f" Releasing CPU {c}\n" for c in range(8)))
        # The saved log is replayed once per reader; each new `jailhouse console` is a new reader.
        assert sim.jailhouse("console").stdout == final


def test_fact10_disable_destroys_everything_and_cpus_return(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    silent_success(create(sim, tmp_path, cells.runphi_cell("p", {0, 3})))
    silent_success(create(sim, tmp_path, cells.runphi_cell("q", {5}, uart=2)))
    assert sim.read_sysfs("cells/0/cpus_assigned_list") == "1-2,4,6-7\n"
    assert sim.read_sysfs("cells/0/cpus_assigned") == "d6\n"
    assert sim.read_sysfs("cells/1/cpus_assigned") == "09\n"
    assert sorted(p.name for p in sim.sysfs_path("cells/1/statistics").iterdir() if p.is_dir()) == ["cpu0", "cpu3"]
    sim.jailhouse("cell", "load", "q", script(tmp_path, "lock\n"), "-a", "0x70000000").check()
    sim.jailhouse("cell", "start", "q").check()
    sim.wait_state(2, "running/locked")
    silent_success(sim.jailhouse("cell", "destroy", "q"))
    assert sim.read_sysfs("cells/0/cpus_assigned_list") == "1-2,4-7\n"
    silent_success(sim.jailhouse("disable"))
    assert sorted(p.name for p in sim.sysfs_path("cells").iterdir()) == []
    assert sim.read_sysfs("enabled") == "0\n" and sim.read_sysfs("mem_pool_size") == "0\n"
    assert 'Closing cell "p"' in sim.jailhouse("console").stdout


def test_fact10_memory_overlap_between_cells_is_not_rejected(jailhouse_sim, tmp_path):
    silent_success(create(jailhouse_sim, tmp_path, cells.runphi_cell("m1", {1}, ram_phys=0x60000000)))
    silent_success(create(jailhouse_sim, tmp_path, cells.runphi_cell("m2", {2}, ram_phys=0x60000000, uart=2)))


def test_fact10_stats_reset_when_cpus_change_cell(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    silent_success(create(sim, tmp_path, cells.runphi_cell("busy", {1})))
    sim.jailhouse("cell", "load", "busy", script(tmp_path, "tick 2 x\n"), "-a", "0x70000000").check()
    sim.jailhouse("cell", "start", "busy").check()
    counter = "cells/1/statistics/cpu1/vmexits_total"
    sim.wait_sysfs(counter, lambda value: int(value) > 0)
    sim.jailhouse("cell", "destroy", "busy").check()
    assert sim.read_sysfs("cells/0/statistics/cpu1/vmexits_total") == "0\n"
    silent_success(create(sim, tmp_path, cells.runphi_cell("fresh", {1})))
    assert sim.read_sysfs(counter) == "0\n"
