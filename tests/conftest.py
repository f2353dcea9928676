"""Shared fixtures: the reference material, the runphi binary, a private containerd."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.containerd import (PrivateContainerd, make_busybox_rootfs, missing_requirements,
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


@pytest.fixture(scope="session")
def busybox_rootfs(containerd: PrivateContainerd) -> Path:
    """A static-busybox rootfs inside the private containerd's directory."""
    return make_busybox_rootfs(containerd.base / "busybox-rootfs")
