"""Monitor and board faults: every one ends in a defined state, says so in one line,
and leaks nothing once containerd's usual `delete --force` has run.

Faults: the monitor SIGKILLed; the simulator daemon killed mid-run (and brought back);
a console UART device gone; the `jailhouse` tool hanging past its deadline; the tool
failing at random points of many lifecycles (fault injection, fixed seed).
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from tests.test_lifecycle_failures import live_runphi_descendants
from tests.test_lifecycle_harness import (Zic, board, board_in_tempdir, guest_script, reap_all,  # noqa: F401
                                          subreaper, wait_exit, wait_for, zic)

GUEST = guest_script("tick 50 alive")
RANDOM_CYCLES = int(os.environ.get("RUNPHI_FAULT_CYCLES", "12"))


def ledger(zic) -> dict:
    path = zic.node / "jailhouse-ledger.json"
    return json.loads(path.read_text())["allocations"] if path.exists() else {}


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def assert_clean(zic) -> None:
    assert zic.board.cells() == {}, "a cell was left behind"
    assert ledger(zic) == {}, "a ledger entry was left behind"
    assert not zic.root.exists() or list(zic.root.iterdir()) == [], "state left behind"
    wait_for(lambda: live_runphi_descendants() == [], timeout=30, what="every monitor to end")


def started(zic, cid: str) -> int:
    pid = zic.create(cid, zic.bundle(cid, GUEST))
    zic.run("start", cid, check=True)
    return pid


def test_monitor_killed_reads_stopped_and_delete_cleans_up(zic):
    pid = started(zic, "mkill")
    os.kill(pid, signal.SIGKILL)
    assert wait_exit(pid) == 137
    assert zic.status("mkill") == "stopped"
    # The cell outlived its monitor: delete (no --force needed: it is stopped) removes it.
    assert zic.board.cell_state("mkill") == "running"
    deleted = zic.run("delete", "mkill")
    assert deleted.returncode == 0, deleted.stderr
    assert_clean(zic)


def test_daemon_killed_mid_run_then_delete_force_once_the_board_is_back(subreaper, tmp_path):
    with board_in_tempdir() as own:
        daemon_killed_then_back(own, Zic(own, tmp_path))


def daemon_killed_then_back(own, z) -> None:
    try:
        pid = started(z, "dkill")
        own.kill()
        assert wait_exit(pid) == 255  # DESIGN §4: backend unreachable
        # Board gone: delete cannot destroy the cell. It says so and keeps the record,
        # so containerd's retry can finish the job.
        refused = z.run("delete", "--force", "dkill")
        assert refused.returncode == 1
        line = one_line(refused)
        assert "dkill" in line or "jailhouse" in line.lower(), line
        assert (z.root / "dkill").exists()
        own.sim = None
        own.up()  # the board restarts empty, as after a reboot of the hypervisor side
        again = z.run("delete", "--force", "dkill")
        assert again.returncode == 0, again.stderr
        assert_clean(z)
    finally:
        reap_all(z.monitors)


def test_a_removed_uart_device_is_one_clear_error_and_nothing_is_made(zic):
    first = zic.board.root / "dev" / "ttyAMA1"
    saved = zic.board.root / "dev" / "saved-ttyAMA1"
    os.rename(first, saved)
    try:
        result = zic.run("create", "--bundle", str(zic.bundle("b", GUEST)), "--pid-file", str(zic.base / "p"), "nouart")
    finally:
        os.rename(saved, first)
    assert result.returncode == 1
    assert "nouart" in one_line(result) and "ttyAMA1" in one_line(result)
    assert_clean(zic)


def test_a_uart_removed_under_a_running_zic_does_not_stop_kill_and_delete(zic):
    pid = started(zic, "uartgone")
    device = json.loads((zic.root / "uartgone" / "runphi.json").read_text())["cell"]["uart_device"]
    moved = Path(device).with_name("moved-" + Path(device).name)
    os.rename(device, moved)
    try:
        assert zic.run("kill", "uartgone", "TERM").returncode == 0
        assert wait_exit(pid) == 143
        assert zic.run("delete", "uartgone").returncode == 0
    finally:
        os.rename(moved, device)
    assert_clean(zic)


def test_a_hanging_tool_hits_its_deadline_and_create_undoes_everything(zic):
    zic.board.inject("--op", "load", "--delay-ms", "14000", "--errno", "EIO")
    result = zic.run("create", "--bundle", str(zic.bundle("b", GUEST)), "--pid-file", str(zic.base / "p"), "hang",
                     timeout=120)
    assert result.returncode == 1
    line = one_line(result)
    assert "hang" in line and "did not finish within" in line, line
    # The hung call still holds the simulator's lock; the undo's destroy waits its turn.
    wait_for(lambda: zic.board.cells() == {}, timeout=60, what="the cell to be gone")
    assert_clean(zic)


OPS = ["create", "load", "start", "shutdown", "destroy"]
ERRNOS = ["EIO", "EBUSY", "EINVAL", "ENOMEM", "EPERM"]


def test_random_tool_failures_across_lifecycles_leak_nothing(zic):
    rng = random.Random(1234)
    bundle = zic.bundle("b", GUEST)
    outcomes = []
    for cycle in range(RANDOM_CYCLES):
        cid = f"rand-{cycle}"
        op, err = rng.choice(OPS), rng.choice(ERRNOS)
        zic.board.inject("--op", op, "--errno", err, "--count", "1")
        steps = [("create", "--bundle", str(bundle), "--pid-file", str(zic.base / f"{cid}.pid"), cid),
                 ("start", cid), ("kill", cid, "KILL")]
        for argv in steps:
            result = zic.run(*argv)
            if argv[0] == "create" and result.returncode == 0:
                zic.monitors.append(int((zic.base / f"{cid}.pid").read_text()))
            if result.returncode != 0:
                assert cid in one_line(result) or "container" in one_line(result), result.stderr
                outcomes.append((cycle, op, argv[0]))
                break
        final = zic.run("delete", "--force", cid)
        if final.returncode != 0:  # the injected fault hit this delete's destroy: containerd retries
            one_line(final)
            final = zic.run("delete", "--force", cid)
        assert final.returncode == 0, final.stderr
        zic.board.inject("--clear")
        reap_all(zic.monitors)
        assert_clean(zic)
    assert outcomes, "no injected fault ever surfaced: the test did not test anything"
