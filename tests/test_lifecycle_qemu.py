"""`runphi run` of real aarch64 inmates booted by the simulator's QEMU engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_lifecycle_harness import RUNPHI, Board, Zic, reap_all, subreaper  # noqa: F401
from tests.test_monitor_console import read_to_eof

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def inmates() -> Path:
    from tools.inmates.build import ensure_built, missing_tools

    reason = missing_tools()
    if reason or shutil.which("qemu-system-aarch64") is None:
        pytest.skip(f"QEMU inmates: {reason or 'qemu-system-aarch64 not found (apt-get install qemu-system-arm)'}")
    return ensure_built()


@pytest.fixture(scope="module")
def qemu_board(subreaper) -> Board:
    base = Path(tempfile.mkdtemp(prefix="rphi-qsim-"))
    sim = Board(base / "sim", engine="qemu")
    sim.up()
    try:
        yield sim
    finally:
        sim.down()
        shutil.rmtree(base, ignore_errors=True)


def test_run_hello_prints_its_banner_and_exits_0(qemu_board, inmates, tmp_path):
    z = Zic(qemu_board, tmp_path)
    bundle = z.bundle("hello", (inmates / "hello.bin").read_bytes())
    out_r, out_w = os.pipe()
    proc = subprocess.Popen([str(RUNPHI), "--root", str(z.root), "run", "--bundle", str(bundle), "hello1"],
                            stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, env=z.env)
    os.close(out_w)
    try:
        output = read_to_eof(out_r, timeout=60)
        assert proc.wait(timeout=30) == 0, output
        assert b"hello: done, powering off" in output
        assert b"hello" in output.splitlines()[0]
        # run deletes the container afterwards: nothing is left.
        assert qemu_board.cells() == {}
        assert not (z.root / "hello1").exists()
    finally:
        os.close(out_r)
        proc.kill()
        proc.wait()


def test_crash_inmate_exits_139(qemu_board, inmates, tmp_path):
    z = Zic(qemu_board, tmp_path)
    bundle = z.bundle("crash", (inmates / "crash.bin").read_bytes())
    result = z.run("run", "--bundle", str(bundle), "crash1", timeout=90)
    assert result.returncode == 139, result.stderr
    assert qemu_board.cells() == {}
    reap_all(z.monitors)
