"""OCI hooks around a ZIC's lifecycle: which verb runs which kind, in what order, with what state."""

from __future__ import annotations

import json

from tests.test_lifecycle_harness import board, guest_script, subreaper, wait_exit, wait_for, zic  # noqa: F401


def recorder(tmp_path, name: str, log) -> dict:
    path = tmp_path / f"hook-{name}"
    path.write_text(f'#!/bin/sh\nprintf "%s %s\\n" "{name}" "$(cat)" >> {log}\n')
    path.chmod(0o755)
    return {"path": str(path)}


def entries(log) -> list[tuple[str, dict]]:
    out = []
    for line in log.read_text().splitlines():
        name, state = line.split(" ", 1)
        out.append((name, json.loads(state)))
    return out


def test_every_kind_runs_at_its_verb_in_order_with_the_state_on_stdin(zic, tmp_path):
    log = tmp_path / "hooks.log"
    kinds = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")
    hooks = {kind: [recorder(tmp_path, f"{kind}{i}", log) for i in range(2)] for kind in kinds}
    pid = zic.create("hooked", zic.bundle("hooked", guest_script("tick 50 x"), hooks=hooks,
                                          annotations={"org.example": "1"}))
    after_create = entries(log)
    assert [n for n, _ in after_create] == ["prestart0", "prestart1", "createRuntime0", "createRuntime1",
                                             "createContainer0", "createContainer1"]
    for _, state in after_create:
        assert state["id"] == "hooked" and state["status"] == "creating" and state["pid"] == pid
        assert state["annotations"]["org.example"] == "1" and state["bundle"].endswith("hooked")

    zic.run("start", "hooked", check=True)
    started = entries(log)[len(after_create):]
    assert [n for n, _ in started] == ["poststart0", "poststart1"]
    assert all(s["status"] == "running" and s["pid"] == pid for _, s in started)

    zic.run("kill", "hooked", "TERM", check=True)
    assert wait_exit(pid) == 143
    assert len(entries(log)) == 8  # nothing runs at kill
    zic.run("delete", "hooked", check=True)
    stopped = entries(log)[8:]
    assert [n for n, _ in stopped] == ["poststop0", "poststop1"]
    assert all(s["status"] == "stopped" and "pid" not in s for _, s in stopped)


def test_failing_poststart_fails_start_and_stops_the_container(zic, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("#!/bin/sh\nexit 2\n")
    bad.chmod(0o755)
    pid = zic.create("pfail", zic.bundle("pfail", guest_script("tick 50 x"),
                                         hooks={"poststart": [{"path": str(bad)}]}))
    result = zic.run("start", "pfail")
    assert result.returncode == 1 and "poststart hook #0" in result.stderr
    assert wait_exit(pid) == 143
    assert zic.status("pfail") == "stopped"


def test_failing_poststop_is_a_warning_and_delete_succeeds(zic, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("#!/bin/sh\nexit 2\n")
    bad.chmod(0o755)
    zic.create("psfail", zic.bundle("psfail", guest_script("tick 50 x"), hooks={"poststop": [{"path": str(bad)}]}))
    result = zic.run("delete", "psfail")
    assert result.returncode == 0
    assert "poststop hook #0" in result.stderr
    assert not (zic.root / "psfail").exists() and zic.board.cells() == {}


def test_hook_timeout_fails_create_and_undoes_it(zic, tmp_path):
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    bundle = zic.bundle("slow", guest_script("tick 50 x"),
                        hooks={"createContainer": [{"path": str(slow), "timeout": 1}]})
    result = zic.run("create", "--bundle", str(bundle), "slowz")
    assert result.returncode == 1 and "timeout of 1 s" in result.stderr
    assert zic.board.cells() == {} and not (zic.root / "slowz").exists()
