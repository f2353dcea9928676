"""Every verb in every status of a ZIC (created / running / stopped / unknown), on the simulator."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.test_lifecycle_harness import board, guest_script, subreaper, wait_exit, wait_for, zic  # noqa: F401

STATUSES = ("created", "running", "stopped", "unknown")


def make(zic, status: str, cid: str = "t1") -> int:
    """A ZIC in `status`; returns its monitor pid (0 for unknown)."""
    if status == "unknown":
        return 0
    pid = zic.create(cid, zic.bundle(cid, guest_script("tick 50 alive")))
    if status in ("running", "stopped"):
        zic.run("start", cid, check=True)
        wait_for(lambda: zic.board.cell_state(cid) == "running", what="running")
    if status == "stopped":
        zic.run("kill", cid, "TERM", check=True)
        assert wait_exit(pid) == 143
    assert zic.status(cid) == status
    return pid


# verb args, then for each status: (exit code, substring of stdout+stderr or None)
TABLE = {
    ("start",): {"created": (0, None), "running": (1, "already running"),
                 "stopped": (1, "has stopped"), "unknown": (1, "does not exist")},
    ("state",): {"created": (0, '"created"'), "running": (0, '"running"'),
                 "stopped": (0, '"stopped"'), "unknown": (1, "does not exist")},
    ("kill", "TERM"): {"created": (0, None), "running": (0, None),
                       "stopped": (1, "container not running"), "unknown": (1, "does not exist")},
    ("kill", "--all", "KILL"): {"created": (0, None), "running": (0, None),
                                "stopped": (0, None), "unknown": (1, "does not exist")},
    ("delete",): {"created": (0, None), "running": (1, "that is not stopped: running"),
                  "stopped": (0, None), "unknown": (1, "does not exist")},
    ("delete", "--force"): {"created": (0, None), "running": (0, None),
                            "stopped": (0, None), "unknown": (0, None)},
    ("ps", "--format", "json"): {"created": (0, "pid"), "running": (0, "pid"),
                                 "stopped": (0, "[]"), "unknown": (1, "does not exist")},
    ("events", "--stats"): {"created": (0, '"stats"'), "running": (0, '"stats"'),
                            "stopped": (1, "is not running"), "unknown": (1, "does not exist")},
    ("pause",): {"created": (1, "not supported"), "running": (1, "not supported"),
                 "stopped": (1, "not supported"), "unknown": (1, "does not exist")},
}


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("verb", list(TABLE), ids=lambda v: " ".join(v))
def test_verb_in_status(zic, verb, status):
    pid = make(zic, status)
    args = [*verb[:-1], "t1", verb[-1]] if verb[0] == "kill" else [*verb, "t1"]
    result = zic.run(*args)
    code, text = TABLE[verb][status]
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    if text == "pid":
        assert json.loads(result.stdout) == [pid]
    elif text is not None:
        assert text in output
    if code == 1:
        assert "Traceback" not in output
        if status != "unknown" and verb[0] in ("start", "delete", "kill"):
            # A refused verb has no effect.
            assert zic.status("t1") == status


def test_a_stopped_zic_keeps_its_record_and_can_be_recreated_after_delete(zic):
    pid = make(zic, "stopped")
    assert zic.state("t1")["pid"] == 0
    zic.run("delete", "t1", check=True)
    pid2 = zic.create("t1", zic.bundle("t1", guest_script("tick 50 alive")))
    assert pid2 != pid and zic.status("t1") == "created"


def test_monitor_killed_with_sigkill_reads_stopped_and_delete_cleans_the_cell(zic):
    pid = make(zic, "running")
    os.kill(pid, signal.SIGKILL)
    assert wait_exit(pid) == 137
    assert zic.status("t1") == "stopped"
    assert zic.board.cell_state("t1") == "running"  # orphaned until delete
    zic.run("delete", "t1", check=True)
    assert zic.board.cells() == {}
    assert not (zic.root / "t1").exists()


def test_delete_after_the_cell_vanished_releases_its_resources(zic):
    pid = make(zic, "running")
    zic.board.jailhouse("cell", "destroy", "t1")
    assert wait_exit(pid) == 255
    zic.run("delete", "t1", check=True)
    ledger = zic.node / "jailhouse-ledger.json"
    assert json.loads(ledger.read_text()).get("allocations", {}) == {}


def test_numeric_container_ids_are_addressed_by_name(zic):
    pid = make(zic, "running", cid="12345")
    assert zic.board.cell_state("12345") == "running"
    zic.run("kill", "12345", "TERM", check=True)
    assert wait_exit(pid) == 143
    zic.run("delete", "12345", check=True)
    assert zic.board.cells() == {}


@pytest.mark.parametrize("verb", ["exec", "pause", "resume", "update", "checkpoint"])
def test_unsupported_verbs_say_so_in_one_line(zic, verb):
    make(zic, "created")
    args = {"exec": ["exec", "t1", "sh"], "update": ["update", "--resources", "-", "t1"]}.get(verb, [verb, "t1"])
    result = zic.run(*args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not supported" in lines[0]


def test_list_shows_zics_with_their_live_status(zic):
    pid = make(zic, "running")
    table = zic.run("list", check=True).stdout
    assert "t1" in table and "running" in table and str(pid) in table
    entries = {e["id"]: e for e in json.loads(zic.run("list", "--format", "json", check=True).stdout)}
    assert entries["t1"]["status"] == "running" and entries["t1"]["pid"] == pid


def test_run_in_the_foreground_exits_with_the_zics_status_and_cleans_up(zic):
    result = zic.run("run", "--bundle", str(zic.bundle("r", guest_script("print x\\n", "fault"))), "runfg")
    assert result.returncode == 139
    assert not (zic.root / "runfg").exists() and zic.board.cells() == {}


def test_run_detached_leaves_it_running(zic):
    result = zic.run("run", "-d", "--bundle", str(zic.bundle("d", guest_script("tick 50 x"))),
                     "--pid-file", str(zic.base / "d.pid"), "rund")
    assert result.returncode == 0, result.stderr
    pid = int((zic.base / "d.pid").read_text())
    zic.monitors.append(pid)
    assert zic.status("rund") == "running"
    zic.run("kill", "rund", "TERM", check=True)
    assert wait_exit(pid) == 143


def test_state_reads_the_cell_when_start_died_half_way(zic):
    pid = make(zic, "created")
    # `jailhouse cell start` happened, but the start verb never recorded it.
    assert zic.board.jailhouse("cell", "start", "t1").returncode == 0
    state = zic.state("t1")
    assert state["status"] == "running" and state["pid"] == pid
    zic.run("kill", "t1", "TERM", check=True)
    assert wait_exit(pid) == 143


def test_other_signals_are_refused_and_change_nothing(zic):
    pid = make(zic, "running")
    result = zic.run("kill", "t1", "USR1")
    assert result.returncode == 1 and "not supported" in result.stderr
    assert zic.status("t1") == "running" and zic.state("t1")["pid"] == pid
    assert zic.board.cell_state("t1") == "running"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_run_goes_to_the_zic(zic, sig, code):
    import subprocess

    from tests.test_lifecycle_harness import RUNPHI

    bundle = zic.bundle("sig", guest_script("tick 50 alive"))
    out = open(zic.base / "run.out", "wb")
    proc = subprocess.Popen([str(RUNPHI), "--root", str(zic.root), "run", "--bundle", str(bundle), "runsig"],
                            env=zic.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    try:
        wait_for(lambda: zic.board.cell_state("runsig") == "running", what="running")
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
        assert "Traceback" not in (zic.base / "run.out").read_text()
        assert zic.board.cells() == {} and not (zic.root / "runsig").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
