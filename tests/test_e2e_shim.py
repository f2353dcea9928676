"""runphi's own shim (``io.containerd.runphi.v2``) under the real containerd: what only the shim
mode has — plain containers handed to runc's shim, the task API's other calls, a shim
killed, containerd restarted under a running ZIC.

The ZIC cases every mode shares (output, exit codes, ``-t``, images, four at once) are in
tests/test_e2e_zic.py, which runs them in both modes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import REPO_ROOT
from tests.fdread import read_until
from tests.test_e2e_zic import GUEST_TIMEOUT, assert_nothing_left, ctr_run_zic, wait_for_text, zic_rootfs
from tools.testbed.containerd import (
    NAMESPACE,
    SHIM_RUNTIME,
    ZicNode,
    make_busybox_rootfs,
    missing_requirements,
    running_zic_node,
)

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

EXAMPLES = REPO_ROOT / "docs" / "examples"


@pytest.fixture(scope="module")
def shim_node(runphi_bin: Path, built_inmates: Path):
    """A simulated board and a private containerd that runs runphi as its own shim."""
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    with running_zic_node(runphi_bin, mode="shim", prefix="rphi-shim-") as node:
        yield node


@pytest.fixture(scope="module")
def shim_events(shim_node):
    from tools.testbed.containerd import EventLog

    events = EventLog(shim_node.containerd, shim_node.base / "events.log")
    try:
        yield events
    finally:
        events.close()


def bundle_dir(node: ZicNode, cid: str) -> Path:
    """containerd's bundle of task ``cid`` (exists while the task does)."""
    return node.containerd.state / "io.containerd.runtime.v2.task" / NAMESPACE / cid


def task_pid(node: ZicNode, cid: str) -> int:
    """The task's pid as ``ctr task ls`` shows it."""
    for row in node.containerd.ctr("task", "ls").stdout.decode().splitlines()[1:]:
        fields = row.split()
        if fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}")


def start_ticker(node: ZicNode, built_inmates: Path, tmp_path: Path, cid: str) -> Path:
    """``ctr run -d`` of the ticker inmate, console to a log file; returns the log once it ticks."""
    log = tmp_path / f"{cid}.log"
    started = ctr_run_zic(node, zic_rootfs(tmp_path, built_inmates / "ticker.bin"), cid, "-d",
                          "--log-uri", f"file://{log}")
    assert started.returncode == 0, started.stderr
    wait_for_text(log, "tick 2\r\n")
    return log


# ---- plain containers go to runc's shim ------------------------------------------------------

def test_plain_container_is_served_by_runcs_shim(shim_node, tmp_path):
    rootfs = make_busybox_rootfs(tmp_path / "busybox")
    ctr = shim_node.containerd.ctr
    started = ctr("run", "-d", "--runtime", SHIM_RUNTIME, "--env", "PATH=/bin", "--rootfs", str(rootfs),
                  "plain-sleep", "sleep", "600")
    assert started.returncode == 0, started.stderr
    try:
        bundle = bundle_dir(shim_node, "plain-sleep")
        key = os.path.join(str(shim_node.containerd.address), NAMESPACE, "plain-sleep")
        # runc's shim's own socket, in runc's own naming: runphi handed the task over.
        assert (bundle / "address").read_text() == \
            f"unix:///run/containerd/s/{hashlib.sha256(key.encode()).hexdigest()}"
        assert not (bundle / "runphi-shim.json").exists()
        assert not shim_node.record_dir("plain-sleep").exists()
        pid = task_pid(shim_node, "plain-sleep")
        assert Path(f"/proc/{pid}/exe").resolve().name == "busybox"
    finally:
        ctr("task", "kill", "--signal", "SIGKILL", "plain-sleep")
        ctr("task", "rm", "--force", "plain-sleep")
        ctr("containers", "rm", "plain-sleep")
    assert "plain-sleep" not in ctr("containers", "ls", "-q").stdout.decode().split()


def test_plain_container_output_and_exit_code(shim_node, tmp_path):
    rootfs = make_busybox_rootfs(tmp_path / "busybox")
    result = shim_node.containerd.ctr("run", "--rm", "--runtime", SHIM_RUNTIME, "--env", "PATH=/bin",
                                      "--rootfs", str(rootfs), "plain-echo", "sh", "-c", "echo plain; exit 3")
    assert (result.returncode, result.stdout) == (3, b"plain\n"), result.stderr


