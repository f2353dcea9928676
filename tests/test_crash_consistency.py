"""Crash consistency: `kill -9` of runphi at every step of create and delete.

Each step is a named pause point (runphi.pausepoint, env ``RUNPHI_TEST_PAUSE_AT``):
the verb stops itself there, the test kills it with SIGKILL — what the OOM killer
or a node reboot of the shim's child does — and then does what containerd's shim
does after a failed create: ``runphi delete --force <id>``. Afterwards no cell, no
ledger entry, no monitor and no state directory may be left, and a new create with
the same id must work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from runphi.pausepoint import ENV as PAUSE_ENV
from runphi.procfs import process_state
from tests.test_lifecycle_failures import live_runphi_descendants
from tests.test_lifecycle_harness import RUNPHI, board, guest_script, reap_all, subreaper, wait_for, zic  # noqa: F401

GUEST = guest_script("tick 50 x")

CREATE_STEPS = ["create:record", "create:allocated", "create:cell-created", "create:loaded",
                "create:launched", "create:recorded", "create:hooks-done"]
DELETE_STEPS = ["delete:monitor-stopped", "delete:cell-destroyed", "delete:released", "delete:unlinked"]


def run_until_paused(zic, step: str, *args: str) -> subprocess.Popen:
    """Start `runphi ARGS` with the pause point armed; return once it has stopped itself there."""
    env = dict(zic.env, **{PAUSE_ENV: step})
    out = open(zic.logs / f"{step.replace(':', '-')}.out", "wb")
    proc = subprocess.Popen([str(RUNPHI), "--root", str(zic.root), *args], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    out.close()
    try:
        wait_for(lambda: proc.poll() is not None or process_state(proc.pid) == "T", timeout=60,
                 what=f"runphi to stop at {step}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert proc.poll() is None, f"runphi ended ({proc.returncode}) before reaching {step}: " \
                                f"{(zic.logs / (step.replace(':', '-') + '.out')).read_text()}"
    return proc


def kill_nine(proc: subprocess.Popen) -> None:
    """SIGKILL and reap (the shim reaps its runtime child at once)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def ledger(zic) -> dict:
    path = zic.node / "jailhouse-ledger.json"
    return json.loads(path.read_text())["allocations"] if path.exists() else {}


def assert_clean(zic, cid: str) -> None:
    """Nothing of `cid` anywhere. A monitor whose create died before recording it is
    not known to delete: it must notice its cell is gone and end by itself."""
    assert zic.board.cells() == {}, "a cell was left behind"
    assert ledger(zic) == {}, "a ledger entry was left behind"
    assert not (zic.root / cid).exists(), "the state directory was left behind"
    wait_for(lambda: live_runphi_descendants() == [], timeout=30, what="every monitor to end")


def assert_id_reusable(zic, cid: str, bundle) -> None:
    """The id is free again: a full create works, and its delete leaves nothing."""
    zic.create(cid, bundle)
    assert zic.status(cid) == "created"
    assert zic.run("delete", "--force", cid).returncode == 0
    reap_all(zic.monitors)
    assert_clean(zic, cid)


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_create_killed_at_each_step_is_cleaned_by_delete_force(zic, step):
    cid = "crash-c"
    bundle = zic.bundle("b", GUEST)
    pid_file = zic.base / "crash.pid"
    proc = run_until_paused(zic, step, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid)
    kill_nine(proc)
    deleted = zic.run("delete", "--force", cid)
    assert deleted.returncode == 0, deleted.stderr
    assert "Traceback" not in deleted.stderr
    assert_clean(zic, cid)
    assert_id_reusable(zic, cid, bundle)


@pytest.mark.parametrize("step", DELETE_STEPS)
def test_delete_killed_at_each_step_is_finished_by_delete_force(zic, step):
    cid = "crash-d"
    bundle = zic.bundle("b", GUEST)
    zic.create(cid, bundle)
    zic.run("start", cid, check=True)
    proc = run_until_paused(zic, step, "delete", "--force", cid)
    kill_nine(proc)
    again = zic.run("delete", "--force", cid)
    assert again.returncode == 0, again.stderr
    reap_all(zic.monitors)
    assert_clean(zic, cid)
    assert_id_reusable(zic, cid, bundle)
    assert [name for name in os.listdir(zic.root)] == [], "a tombstone of the crashed delete is left"


@pytest.mark.parametrize(("armed", "stops"), [(None, False), ("create:other", False), ("create:here", True)])
def test_a_pause_point_stops_only_at_its_own_name(armed, stops):
    code = "from runphi.pausepoint import pause_point\npause_point('create:here')\nprint('passed')"
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    if armed:
        env[PAUSE_ENV] = armed
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        if stops:
            wait_for(lambda: proc.poll() is None and process_state(proc.pid) == "T", timeout=30,
                     what="the process to stop itself")
            proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (proc.returncode, out) == (0, "passed\n")


def test_a_once_pause_point_stops_only_the_first_process(tmp_path):
    code = "from runphi.pausepoint import pause_point\npause_point('create:here')\nprint('passed')"
    env = {**os.environ, PAUSE_ENV: "create:here", "RUNPHI_TEST_PAUSE_ONCE": str(tmp_path / "once")}
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        wait_for(lambda: first.poll() is None and process_state(first.pid) == "T", timeout=30,
                 what="the first process to stop itself")
        second = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, text=True, timeout=30)
        assert (second.returncode, second.stdout) == (0, "passed\n")  # ran through
        first.send_signal(signal.SIGCONT)
        out, _ = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert (first.returncode, out) == (0, "passed\n")
