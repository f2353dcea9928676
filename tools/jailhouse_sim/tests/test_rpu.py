"""The Omnivisor `cell load CELL -r IMAGE RCPU` form on the RPU board."""

from __future__ import annotations

from tools.jailhouse_sim.testing import SimBoard

from . import cells


def test_rcpu_images_load_from_firmware_and_show_in_cell_list(tmp_path):
    with SimBoard.running(tmp_path / "sim", "sim-omnivisor-rpu") as sim:
        assert "[-r | --rcpu RCPU_IMAGE_NAME RCPU_MASK] ..." in sim.jailhouse("--help").stdout
        rpu_cell = cells.write(tmp_path, cells.runphi_cell("rpu", set(), rcpus={1}), "omnivisor-rev14")
        sim.jailhouse("cell", "create", rpu_cell).check()
        (sim.root / "lib" / "firmware" / "fw.elf").write_bytes(b"\x7fELF")
        sim.jailhouse("cell", "load", "rpu", "-r", "fw.elf", "1").check()
        bad = sim.jailhouse("cell", "load", "rpu", "-r", "fw.elf", "0")
        assert (bad.returncode, bad.stderr) == (1, "JAILHOUSE_CELL_LOAD: Invalid argument\n")
        assert "rcpu ID 0 not valid" in sim.kernel_log()
        missing = sim.jailhouse("cell", "load", "rpu", "-r", "nope.elf", "1")
        assert (missing.returncode, missing.stderr) == (1, "JAILHOUSE_CELL_LOAD: No such file or directory\n")
        # -r groups must come last.
        assert sim.jailhouse("cell", "load", "rpu", "-r", "fw.elf", "1", "img").stdout.startswith("Usage:")
        listing = sim.jailhouse("cell", "list").stdout.splitlines()
        assert listing[0] == ("ID      Name                    State             Assigned CPUs           "
                              "Assigned rCPUs          Failed CPUs             ")
        assert listing[2] == "1       rpu                     shut down                                 1" + " " * 47
        assert sim.read_sysfs("cells/1/rcpus_assigned_list") == "1\n"
        second = cells.write(tmp_path, cells.runphi_cell("rpu2", set(), rcpus={1}), "omnivisor-rev14")
        clash = sim.jailhouse("cell", "create", second)
        assert clash.stderr == "JAILHOUSE_CELL_CREATE: Device or resource busy\n"
