"""``runphi run`` of a ZIC on the simulated board: create + start (+ wait + delete)."""

from __future__ import annotations

from tests.test_lifecycle_harness import board, guest_script, subreaper, wait_exit, zic  # noqa: F401


def test_run_in_the_foreground_returns_the_guest_verdict_and_cleans_up(zic):
    bundle = zic.bundle("fg", guest_script("print hello from run\\n", "shutdown"))
    result = zic.run("run", "--bundle", str(bundle), "run-fg")
    assert result.returncode == 0, result.stderr
    assert "hello from run" in result.stdout
    gone = zic.run("state", "run-fg")
    assert gone.returncode == 1 and "does not exist" in gone.stderr
    assert zic.board.cell_state("run-fg") is None


def test_run_keep_leaves_a_stopped_container(zic):
    bundle = zic.bundle("keep", guest_script("print kept\\n", "shutdown"))
    result = zic.run("run", "--keep", "--bundle", str(bundle), "run-keep")
    assert result.returncode == 0, result.stderr
    assert zic.status("run-keep") == "stopped"
    assert zic.run("delete", "run-keep").returncode == 0


def test_run_detached_leaves_a_running_container(zic):
    bundle = zic.bundle("det", guest_script("tick 50 alive"))
    pid_file = zic.base / "det.pid"
    result = zic.run("run", "-d", "--pid-file", str(pid_file), "--bundle", str(bundle), "run-det")
    assert result.returncode == 0, result.stderr
    monitor = int(pid_file.read_text())
    zic.monitors.append(monitor)
    assert zic.status("run-det") == "running"
    assert zic.run("kill", "run-det", "TERM").returncode == 0
    assert wait_exit(monitor) == 143
    assert zic.run("delete", "run-det").returncode == 0


def test_events_stats_of_a_running_zic(zic):
    import json

    pid = zic.create("ev", zic.bundle("ev", guest_script("tick 50 alive")))
    zic.run("start", "ev", check=True)
    result = zic.run("events", "--stats", "ev")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    event = json.loads(line)
    assert (event["type"], event["id"]) == ("stats", "ev")
    assert event["data"]["cell"]["name"] == "ev" and event["data"]["cell"]["state"] == "running"
    assert isinstance(event["data"]["cell"]["exits"], dict)
    bad = zic.run("events", "--interval", "0s", "ev")
    assert bad.returncode == 1 and "invalid --interval '0s'" in bad.stderr
    zic.run("kill", "ev", "KILL", check=True)
    assert wait_exit(pid) == 137
    stopped = zic.run("events", "ev")
    assert stopped.returncode == 1 and "container with id ev is not running" in stopped.stderr
    zic.run("delete", "ev", check=True)
