"""OCI hooks: order, stdin state, args/env, timeout and failure rules (runphi.hooks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runphi.hooks import HookFailed, run_hooks, run_hooks_best_effort
from runphi.oci import Hook, HookState, encode_hook_state

STATE = encode_hook_state(HookState(oci_version="1.0.2", id="zic1", status="creating", pid=4242,
                                    bundle="/b", annotations={"k": "v"}))


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_hooks_run_in_order_and_each_reads_the_state_on_stdin(tmp_path):
    log = tmp_path / "log"
    hooks = [
        Hook(path=script(tmp_path, f"h{i}", f'echo "h{i} $(cat)" >> {log}\n')) for i in range(3)
    ]
    run_hooks("createRuntime", hooks, STATE, "zic1")
    lines = log.read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["h0", "h1", "h2"]
    state = json.loads(lines[0].split(" ", 1)[1])
    assert state == {"ociVersion": "1.0.2", "id": "zic1", "status": "creating", "pid": 4242,
                     "bundle": "/b", "annotations": {"k": "v"}}


def test_args_replace_argv_and_env_replaces_the_environment(tmp_path):
    out = tmp_path / "out"
    path = script(tmp_path, "h", f'echo "$0|$1|$2|${{ONLY:-}}|${{HOME:-unset}}" > {out}\n')
    run_hooks("poststart", [Hook(path=path, args=["custom-argv0", "a", "b"], env=["ONLY=1"])], STATE, "zic1")
    assert out.read_text().strip().split("|")[1:] == ["a", "b", "1", "unset"]


def test_absent_env_inherits_the_runtime_environment(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("RUNPHI_HOOK_PROBE", "inherited")
    run_hooks("poststart", [Hook(path=script(tmp_path, "h", f'echo "$RUNPHI_HOOK_PROBE" > {out}\n'))],
              STATE, "zic1")
    assert out.read_text().strip() == "inherited"


def test_a_failing_hook_stops_the_rest_and_names_itself(tmp_path):
    marker = tmp_path / "ran"
    hooks = [Hook(path=script(tmp_path, "bad", "echo oops >&2; exit 3\n")),
             Hook(path=script(tmp_path, "next", f"touch {marker}\n"))]
    with pytest.raises(HookFailed) as err:
        run_hooks("createRuntime", hooks, STATE, "zic1")
    message = str(err.value)
    assert "createRuntime hook #0" in message and "zic1" in message
    assert "exit status 3" in message and "oops" in message
    assert not marker.exists()


def test_timeout_kills_the_hook_and_everything_it_started(tmp_path):
    pidfile = tmp_path / "child.pid"
    # The hook starts a background sleeper that would hold the pipes open forever.
    path = script(tmp_path, "slow", f"sleep 60 & echo $! > {pidfile}\nwait\n")
    began = time.monotonic()
    with pytest.raises(HookFailed, match="ran past its timeout of 1 s"):
        run_hooks("createContainer", [Hook(path=path, timeout=1)], STATE, "zic1")
    assert time.monotonic() - began < 10
    assert process_gone(int(pidfile.read_text()), within=5.0)


def process_gone(pid: int, within: float) -> bool:
    """True once `pid` no longer exists or is a zombie (polls /proc: a file)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


def test_a_missing_hook_binary_is_one_clear_error(tmp_path):
    with pytest.raises(HookFailed, match="could not be run"):
        run_hooks("prestart", [Hook(path=str(tmp_path / "nope"))], STATE, "zic1")


def test_best_effort_runs_every_hook_and_returns_the_failures(tmp_path):
    marker = tmp_path / "ran"
    hooks = [Hook(path=script(tmp_path, "bad", "exit 1\n")),
             Hook(path=script(tmp_path, "good", f"touch {marker}\n"))]
    failures = run_hooks_best_effort("poststop", hooks, STATE, "zic1")
    assert len(failures) == 1 and "poststop hook #0" in str(failures[0])
    assert marker.exists()


def test_a_hook_that_ignores_stdin_is_fine(tmp_path):
    run_hooks("poststart", [Hook(path=script(tmp_path, "h", "exit 0\n"))], STATE * 10000, "zic1")
