"""The `jailhouse` client's grammar and output, byte for byte (jailhouse.md §1)."""

from __future__ import annotations

import os

import pytest

from tools.jailhouse_sim.testing import SimBoard

from . import cells


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with SimBoard.running(tmp_path_factory.mktemp("grammar") / "sim") as board:
        yield board


def usage_text(prog: str = "jailhouse") -> str:
    return (
        f"Usage: {prog} {{ COMMAND | --help | --version }}\n\nAvailable commands:\n"
        "   enable SYSCONFIG\n   disable\n   console [-f | --follow]\n   cell create CELLCONFIG\n   cell list\n"
        '   cell load { ID | [--name] NAME } { IMAGE | { -s | --string } "STRING" }\n'
        "             [-a | --address ADDRESS] ...\n"
        "   cell start { ID | [--name] NAME }\n   cell shutdown { ID | [--name] NAME }\n"
        "   cell destroy { ID | [--name] NAME }\n"
        '   cell linux [-h] [-d DTB] [-i INITRD] [-c "CMDLINE"] [-w PARAMS_FILE]\n'
        "              [-a ARCH] [-k FACTOR]\n              CELLCONFIG KERNEL\n"
        "   cell stats { ID | [--name] NAME }\n"
        "   config create [-h] [-g] [-r ROOT] [-t TEMPLATE_DIR] [-c CONSOLE]\n"
        "                 [--mem-inmates MEM_INMATES] [--mem-hv MEM_HV]\n                 FILE\n"
        "   config collect FILE.TAR\n   config check [-h] SYSCONFIG [CELLCONFIG [CELLCONFIG ...]]\n"
        "   hardware check \n"
    )


def test_help_prints_usage_on_stdout_and_exits_0(sim):
    result = sim.jailhouse("--help")
    assert (result.returncode, result.stdout, result.stderr) == (0, usage_text(), "")


@pytest.mark.parametrize("argv", [
    (), ("bogus",), ("cell",), ("cell", "bogus"), ("cell", "create"), ("cell", "create", "a", "b"),
    ("cell", "list", "extra"), ("cell", "start"), ("cell", "start", "1", "2"), ("cell", "start", "--name"),
    ("cell", "load", "1"), ("cell", "load", "1", "-s"), ("cell", "load", "1", "-s", "x", "-a"),
    ("cell", "load", "1", "-s", "x", "-a", "0x1g"), ("cell", "shutdown", "1", "extra"),
    ("cell", "destroy"), ("enable",), ("enable", "a", "b"), ("console", "-x"), ("config",),
])
def test_syntax_errors_print_usage_on_stdout_and_exit_1(sim, argv):
    result = sim.jailhouse(*argv)
    assert (result.returncode, result.stdout, result.stderr) == (1, usage_text(), "")


def test_usage_names_the_program_by_basename(sim, tmp_path):
    link = tmp_path / "jh"
    link.symlink_to(sim.jailhouse_path)
    import subprocess

    done = subprocess.run([str(link), "--help"], capture_output=True, text=True)
    assert done.stdout.startswith("Usage: jh { COMMAND")


def test_version(sim):
    result = sim.jailhouse("--version")
    assert result.returncode == 0 and result.stdout.startswith("Jailhouse management tool v0.12")


def test_disable_ignores_extra_arguments(jailhouse_sim):
    jailhouse_sim.jailhouse("disable", "extra", "args").check()
    assert jailhouse_sim.read_sysfs("enabled") == "0\n"


@pytest.mark.parametrize("argv", [("config", "check", "x"), ("config", "create", "x"), ("hardware", "check")])
def test_helper_scripts_are_not_shipped(sim, argv):
    """Only `cell linux` is shipped (see test_cell_linux.py)."""
    result = sim.jailhouse(*argv)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "execvp: No such file or directory\n")


def test_unreadable_files_are_reported_by_the_tool(sim, tmp_path):
    missing = tmp_path / "missing.cell"
    result = sim.jailhouse("cell", "create", missing)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"opening {missing}: No such file or directory\n")
    result = sim.jailhouse("cell", "load", "1", "-a", "0x0")
    assert result.stderr == "opening -a: No such file or directory\n" and result.returncode == 1


