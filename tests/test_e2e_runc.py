"""Plain containers next to ZICs: in the containerd whose runphi drives a Jailhouse board,
a busybox container and a pause-style container still go to runc and behave exactly
as with runc itself as the shim's binary.

Each scenario runs once with ``--runc-binary runc`` and once with runphi, in the same
containerd, and everything observable (output, exit codes, events) must match.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tools.testbed.containerd import NAMESPACE, ZicNode, make_busybox_rootfs

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

#: What Kubernetes' pause container does: wait for a signal, exit 0 on TERM or INT.
PAUSE_SCRIPT = "trap 'exit 0' TERM INT; echo paused; while :; do sleep 1; done"


@pytest.fixture(scope="module")
def plain_rootfs(zic_node: ZicNode) -> Path:
    """A static-busybox rootfs (no /boot/config.json: not a ZIC)."""
    return make_busybox_rootfs(zic_node.base / "busybox-rootfs")


def binaries(zic_node: ZicNode) -> dict[str, str]:
    """The two runtime binaries compared: runc itself and runphi (which forwards to it)."""
    return {"runc": shutil.which("runc"), "runphi": str(zic_node.runphi)}


def wait_for_log(path: Path, text: str, timeout: float = 60.0) -> None:
    """Poll the task's log file (written by the shim) until it holds ``text``."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never showed {text!r}")
        time.sleep(0.05)


def test_busybox_output_and_exit_code_match_runc(zic_node, zic_events, plain_rootfs):
    outcomes = {}
    for which, binary in binaries(zic_node).items():
        cid = f"e2e-plain-{which}"
        result = zic_node.containerd.ctr(
            "run", "--rm", *zic_node.containerd.runtime_flags(binary), "--rootfs", str(plain_rootfs), cid,
            "sh", "-c", "echo out; echo err >&2; ls /; exit 7")
        outcomes[which] = (result.returncode, result.stdout, result.stderr, zic_events.exit_status(cid))
    assert outcomes["runphi"] == outcomes["runc"]
    code, stdout, stderr, status = outcomes["runc"]
    assert (code, stderr, status) == (7, b"err\n", 7)
    assert stdout.startswith(b"out\n") and b"bin\n" in stdout
    assert zic_node.cells() == {}  # a plain container never touches the board
    assert zic_node.ledger() == {}


def test_pause_style_container_is_runcs(zic_node, zic_events, plain_rootfs, tmp_path):
    outcomes = {}
    for which, binary in binaries(zic_node).items():
        cid = f"e2e-pause-{which}"
        log = tmp_path / f"{cid}.log"
        ctr = zic_node.containerd.ctr
        started = ctr("run", "-d", "--log-uri", f"file://{log}", *zic_node.containerd.runtime_flags(binary),
                      "--rootfs", str(plain_rootfs), cid, "sh", "-c", PAUSE_SCRIPT)
        assert started.returncode == 0, started.stderr
        wait_for_log(log, "paused\n")
        running = [row.split()[2] for row in ctr("task", "ls").stdout.decode().splitlines()[1:]
                   if row.split()[0] == cid]
        # runphi keeps no record of a container it forwarded: runc's state dir is the only one.
        records = sorted(p.name for p in (zic_node.containerd.runtime_root / NAMESPACE / cid).iterdir())
        killed = ctr("task", "kill", "--signal", "SIGTERM", cid)
        status = zic_events.exit_status(cid)
        removed = ctr("task", "rm", cid)
        ctr("containers", "rm", cid, check=True)
        outcomes[which] = {"running": running, "records": records, "kill": killed.returncode,
                           "status": status, "rm": (removed.returncode, removed.stdout),
                           "log": log.read_text()}
    assert outcomes["runphi"] == outcomes["runc"]
    assert outcomes["runc"]["running"] == ["RUNNING"]
    assert outcomes["runc"]["records"] == ["state.json"]
    assert (outcomes["runc"]["kill"], outcomes["runc"]["status"]) == (0, 0)
    assert zic_node.cells() == {}
    assert zic_node.ledger() == {}
