"""RPU guests on an Omnivisor-style board: the image goes to the firmware directory and is
loaded with `cell load CELL -r IMAGE RCPU`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_lifecycle_harness import Zic, board_in_tempdir, guest_script, reap_all, subreaper  # noqa: F401

# runphi's description of the simulator's `sim-omnivisor-rpu` board (4 APUs, 2 RPUs).
PLATFORM = """
name = "sim-omnivisor-rpu"
format = "omnivisor-rev14"
architecture = "arm64"
root_cell = "sim-omnivisor-rpu"
cell_cpus = "1-3"
cell_flags = ["PASSIVE_COMMREG"]
default_reset_address = 0x70000000

[memory]
pools = [{ start = 0x50000000, end = 0x7f800000 }]
convention = "qemu"
low_ram_size = 0x10000
main_ram_guest = 0x70000000

[gic]
gicd = 0x08000000
gicr = 0x080a0000

[[uarts]]
phys = 0x09001000
guest = 0x09000000
irq = 33
device = "{sim_root}/dev/ttyAMA1"

[[uarts]]
phys = 0x09002000
guest = 0x09000000
irq = 33
device = "{sim_root}/dev/ttyAMA2"

[[rpus]]
id = 0

[[rpus]]
id = 1
"""


@pytest.fixture(scope="module")
def rpu_board(subreaper):
    with board_in_tempdir("rphi-rpu-", model="sim-omnivisor-rpu") as board:
        yield board


@pytest.fixture
def rpu_zic(rpu_board, tmp_path):
    platform = tmp_path / "sim-omnivisor-rpu.toml"
    platform.write_text(PLATFORM)
    z = Zic(rpu_board, tmp_path)
    z.env["RUNPHI_PLATFORM"] = str(platform)
    config = Path(z.env["RUNPHI_CONFIG"])
    config.write_text(config.read_text() + f'firmware_dir = "{rpu_board.root / "lib" / "firmware"}"\n')
    yield z
    for cid in [p.name for p in z.root.iterdir()] if z.root.exists() else []:
        z.run("delete", "--force", cid)
    reap_all(z.monitors)


def test_rpu_guest_is_loaded_through_the_firmware_directory(rpu_zic, rpu_board):
    firmware = rpu_board.root / "lib" / "firmware"
    pid = rpu_zic.create("rpu1", rpu_zic.bundle("rpu1", guest_script("tick 50 r5"), boot={"rpu_req": True}))
    assert pid > 0
    assert rpu_board.cell_state("rpu1") == "shut down"
    cell_dir = next(d for d in (rpu_board.sysfs / "cells").iterdir()
                    if d.name != "0" and (d / "name").read_text().strip() == "rpu1")
    assert (cell_dir / "rcpus_assigned_list").read_text().strip() == "0"
    assert (cell_dir / "cpus_assigned_list").read_text().strip() == ""
    links = list(firmware.iterdir())
    assert len(links) == 1 and links[0].is_symlink() and links[0].name.startswith("runphi-")
    rpu_zic.run("delete", "rpu1", check=True)
    assert rpu_board.cells() == {} and list(firmware.iterdir()) == []


def test_second_rpu_guest_gets_the_other_core_and_a_third_is_refused(rpu_zic, rpu_board):
    bundle = rpu_zic.bundle("r", guest_script("tick 50 r5"), boot={"rpu_req": True})
    rpu_zic.create("ra", bundle)
    rpu_zic.create("rb", bundle)
    result = rpu_zic.run("create", "--bundle", str(bundle), "rc")
    assert result.returncode == 1 and "RPU" in result.stderr
    assert set(rpu_board.cells()) == {"ra", "rb"}


def test_rpu_guest_starts_and_stops_on_kill(rpu_zic, rpu_board):
    from tests.test_lifecycle_harness import wait_exit

    pid = rpu_zic.create("rpu2", rpu_zic.bundle("rpu2", guest_script("tick 50 r5"), boot={"rpu_req": True}))
    rpu_zic.run("start", "rpu2", check=True)
    assert rpu_zic.status("rpu2") == "running"
    rpu_zic.run("kill", "rpu2", "TERM", check=True)
    assert wait_exit(pid) == 143
