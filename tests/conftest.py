"""Shared fixtures: the reference material, the runphi binary, a private containerd."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tools.testbed.containerd import (PrivateContainerd, make_busybox_rootfs, missing_requirements,
                              runphi_binary, short_tempdir)

REPO_ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only reference material: ``$RUNPHI_SHARED`` or ``../shared`` from the repo root."""
    path = Path(os.environ.get("RUNPHI_SHARED") or REPO_ROOT.parent / "shared")
    if not path.is_dir():
        pytest.skip(f"reference material not found at {path} (set RUNPHI_SHARED)")
    return path


@pytest.fixture(scope="session")
def runphi_bin() -> Path:
    """Absolute path of the installed ``runphi`` console script."""
    return runphi_binary()


@pytest.fixture(scope="session")
def containerd(runphi_bin: Path):
    """A private containerd (own root/state/socket/config), stopped after the session."""
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    base = short_tempdir("rphi-ctd-")
    daemon = PrivateContainerd(base, runphi_bin, env={"RUNPHI_STATE_DIR": str(base / "node")})
    daemon.start()
    try:
        yield daemon
    finally:
        try:
            daemon.remove_leftovers()
        finally:
            daemon.stop()
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def start_containerd(runphi_bin: Path):
    """Factory for tests that need their own containerd environment (e.g. a simulator).

    ``start_containerd(env={"RUNPHI_BACKEND": "jailhouse", ...}, cri=False)`` returns a
    started :class:`PrivateContainerd`; the shims and runphi inherit ``env``. Every
    daemon started this way is cleaned up and stopped after the test.
    """
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    started: list[PrivateContainerd] = []

    def start(env: dict[str, str] | None = None, cri: bool = False) -> PrivateContainerd:
        base = short_tempdir("rphi-ctd-")
        daemon = PrivateContainerd(base, runphi_bin, env={"RUNPHI_STATE_DIR": str(base / "node"),
                                                          **(env or {})}, cri=cri)
        started.append(daemon)
        daemon.start()
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            try:
                daemon.remove_leftovers()
            finally:
                daemon.stop()
                shutil.rmtree(daemon.base, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_rootfs(containerd: PrivateContainerd) -> Path:
    """A static-busybox rootfs inside the private containerd's directory."""
    return make_busybox_rootfs(containerd.base / "busybox-rootfs")


class RecordFactory:
    """Writes runphi container records whose monitor is a real process the test owns."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list = []

    def live_process(self):
        """A real long-running process standing in for a ZIC's monitor."""
        import subprocess

        process = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def __call__(self, container_id: str, status: str = "created", *, alive: bool = True,
                 bundle: Path | None = None, annotations: dict[str, str] | None = None):
        """Store a record for ``container_id``; ``alive=False`` records a process that is gone."""
        import subprocess

        from runphi.container import ContainerRecord, identify_process
        from runphi.log import rfc3339_nano
        from runphi.store import Store

        if alive:
            pid, start = identify_process(self.live_process().pid)
        else:
            gone = subprocess.Popen(["true"])
            gone.wait()
            pid, start = gone.pid, 1
        bundle = bundle or self.root / f"bundle-{container_id}"
        record = ContainerRecord(
            id=container_id, bundle=str(bundle), rootfs=str(bundle / "rootfs"),
            created=rfc3339_nano(1_700_000_000_123_456_000), status=status, oci_version="1.0.2",
            annotations=annotations or {}, monitor_pid=pid, monitor_start_time=start)
        store = Store(self.root)
        with store.creating(record):
            config = {"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                      "annotations": annotations or {}}
            (store.container_dir(container_id) / "config.json").write_text(json.dumps(config))
        return record

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


@pytest.fixture
def state_root(tmp_path: Path) -> Path:
    """An empty state root (what ``--root`` points at)."""
    root = tmp_path / "state"
    root.mkdir()
    return root


@pytest.fixture
def make_record(state_root: Path):
    """Factory: ``make_record(id, status, alive=True)`` → a stored ContainerRecord."""
    factory = RecordFactory(state_root)
    try:
        yield factory
    finally:
        factory.close()


def _missing_qemu_inmates() -> str | None:
    """Why the QEMU-engine inmates cannot run here, or None when they can."""
    from tools.inmates.build import missing_tools

    if shutil.which("qemu-system-aarch64") is None:
        return "qemu-system-aarch64 not found (apt-get install qemu-system-arm)"
    return missing_tools()


@pytest.fixture(scope="session")
def built_inmates() -> Path:
    """Directory of the built aarch64 test inmates (``<program>.bin``); skips without QEMU or gcc."""
    from tools.inmates.build import ensure_built

    reason = _missing_qemu_inmates()
    if reason:
        pytest.skip(f"QEMU inmates: {reason}")
    return ensure_built()


@pytest.fixture(scope="module", params=["shim", "runc-cli"])
def zic_node(request, runphi_bin: Path, built_inmates: Path):
    """A simulated board (QEMU engine) and a private containerd whose runphi drives it,
    once per mode: runphi's own shim, and runc's shim with runphi as its runc.

    One per test module and mode; tests use their own container ids and remove what
    they start. Teardown removes every container, stops containerd and the board.
    """
    from tools.testbed.containerd import running_zic_node

    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    with running_zic_node(runphi_bin, mode=request.param) as node:
        yield node


@pytest.fixture(scope="module")
def zic_events(zic_node):
    """``ctr events`` of the ``zic_node`` containerd, recorded for the whole module."""
    from tools.testbed.containerd import EventLog

    events = EventLog(zic_node.containerd, zic_node.base / "events.log")
    try:
        yield events
    finally:
        events.close()
