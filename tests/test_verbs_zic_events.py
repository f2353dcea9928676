"""`runphi events` for a ZIC: stats, cell-state transitions and failures, as JSON lines."""

from __future__ import annotations

import json

import trio

from runphi.backends.jailhouse.backend import JailhouseBackend
from runphi.cell_events import stream
from runphi.config import load_runtime_config
from runphi.container import monitor_alive
from tests.test_lifecycle_harness import board, guest_script, subreaper, wait_exit, wait_for, zic  # noqa: F401


def backend_for(zic) -> JailhouseBackend:
    return JailhouseBackend(load_runtime_config(zic.env))


async def test_stream_reports_transitions_stats_and_the_failure(zic):
    pid = zic.create("ev", zic.bundle("ev", guest_script("tick 20 x", "")))
    zic.create("ev2", zic.bundle("ev2", guest_script("sleep 300", "fault")))
    lines: list[dict] = []
    record = None

    def still_running() -> bool:
        return monitor_alive(record)

    from runphi.store import Store

    zic.run("start", "ev2", check=True)
    record = Store(zic.root).read("ev2")
    with trio.fail_after(20):
        await stream(backend_for(zic), "ev2", record.cell, interval=0.05, poll=0.02, still_running=still_running,
                     write=lambda data: lines.append(json.loads(data)))
    kinds = [line["type"] for line in lines]
    states = [line["data"]["state"] for line in lines if line["type"] == "cell-state"]
    assert states[0] == "running" and states[-1] == "failed"
    failed = [line for line in lines if line["type"] == "failed"]
    assert len(failed) == 1 and failed[0]["data"]["failed_cpus"]
    assert "stats" in kinds
    stats = next(line for line in lines if line["type"] == "stats")["data"]["cell"]
    assert stats["name"] == "ev2" and "total" in stats["exits"]
    assert all(line["id"] == "ev2" for line in lines)
    assert wait_exit(record.monitor_pid) == 139
    zic.run("kill", "ev", "TERM", check=True)
    assert wait_exit(pid) == 143


def test_events_stats_once_via_the_cli(zic):
    zic.create("evs", zic.bundle("evs", guest_script("tick 20 x")))
    zic.run("start", "evs", check=True)
    result = zic.run("events", "--stats", "evs", check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 1 and lines[0]["type"] == "stats" and lines[0]["id"] == "evs"


def test_events_stream_via_the_cli_ends_when_the_container_stops(zic):
    pid = zic.create("evc", zic.bundle("evc", guest_script("tick 20 x", "")))
    zic.run("start", "evc", check=True)
    import subprocess

    from tests.test_lifecycle_harness import RUNPHI

    events = subprocess.Popen([str(RUNPHI), "--root", str(zic.root), "events", "--interval", "50ms", "evc"],
                              env=zic.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    first = json.loads(events.stdout.readline())
    assert first == {"type": "cell-state", "id": "evc", "data": {"state": "running", "previous": None}}
    zic.run("kill", "evc", "TERM", check=True)
    out, err = events.communicate(timeout=30)
    assert events.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert {"type": "cell-state", "id": "evc", "data": {"state": "shut down", "previous": "running"}} in lines
    assert wait_exit(pid) == 143