def test_plain_image_is_looked_at_through_containerds_snapshot_and_handed_to_runc(shim_node, tmp_path):
    # An image's rootfs is not mounted when `start` runs: runphi asks containerd for the
    # snapshot, finds no boot description, and runc's shim runs the container.
    from tests.cri.node import busybox_image_archive, host_architecture

    image = "docker.io/library/runphi-shim-busybox:1"
    archive = tmp_path / "busybox.tar"
    archive.write_bytes(busybox_image_archive(image, host_architecture()))
    ctr = shim_node.containerd.ctr
    imported = ctr("images", "import", "--platform", f"linux/{host_architecture()}", str(archive))
    assert imported.returncode == 0, imported.stderr
    try:
        result = ctr("run", "--rm", "--runtime", SHIM_RUNTIME, image, "plain-image", "sh", "-c",
                     "echo from an image; exit 4")
    finally:
        ctr("images", "rm", "--sync", image)
    assert (result.returncode, result.stdout) == (4, b"from an image\n"), result.stderr
    assert not shim_node.record_dir("plain-image").exists()
    assert "plain-image" not in ctr("containers", "ls", "-q").stdout.decode().split()


# ---- the task API's other calls --------------------------------------------------------------

def test_metrics_ps_and_refused_calls_of_a_running_zic(shim_node, built_inmates, tmp_path):
    cid = "shim-calls"
    ctr = shim_node.containerd.ctr
    start_ticker(shim_node, built_inmates, tmp_path, cid)
    try:
        metrics = ctr("task", "metrics", cid)
        assert metrics.returncode == 0, metrics.stderr
        assert b"memory.usage" in metrics.stdout, metrics.stdout
        processes = ctr("task", "ps", cid)
        assert processes.returncode == 0, processes.stderr
        assert str(task_pid(shim_node, cid)).encode() in processes.stdout
        paused = ctr("task", "pause", cid)
        assert paused.returncode == 1
        assert b"pause is not supported" in paused.stderr and b"not implemented" in paused.stderr
        execed = ctr("task", "exec", "--exec-id", "x", cid, "/bin/true")
        assert execed.returncode == 1 and b"exec is not supported" in execed.stderr, execed.stderr
    finally:
        ctr("task", "kill", "--signal", "SIGKILL", cid)
        ctr("task", "rm", "--force", cid)
        ctr("containers", "rm", cid)
    assert_nothing_left(shim_node, cid)


def test_the_runphi_cli_sees_a_shim_zic_but_leaves_acting_to_containerd(shim_node, built_inmates, tmp_path):
    cid = "shim-cli"
    ctr = shim_node.containerd.ctr
    start_ticker(shim_node, built_inmates, tmp_path, cid)
    root = shim_node.base / "node" / NAMESPACE  # the shim keeps a namespace's records here

    def runphi(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(shim_node.runphi), "--root", str(root), *args], capture_output=True,
                              env=shim_node.env, timeout=60, stdin=subprocess.DEVNULL)

    try:
        state = json.loads(runphi("state", cid).stdout)
        assert (state["status"], state["pid"]) == ("running", task_pid(shim_node, cid))
        for verb in ("kill", "delete"):
            refused = runphi(verb, cid)
            assert refused.returncode == 1
            [line] = refused.stderr.decode().splitlines()
            assert f"use `ctr task {verb} {cid}`" in line, line
        assert shim_node.cells()[cid] == "running"
    finally:
        ctr("task", "kill", "--signal", "SIGKILL", cid)
        ctr("task", "rm", "--force", cid)
        ctr("containers", "rm", cid)
    assert_nothing_left(shim_node, cid)


def test_kill_after_exit_is_not_found(shim_node, shim_events, built_inmates, tmp_path):
    cid = "shim-exited"
    ctr = shim_node.containerd.ctr
    started = ctr_run_zic(shim_node, zic_rootfs(tmp_path, built_inmates / "hello.bin"), cid, "-d")
    assert started.returncode == 0, started.stderr
    try:
        assert shim_events.exit_status(cid, timeout=GUEST_TIMEOUT) == 0
        killed = ctr("task", "kill", cid)
        assert killed.returncode == 1
        assert b"not found" in killed.stderr, killed.stderr
    finally:
        ctr("task", "rm", cid)
        ctr("containers", "rm", cid)
    assert_nothing_left(shim_node, cid)


# ---- runphi's own event -----------------------------------------------------------------------

