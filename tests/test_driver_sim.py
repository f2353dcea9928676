"""The Jailhouse driver against a live simulated board: tool calls, typed errors, sysfs reads."""

from __future__ import annotations

import pytest

from runphi.backends.base import (BackendUnavailable, CellNotFound, InvalidConfiguration, ResourceBusy,
                                  ToolTimeout)
from runphi.backends.jailhouse.driver import JailhouseDriver, LoadImage
from tests.test_lifecycle_harness import board_running, guest_script, subreaper  # noqa: F401


@pytest.fixture
def sim(subreaper, tmp_path):
    with board_running(tmp_path / "sim") as board:
        yield board


@pytest.fixture
def driver(sim) -> JailhouseDriver:
    return JailhouseDriver(str(sim.tool), sim.sysfs, timeout=10)


def test_full_cycle_by_name(driver, sim, shared_dir, tmp_path):
    cell = str(shared_dir / "vectors" / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell")
    assert driver.available()
    driver.create(cell, "inmate-demo")
    assert driver.cell_id("inmate-demo") == 1
    assert driver.cell_state("inmate-demo") == "shut down"
    assert driver.cell_cpus("inmate-demo") == {1}
    assert 1 not in driver.root_cpus() and driver.cpu_owner(1) == "inmate-demo"
    image = tmp_path / "guest.bin"
    image.write_bytes(guest_script("print hi\\n", "sleep 200", "fault"))
    driver.load("inmate-demo", [LoadImage(file=str(image), address=0), LoadImage(string="args", address=0x1000)])
    driver.start("inmate-demo")
    assert driver.cell_state("inmate-demo") in ("running", "failed")
    stats = driver.statistics("inmate-demo")
    assert set(stats.per_cpu) == {1} and "total" in stats.total
    sim.sim.wait_state(1, "failed", timeout=10)
    assert driver.failed_cpus("inmate-demo") == {1}
    driver.shutdown("inmate-demo")
    assert driver.cell_state("inmate-demo") == "shut down"
    driver.destroy("inmate-demo")
    assert driver.cell_id("inmate-demo") is None and driver.cell_state("inmate-demo") is None
    assert 1 in driver.root_cpus()


def test_unknown_cell_and_busy_cpu_are_typed(driver, shared_dir):
    with pytest.raises(CellNotFound, match="'nope' does not exist"):
        driver.start("nope")
    with pytest.raises(CellNotFound):
        driver.statistics("nope")
    vectors = shared_dir / "vectors"
    driver.create(str(vectors / "runphi-fork-rev13-qemu-arm64-zephyr-demo.cell"), "qemu-arm64-zephyr-demo")
    with pytest.raises(ResourceBusy, match="owned by another cell"):
        driver.create(str(vectors / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell"), "inmate-demo")


def test_load_outside_the_cells_memory_is_invalid(driver, shared_dir, tmp_path):
    driver.create(str(shared_dir / "vectors" / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell"), "inmate-demo")
    image = tmp_path / "x.bin"
    image.write_bytes(b"x" * 16)
    with pytest.raises(InvalidConfiguration, match="does not fit"):
        driver.load("inmate-demo", [LoadImage(file=str(image), address=0x40000000)])


def test_numeric_names_are_addressed_with_dash_dash_name(driver, sim, shared_dir, tmp_path):
    # A cell named "0": the tool reads a bare "0" as the root cell's ID.
    import msgspec

    from runphi.backends.jailhouse.cellconfig import read_cell, write_cell

    vector = shared_dir / "vectors" / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell"
    profile, config = read_cell(vector.read_bytes())

    cell_file = tmp_path / "numeric.cell"
    cell_file.write_bytes(write_cell(msgspec.structs.replace(config, name="0"), profile))
    driver.create(str(cell_file), "0")
    assert driver.cell_id("0") == 1
    driver.start("0")  # a bare "0" would address the root cell and fail with EINVAL
    assert driver.cell_state("0") == "running"
    driver.destroy("0")
    assert driver.cell_id("0") is None


def test_tool_deadline_and_a_vanished_hypervisor(sim, shared_dir):
    slow = JailhouseDriver(str(sim.tool), sim.sysfs, timeout=0.5)
    sim.inject("--op", "create", "--delay-ms", "3000")
    with pytest.raises(ToolTimeout, match="did not finish within 0.5 s"):
        slow.create(str(shared_dir / "vectors" / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell"), "inmate-demo")
    sim.inject("--clear")
    sim.kill()
    with pytest.raises(BackendUnavailable, match="Jailhouse is not available"):
        slow.start("inmate-demo")


def test_missing_tool_and_missing_sysfs(tmp_path):
    driver = JailhouseDriver(str(tmp_path / "no-jailhouse"), tmp_path / "no-sysfs")
    with pytest.raises(BackendUnavailable, match="is not installed"):
        driver.start("x")
    assert not driver.available()
    with pytest.raises(BackendUnavailable, match="not enabled"):
        driver.require_available()
    with pytest.raises(BackendUnavailable, match="missing"):
        driver.cell_id("x")
