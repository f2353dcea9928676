"""One test per row of the exit-status table (DESIGN §4, docs/exit-codes.md).

Each test observes the monitor's status the way containerd's shim does: this
process is a child subreaper and reaps the pid from ``--pid-file``.
"""

from __future__ import annotations

import pytest

from tests.test_lifecycle_harness import (Zic, board, board_in_tempdir, guest_script, reap_all, subreaper,  # noqa: F401
                                          wait_exit, wait_for, zic)


def started(zic, cid: str, *guest: str) -> int:
    pid = zic.create(cid, zic.bundle(cid, guest_script(*guest)))
    zic.run("start", cid, check=True)
    return pid


def reason(zic, cid: str) -> str:
    """Why the monitor exited, as recorded in monitor-exit.json and in the container record."""
    import json

    exit_file = json.loads((zic.root / cid / "monitor-exit.json").read_text())
    record = json.loads((zic.root / cid / "runphi.json").read_text())
    assert record["cell"]["exit_code"] == exit_file["code"]
    assert record["cell"]["exit_reason"] == exit_file["reason"]
    assert record["status"] == "stopped"
    return exit_file["reason"]


def test_row_guest_shut_itself_down_is_0(zic):
    pid = started(zic, "row0", "print done\\n", "sleep 50", "shutdown")
    assert wait_exit(pid) == 0
    assert "shut itself down" in reason(zic, "row0")


@pytest.mark.parametrize(("signal_name", "code"), [("TERM", 143), ("INT", 130), ("HUP", 129), ("QUIT", 131)])
def test_row_kill_with_signal_n_is_128_plus_n(zic, signal_name, code):
    pid = started(zic, "rowsig", "tick 50 alive")
    wait_for(lambda: zic.board.cell_state("rowsig") == "running", what="running")
    zic.run("kill", "rowsig", signal_name, check=True)
    assert wait_exit(pid) == code
    assert zic.board.cell_state("rowsig") == "shut down"
    assert f"SIG{signal_name}" in reason(zic, "rowsig")


def test_row_kill_sigkill_is_137_and_the_cell_is_stopped(zic):
    pid = started(zic, "rowkill", "tick 50 alive")
    zic.run("kill", "rowkill", "KILL", check=True)
    assert wait_exit(pid) == 137
    assert zic.board.cell_state("rowkill") in (None, "shut down")
    assert zic.status("rowkill") == "stopped"


def test_kill_of_a_created_container_exits_128_plus_n(zic):
    pid = zic.create("rowcreated", zic.bundle("rowcreated", guest_script("tick 50 alive")))
    zic.run("kill", "rowcreated", "TERM", check=True)
    assert wait_exit(pid) == 143


@pytest.mark.parametrize("guest", [("print boom\\n", "fault 0xdead0000"), ("comm-abi-mismatch",)],
                         ids=["failed", "comm-abi-mismatch"])
def test_row_cell_failed_or_comm_abi_mismatch_is_139(zic, guest):
    pid = started(zic, "rowcrash", *guest)
    assert wait_exit(pid) == 139
    assert zic.status("rowcrash") == "stopped"


def test_row_cell_destroyed_behind_runphis_back_is_255(zic):
    pid = started(zic, "rowgone", "tick 50 alive")
    assert zic.board.jailhouse("cell", "destroy", "rowgone").returncode == 0
    assert wait_exit(pid) == 255
    assert "vanished" in reason(zic, "rowgone")


def test_row_hypervisor_unreachable_is_255(subreaper, tmp_path):
    with board_in_tempdir() as own:
        z = Zic(own, tmp_path)
        try:
            pid = started(z, "rowdead", "tick 50 alive")
            own.kill()
            assert wait_exit(pid) == 255
            assert "unreachable" in reason(z, "rowdead")
        finally:
            reap_all(z.monitors)


def test_the_exit_is_logged_to_the_runtime_log(zic):
    import json

    log = zic.base / "log.json"
    bundle = zic.bundle("logged", guest_script("print bye\\n", "fault"))
    pid_file = zic.base / "logged.pid"
    zic.run("--log", str(log), "--log-format", "json", "create", "--bundle", str(bundle), "--pid-file",
            str(pid_file), "logged", check=True)
    pid = int(pid_file.read_text())
    zic.monitors.append(pid)
    zic.run("start", "logged", check=True)
    assert wait_exit(pid) == 139
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    exit_line = [line for line in lines if "exited with status 139" in line["msg"]]
    assert len(exit_line) == 1 and exit_line[0]["level"] == "warning" and exit_line[0]["id"] == "logged"
    assert all(set(line) >= {"level", "msg", "time"} for line in lines)
