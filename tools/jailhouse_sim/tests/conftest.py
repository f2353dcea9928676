"""Fixtures for the simulator's own tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.jailhouse_sim.testing import jailhouse_sim  # noqa: F401 - re-exported fixture

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def vectors() -> Path:
    """``../shared/vectors`` (or ``$RUNPHI_SHARED/vectors``)."""
    shared = Path(os.environ.get("RUNPHI_SHARED") or REPO_ROOT.parent / "shared")
    path = shared / "vectors"
    if not path.is_dir():
        pytest.skip(f"reference vectors not found at {path} (set RUNPHI_SHARED)")
    return path


@pytest.fixture
def zephyr_demo(vectors: Path) -> Path:
    return vectors / "runphi-fork-rev13-qemu-arm64-zephyr-demo.cell"