@pytest.mark.parametrize("spec, errors", [
    ("", "JAILHOUSE_CELL_START: Invalid argument\n"),          # "" is ID 0, the root cell
    ("0", "JAILHOUSE_CELL_START: Invalid argument\n"),
    ("0x0", "JAILHOUSE_CELL_START: Invalid argument\n"),
    ("00", "JAILHOUSE_CELL_START: Invalid argument\n"),
    ("4294967296", "JAILHOUSE_CELL_START: Invalid argument\n"),  # wraps to s32 0
    ("sim-qemu-arm64", "JAILHOUSE_CELL_START: Invalid argument\n"),
    ("0x", "JAILHOUSE_CELL_START: No such file or directory\n"),  # junk: a name
    ("-1", "JAILHOUSE_CELL_START: No such file or directory\n"),
    ("7", "JAILHOUSE_CELL_START: No such file or directory\n"),
])
def test_cell_spec_parsing_like_strtoll_base_0(sim, spec, errors):
    result = sim.jailhouse("cell", "start", spec)
    assert (result.returncode, result.stderr) == (1, errors)


def test_numbers_parse_in_base_0_and_names_truncate_to_31(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    long_name = "c" * 32
    sim.jailhouse("cell", "create", cells.write(tmp_path, cells.runphi_cell(long_name, {1}))).check()
    assert sim.read_sysfs("cells/1/name") == "c" * 31 + "\n"
    # The 32-char spec is truncated before lookup, so it still finds the cell.
    sim.jailhouse("cell", "start", long_name).check()
    sim.jailhouse("cell", "shutdown", "0x1").check()
    sim.jailhouse("cell", "start", "01").check()
    sim.jailhouse("cell", "shutdown", "--name", "c" * 31).check()
    assert sim.state(1) == "shut down"


def test_all_digit_names_need_dash_dash_name(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    sim.jailhouse("cell", "create", cells.write(tmp_path, cells.runphi_cell("12345", {1}))).check()
    assert sim.jailhouse("cell", "start", "12345").stderr == "JAILHOUSE_CELL_START: No such file or directory\n"
    sim.jailhouse("cell", "start", "--name", "12345").check()
    assert sim.state(1) == "running"


def test_cell_list_prints_nothing_when_disabled(tmp_path):
    with SimBoard.running(tmp_path / "sim", enabled=False) as sim:
        result = sim.jailhouse("cell", "list")
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        sim.stop()
        # Module unloaded (no sysfs tree at all): still nothing, exit 0.
        result = sim.jailhouse("cell", "list")
        assert (result.returncode, result.stdout) == (0, "")


def test_cell_list_golden_output(jailhouse_sim, zephyr_demo):
    sim = jailhouse_sim
    sim.jailhouse("cell", "create", zephyr_demo).check()
    result = sim.jailhouse("cell", "list")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == (
        "ID      Name                    State             Assigned CPUs           Failed CPUs             \n"
        "0       sim-qemu-arm64          running           2-7                                             \n"
        "1       qemu-arm64-zephyr-demo  shut down         0-1                                             \n"
    )


def test_cell_list_sorts_ids_as_strings(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    # Ten single-CPU cells would need ten CPUs; CPU-less cells are accepted (RPU-only style).
    for n in range(1, 12):
        sim.jailhouse("cell", "create", cells.write(tmp_path, cells.runphi_cell(f"cell{n}", set()))).check()
    ids = [line.split()[0] for line in sim.jailhouse("cell", "list").stdout.splitlines()[1:]]
    assert ids == ["0", "1", "10", "11", "2", "3", "4", "5", "6", "7", "8", "9"]


def test_cell_list_reports_a_vanished_file(jailhouse_sim, zephyr_demo):
    sim = jailhouse_sim
    sim.jailhouse("cell", "create", zephyr_demo).check()
    os.unlink(sim.sysfs_path("cells/1/name"))
    result = sim.jailhouse("cell", "list")
    assert result.returncode == 1
    assert result.stderr == "opening /sys/devices/jailhouse/cells/1/name: No such file or directory\n"


def test_cell_stats_prints_counters_that_move(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    guest = tmp_path / "g"
    guest.write_bytes(b"#!jailhouse-sim-inmate\ntick 5 t\n")
    sim.jailhouse("cell", "create", cells.write(tmp_path, cells.runphi_cell("stats", {1, 2}))).check()
    sim.jailhouse("cell", "load", "stats", guest, "-a", "0x70000000").check()
    sim.jailhouse("cell", "start", "stats").check()

    def total() -> int:
        return int(sim.read_sysfs("cells/1/statistics/vmexits_total"))

    first = total()
    sim.wait_sysfs("cells/1/statistics/vmexits_total", lambda value: int(value) > first)
    # Each attribute is read separately (as in real sysfs), so wait on the per-CPU file itself.
    sim.wait_sysfs("cells/1/statistics/cpu1/vmexits_mmio", lambda value: int(value) > 0)
    out = sim.jailhouse("cell", "stats", "stats").check().stdout
    assert out.startswith("Statistics for stats cell\n") and "vmexits_total" in out
    assert sim.jailhouse("cell", "stats").returncode == 1