class Subscriber:
    """docs/examples/cell_health_subscriber.py running against the node's containerd."""

    def __init__(self, node: ZicNode, work: Path) -> None:
        out = work / "proto"
        out.mkdir()
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(EXAMPLES), f"--python_out={out}",
                        str(EXAMPLES / "containerd_events.proto")], check=True, timeout=120)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(out), str(REPO_ROOT)]),
               "CONTAINERD_ADDRESS": str(node.containerd.address)}
        self.process = subprocess.Popen([sys.executable, str(EXAMPLES / "cell_health_subscriber.py")], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self.seen = bytearray()

    def line(self, timeout: float) -> dict | None:
        """The next JSON line it prints, or None if none comes within ``timeout``."""
        try:
            read_until(self.process.stdout.fileno(), b"\n", self.seen, timeout=timeout)
        except AssertionError:
            return None
        line, _, rest = bytes(self.seen).partition(b"\n")
        self.seen[:] = rest
        return json.loads(line)

    def wait_subscribed(self, node: ZicNode) -> None:
        """Publish probe failures until one comes back: from then on it sees every event."""
        for attempt in range(200):
            trio.run(publish_probe, node, f"probe-{attempt}")
            if (line := self.line(0.5)) is not None:
                assert line["container_id"].startswith("probe-"), line
                return
        raise AssertionError("the subscriber never received a probe")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


async def publish_probe(node: ZicNode, container_id: str) -> None:
    from runphi.shim.events import CELL_FAILED, Publisher
    from runphi.shim.proto.runphi_events_pb2 import CellFailed

    publisher = Publisher(str(node.containerd.base / "ttrpc.sock"), NAMESPACE, lambda line: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        publisher.publish(CELL_FAILED, CellFailed(container_id=container_id, state="probe"))
        assert await publisher.flush(10.0)
        nursery.cancel_scope.cancel()


def test_a_crashing_zic_announces_its_failed_cell(shim_node, shim_events, built_inmates, tmp_path):
    cid = "shim-crash"
    subscriber = Subscriber(shim_node, tmp_path)
    try:
        subscriber.wait_subscribed(shim_node)
        result = ctr_run_zic(shim_node, zic_rootfs(tmp_path, built_inmates / "crash.bin"), cid, "--rm")
        assert result.returncode == 139, result.stderr
        while (event := subscriber.line(GUEST_TIMEOUT)) is not None and event["container_id"] != cid:
            pass
    finally:
        subscriber.close()
    assert event is not None, "no /runphi/cell/failed for the crashed ZIC"
    assert event["namespace"] == NAMESPACE and event["cell"] == cid and event["state"] == "failed", event
    assert event["failed_cpus"] and set(event["failed_cpus"]) <= set(event["cpus"]), event
    assert_nothing_left(shim_node, cid)


# ---- crash and restart -------------------------------------------------------------------------

def test_killed_shim_leaves_no_cell_and_no_ledger_entry(shim_node, shim_events, built_inmates, tmp_path):
    cid = "shim-killed"
    start_ticker(shim_node, built_inmates, tmp_path, cid)
    assert shim_node.cells()[cid] == "running"
    os.kill(task_pid(shim_node, cid), signal.SIGKILL)
    # containerd sees the connection close, runs `delete`, and reports the task's end itself.
    assert shim_events.exit_status(cid, timeout=GUEST_TIMEOUT) == 137
    shim_node.containerd.ctr("containers", "rm", cid, check=True)
    assert_nothing_left(shim_node, cid)


def test_containerd_restart_reconnects_to_a_running_zic(shim_node, shim_events, built_inmates, tmp_path):
    cid = "shim-restart"
    ctr = shim_node.containerd.ctr
    log = start_ticker(shim_node, built_inmates, tmp_path, cid)
    pid = task_pid(shim_node, cid)
    shim_node.containerd.stop()
    shim_node.containerd.start()
    try:
        assert task_pid(shim_node, cid) == pid  # the same server, found through `address`
        ticks = log.read_text(errors="replace").count("tick")
        wait_for_text(log, f"tick {ticks + 2}\r\n")  # the console keeps flowing
        from tools.testbed.containerd import EventLog

        events = EventLog(shim_node.containerd, shim_node.base / "events-after-restart.log")
        try:
            killed = ctr("task", "kill", cid)
            assert killed.returncode == 0, killed.stderr
            # Published to the restarted containerd: the shim's publisher reconnected.
            assert events.exit_status(cid, timeout=GUEST_TIMEOUT) == 143
        finally:
            events.close()
    finally:
        ctr("task", "rm", "--force", cid)
        ctr("containers", "rm", cid)
    assert_nothing_left(shim_node, cid)
