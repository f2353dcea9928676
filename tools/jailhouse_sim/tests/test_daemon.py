"""The daemon: up/down/status/kill, fault injection, serialisation, atomic sysfs."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial
import trio

from tools.jailhouse_sim.cli import process_alive
from tools.jailhouse_sim.testing import SimBoard

from . import cells

MAGIC = "#!jailhouse-sim-inmate\n"


def sim_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.jailhouse_sim.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_up_is_idempotent_and_down_leaves_no_process_or_pty(tmp_path, zephyr_demo):
    root = tmp_path / "board"
    up = sim_cli("up", "--root", str(root))
    assert up.returncode == 0, up.stderr
    for expected in (f"jailhouse  {root}/bin/jailhouse", f"sysfs      {root}/sys/devices/jailhouse",
                     f"console    {root}/dev/ttyAMA0", f"uart 7     {root}/dev/ttyAMA7"):
        assert expected in up.stdout
    pid = int((root / "run" / "jailhouse-sim.pid").read_text())
    again = sim_cli("up", "--root", str(root))
    assert again.returncode == 0 and f"pid {pid}," in again.stdout
    assert sim_cli("status", "--root", str(root)).returncode == 0
    ptys = {os.readlink(root / "dev" / f"ttyAMA{n}") for n in range(8)}
    born = {p: os.stat(p).st_ctime_ns for p in ptys}
    jailhouse = str(root / "bin" / "jailhouse")
    subprocess.run([jailhouse, "cell", "create", str(zephyr_demo)], check=True)
    image = tmp_path / "g"
    image.write_text(MAGIC + "tick 5 t\n")
    subprocess.run([jailhouse, "cell", "load", "1", str(image), "-a", "0x70000000"], check=True)
    subprocess.run([jailhouse, "cell", "start", "1"], check=True)
    with serial.Serial(str(root / "dev" / "ttyAMA0"), timeout=5) as port:
        port.read_until(b"\r\n")  # opened mid-stream: the first line may be partial
        assert re.fullmatch(rb"t \d+\r\n", port.read_until(b"\r\n"))
        down = sim_cli("down", "--root", str(root))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not process_alive(pid)
    # A freed pty number may be handed to another process at once: only the same
    # allocation (same creation time) still existing would be a leak.
    assert [p for p in ptys if os.path.exists(p) and os.stat(p).st_ctime_ns == born[p]] == []
    assert list((root / "dev").iterdir()) == []
    assert not (root / "run" / "jailhouse-sim.sock").exists()
    assert not (root / "sys" / "devices" / "jailhouse").exists()
    gone = subprocess.run([jailhouse, "cell", "list"], capture_output=True, text=True)
    assert (gone.returncode, gone.stdout) == (0, "")
    vanished = subprocess.run([jailhouse, "cell", "start", "1"], capture_output=True, text=True)
    assert (vanished.returncode, vanished.stderr) == (1, "opening /dev/jailhouse: No such file or directory\n")
    again = sim_cli("down", "--root", str(root))
    assert again.returncode == 0 and "not running" in again.stdout
    assert sim_cli("status", "--root", str(root)).returncode == 1


def test_up_refuses_a_different_board_on_a_running_root(tmp_path):
    root = tmp_path / "board"
    assert sim_cli("up", "--root", str(root)).returncode == 0
    try:
        clash = sim_cli("up", "--root", str(root), "--board", "sim-qemu-arm64-rev14")
        assert clash.returncode == 1 and clash.stdout == ""
        assert clash.stderr.count("\n") == 1 and "already running" in clash.stderr and "down" in clash.stderr
    finally:
        assert sim_cli("down", "--root", str(root)).returncode == 0


def test_kill_makes_the_board_vanish(tmp_path):
    root = tmp_path / "board"
    assert sim_cli("up", "--root", str(root)).returncode == 0
    pid = int((root / "run" / "jailhouse-sim.pid").read_text())
    killed = sim_cli("kill", "--root", str(root))
    assert killed.returncode == 0 and not process_alive(pid)
    gone = subprocess.run([str(root / "bin" / "jailhouse"), "cell", "shutdown", "1"], capture_output=True, text=True)
    assert (gone.returncode, gone.stderr) == (1, "opening /dev/jailhouse: No such file or directory\n")
    assert sim_cli("down", "--root", str(root)).returncode == 0
    assert not (root / "run" / "jailhouse-sim.pid").exists()


@pytest.mark.parametrize("argv, message", [
    (("up", "--board", "no-such-board"), "unknown board 'no-such-board'"),
    (("inject", "--errno", "EBUSY"), "no simulator answers"),
    (("kill",), "no simulator is running"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, argv, message):
    done = sim_cli(argv[0], "--root", str(tmp_path / "none"), *argv[1:])
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "none" / "run" / "jailhouse-sim.pid").exists()


def test_a_killed_daemon_is_reported_by_the_client(jailhouse_sim, zephyr_demo):
    jailhouse_sim.jailhouse("cell", "create", zephyr_demo).check()
    jailhouse_sim.kill()
    result = jailhouse_sim.jailhouse("cell", "destroy", "1")
    assert (result.returncode, result.stderr) == (1, "opening /dev/jailhouse: No such file or directory\n")


def test_injected_failures_hit_the_next_matching_calls(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    sim.inject(errno=errno.EBUSY, count=2, op="create")
    first = cells.write(tmp_path, cells.runphi_cell("inj", {1}))
    assert sim.jailhouse("cell", "start", "nope").stderr == "JAILHOUSE_CELL_START: No such file or directory\n"
    for _ in range(2):
        assert sim.jailhouse("cell", "create", first).stderr == "JAILHOUSE_CELL_CREATE: Device or resource busy\n"
    sim.jailhouse("cell", "create", first).check()
    sim.inject(errno=errno.ENOMEM, count=-1)
    for argv in (("cell", "start", "1"), ("cell", "shutdown", "1"), ("disable",)):
        assert sim.jailhouse(*argv).stderr.endswith(": Cannot allocate memory\n")
    sim.inject(clear=True)
    sim.jailhouse("cell", "start", "1").check()
    cli = sim_cli("inject", "--root", str(sim.root), "--errno", "EPERM", "--op", "shutdown")
    assert cli.returncode == 0, cli.stderr
    assert sim.jailhouse("cell", "shutdown", "1").stderr == "JAILHOUSE_CELL_LOAD: Operation not permitted\n"


async def run_jailhouse(sim: SimBoard, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([str(sim.jailhouse_path), *args], capture_stdout=True, capture_stderr=True,
                                  check=False)


async def test_concurrent_calls_are_serialised_like_the_driver_mutex(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    files = [cells.write(tmp_path, cells.runphi_cell(f"c{n}", {n}, uart=n)) for n in range(1, 5)]
    twins = []
    for n in range(1, 4):
        (tmp_path / f"t{n}").mkdir()
        twins.append(cells.write(tmp_path / f"t{n}", cells.runphi_cell("twin", {n + 4})))
    sim.inject(delay_ms=150, count=-1, op="create")
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def one(path: Path) -> None:
        results.append(await run_jailhouse(sim, "cell", "create", str(path)))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for path in files + twins:
            nursery.start_soon(one, path)
    elapsed = trio.current_time() - start
    assert elapsed >= 7 * 0.15  # one at a time, never overlapping
    assert sorted(r.returncode for r in results) == [0] * 5 + [1] * 2
    assert sorted(r.stderr for r in results if r.returncode) == [b"JAILHOUSE_CELL_CREATE: File exists\n"] * 2
    names = sorted(sim.read_sysfs(f"cells/{i}/name").strip() for i in range(1, 6))
    assert names == ["c1", "c2", "c3", "c4", "twin"]


async def test_sysfs_readers_never_see_partial_values(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    sim.jailhouse("cell", "create", cells.write(tmp_path, cells.runphi_cell("flip", {1}))).check()
    state_file = sim.sysfs_path("cells/1/state")
    seen: set[str] = set()

    async def flip() -> None:
        for _ in range(15):
            await run_jailhouse(sim, "cell", "start", "1")
            await run_jailhouse(sim, "cell", "shutdown", "1")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flip)
        while nursery.child_tasks:
            seen.add(state_file.read_text())
            await trio.sleep(0)
    assert seen <= {"running\n", "shut down\n"} and len(seen) == 2


def test_qemu_default_engine_still_runs_script_guests(tmp_path):
    with SimBoard.running(tmp_path / "sim", engine="qemu") as sim:
        assert sim.status()["engine"] == "qemu"
        sim.jailhouse("cell", "create", cells.write(tmp_path, cells.runphi_cell("mixed", {1}))).check()
        with serial.Serial(str(sim.uart(1)), timeout=5) as port:
            sim.jailhouse("cell", "load", "mixed", "-s", MAGIC + "print scripted\\n\n", "-a", "0x70000000").check()
            sim.jailhouse("cell", "start", "mixed").check()
            assert port.read_until(b"scripted\r\n") == b"scripted\r\n"


def test_the_python_client_starts_fast_with_stdlib_only(jailhouse_sim):
    source = jailhouse_sim.python_client_path.read_text()
    first_line = source.splitlines()[0]
    assert first_line == f"#!{sys.executable} -IS"
    imported = subprocess.run(
        [sys.executable, "-IS", "-X", "importtime", str(jailhouse_sim.python_client_path), "cell", "list"],
        capture_output=True, text=True)
    modules = {line.split("|")[-1].strip() for line in imported.stderr.splitlines()[1:]}
    assert imported.returncode == 0
    assert not modules & {"trio", "msgspec", "serial", "structlog", "tools"}


async def test_console_follow_streams_new_lines(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    cell = cells.write(tmp_path, cells.runphi_cell("followed", {1}))
    follower = await trio.lowlevel.open_process([str(sim.jailhouse_path), "console", "--follow"],
                                                stdout=subprocess.PIPE)
    seen = b""

    async def read_until(marker: bytes) -> None:
        nonlocal seen
        with trio.fail_after(10):
            while marker not in seen:
                seen += await follower.stdout.receive_some(4096)

    try:
        await read_until(b"Activating hypervisor\n")
        await run_jailhouse(sim, "cell", "create", str(cell))
        await read_until(b'Created cell "followed"\n')
    finally:
        follower.kill()
        await follower.wait()
        await follower.stdout.aclose()
    assert seen.startswith(b"\nInitializing Jailhouse hypervisor")
