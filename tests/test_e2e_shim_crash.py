"""kill -9 of runphi's shim server at every step of a ZIC's Create and Delete, under the real containerd.

Each case runs a fresh node whose containerd carries ``RUNPHI_TEST_PAUSE_AT=<step>``
(runphi.pausepoint): the shim server stops itself there, the test kills it with
SIGKILL, and containerd — seeing the connection gone — runs the shim's ``delete``.
Afterwards no cell, ledger entry, runphi record or task may be left.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from runphi.pausepoint import ENV as PAUSE_ENV
from runphi.pausepoint import ONCE_ENV
from runphi.procfs import process_state
from tests.test_lifecycle_harness import wait_for
from tests.test_e2e_zic import GUEST_TIMEOUT, assert_nothing_left, ctr_run_zic, zic_rootfs
from tools.testbed.containerd import missing_requirements, processes_with_env, running_zic_node

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

CREATE_STEPS = ("create:record", "create:allocated", "create:cell-created", "create:loaded",
                "create:launched", "create:recorded")
DELETE_STEPS = ("delete:monitor-stopped", "delete:cell-destroyed", "delete:released")


def stopped_process(marker: str, timeout: float = GUEST_TIMEOUT) -> int:
    """The pid of the node's process that stopped itself at the pause point."""
    def stopped() -> int | None:
        pids = (int(line.split()[0]) for line in processes_with_env(marker, exclude=set()))
        return next((pid for pid in pids if process_state(pid) == "T"), None)

    return wait_for(stopped, timeout=timeout, what="a process stopped at the pause point")


@pytest.fixture
def paused_node(request, runphi_bin: Path, built_inmates: Path, tmp_path: Path):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    once = tmp_path / "paused-once"  # the shim's `delete` that follows the kill must not stop
    with running_zic_node(runphi_bin, mode="shim", prefix="rphi-crash-",
                          env={PAUSE_ENV: request.param, ONCE_ENV: str(once)}) as node:
        yield node


@pytest.mark.parametrize("paused_node", CREATE_STEPS + DELETE_STEPS, indirect=True)
def test_shim_killed_during_create_or_delete_leaves_nothing(paused_node, built_inmates, tmp_path):
    node = paused_node
    cid = "crash-create"
    rootfs = zic_rootfs(tmp_path, built_inmates / "hello.bin")
    argv = node.containerd.ctr_argv("run", "--rm", *node.zic_flags(), "--rootfs", str(rootfs), cid,
                                    "/boot/hello.bin")
    ctr = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=node.containerd.env)
    try:
        server = stopped_process(f"RUNPHI_STATE_DIR={node.base / 'node'}")
        os.kill(server, signal.SIGKILL)
        _, err = ctr.communicate(timeout=GUEST_TIMEOUT)
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
    if node.containerd.env[PAUSE_ENV] in CREATE_STEPS:
        assert ctr.returncode != 0, err  # the task never came to be
    node.containerd.ctr("containers", "rm", cid)
    assert_nothing_left(node, cid)
