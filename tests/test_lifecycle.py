"""ZIC lifecycle on the simulated board, through the real `runphi` CLI (issue #6 "Done when")."""

from __future__ import annotations

import os

from tests.test_lifecycle_harness import board, guest_script, subreaper, wait_exit, wait_for, zic  # noqa: F401


def test_create_start_state_kill_delete(zic):
    bundle = zic.bundle("b1", guest_script("print hello\\n", "tick 50 alive\\n"))
    pid = zic.create("zic1", bundle)
    assert zic.board.cell_state("zic1") == "shut down"
    state = zic.state("zic1")
    assert state["status"] == "created" and state["pid"] == pid

    zic.run("start", "zic1", check=True)
    assert wait_for(lambda: zic.board.cell_state("zic1") == "running", what="cell running")
    state = zic.state("zic1")
    assert state["status"] == "running" and state["pid"] == pid

    zic.run("kill", "zic1", "TERM", check=True)
    assert wait_exit(pid) == 143
    assert zic.board.cell_state("zic1") == "shut down"
    state = zic.state("zic1")
    assert state["status"] == "stopped" and state["pid"] == 0

    zic.run("delete", "zic1", check=True)
    assert zic.board.cell_state("zic1") is None
    assert not (zic.root / "zic1").exists()
    assert zic.run("state", "zic1").returncode == 1
    ledger = zic.node / "jailhouse-ledger.json"
    assert not ledger.exists() or "zic1" not in ledger.read_text()


def test_guest_self_shutdown_exits_0(zic):
    pid = zic.create("selfstop", zic.bundle("b", guest_script("print bye\\n", "shutdown")))
    zic.run("start", "selfstop", check=True)
    assert wait_exit(pid) == 0
    assert zic.status("selfstop") == "stopped"
    zic.run("delete", "selfstop", check=True)
    assert zic.board.cells() == {}


def test_monitor_is_adopted_by_the_subreaper(zic):
    pid = zic.create("adopt", zic.bundle("b", guest_script("tick 100 x")))
    with open(f"/proc/{pid}/stat") as stat:
        ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
    assert ppid == os.getpid()
