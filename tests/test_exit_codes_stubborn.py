"""Guests that will not stop: retries, escalation to destroy, and `kill KILL` as the last word."""

from __future__ import annotations

from tests.test_lifecycle_harness import board, guest_script, subreaper, wait_exit, wait_for, zic  # noqa: F401


def running(zic, cid: str, **annotations: str) -> int:
    pid = zic.create(cid, zic.bundle(cid, guest_script("lock", "tick 50 alive"), annotations=annotations))
    zic.run("start", cid, check=True)
    wait_for(lambda: zic.board.cell_state(cid) == "running/locked", what="locked")
    return pid


def test_refused_shutdown_requests_are_retried(zic):
    pid = running(zic, "retry")
    zic.board.inject("--op", "shutdown", "--errno", "EPERM", "--count", "3")
    zic.run("kill", "retry", "TERM", check=True)
    assert wait_exit(pid) == 143
    assert zic.board.cell_state("retry") == "shut down"


def test_a_guest_that_never_stops_is_destroyed_after_the_deadline(zic):
    pid = running(zic, "never", **{"org.runphi.shutdown-timeout-ms": "300"})
    zic.board.inject("--op", "shutdown", "--errno", "EPERM", "--count", "-1")
    try:
        zic.run("kill", "never", "TERM", check=True)
        assert wait_exit(pid) == 143
        assert zic.board.cell_state("never") is None
    finally:
        zic.board.inject("--clear")
    zic.run("delete", "never", check=True)


def test_kill_term_then_kill_kill_on_a_cell_that_refuses_everything(zic):
    pid = running(zic, "stubborn")
    zic.board.inject("--op", "shutdown", "--errno", "EPERM", "--count", "-1")
    zic.board.inject("--op", "destroy", "--errno", "EPERM", "--count", "-1")
    try:
        zic.run("kill", "stubborn", "TERM", check=True)
        assert zic.status("stubborn") == "running"  # the monitor keeps trying
        result = zic.run("kill", "stubborn", "KILL")
        assert result.returncode == 0
        assert wait_exit(pid) == 137
        assert zic.status("stubborn") == "stopped"
        assert zic.board.cell_state("stubborn") == "running/locked"
        assert zic.run("delete", "stubborn").returncode == 1  # the cell still refuses
    finally:
        zic.board.inject("--clear")
    zic.run("delete", "stubborn", check=True)
    assert zic.board.cells() == {}


def test_bad_shutdown_timeout_annotation_is_refused(zic):
    bundle = zic.bundle("b", guest_script("tick 50 x"), annotations={"org.runphi.shutdown-timeout-ms": "soon"})
    result = zic.run("create", "--bundle", str(bundle), "badgrace")
    assert result.returncode == 1 and "shutdown-timeout-ms" in result.stderr
    assert zic.board.cells() == {}
