"""`runphi run` of real aarch64 inmates booted by the simulator's QEMU engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_lifecycle_harness import RUNPHI, Board, Zic, board_in_tempdir, reap_all, subreaper  # noqa: F401
from tests.fdread import read_to_eof

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def inmates() -> Path:
    from tools.inmates.build import ensure_built, missing_tools

    reason = missing_tools()
    if reason or shutil.which("qemu-system-aarch64") is None:
        pytest.skip(f"QEMU inmates: {reason or 'qemu-system-aarch64 not found (apt-get install qemu-system-arm)'}")
    return ensure_built()


@pytest.fixture(scope="module")
def qemu_board(subreaper) -> Iterator[Board]:
    with board_in_tempdir("rphi-qsim-", engine="qemu") as sim:
        yield sim


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


def test_tty_session_with_the_echo_inmate_round_trips_a_line(qemu_board, inmates, tmp_path):
    import socket

    from tests.test_lifecycle_harness import wait_exit
    from tests.fdread import read_until

    z = Zic(qemu_board, tmp_path)
    bundle = z.bundle("echo", (inmates / "echo.bin").read_bytes(), terminal=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "pty.sock"))
    listener.listen(1)
    pid = z.create("echo1", bundle, "--console-socket", str(tmp_path / "pty.sock"))
    conn, _ = listener.accept()
    with conn:
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    listener.close()
    master = fds[0]
    try:
        z.run("start", "echo1", check=True)
        assert b"> " in read_until(master, b"> ", timeout=60)
        os.write(master, b"hello from the shim\r")
        assert b"hello from the shim\r\n" in read_until(master, b"hello from the shim\r\n", timeout=30)
        os.write(master, b"exit\r")
        assert wait_exit(pid, timeout=60) == 0
    finally:
        os.close(master)
        reap_all(z.monitors)
        z.run("delete", "--force", "echo1")


@pytest.mark.parametrize(("signal_name", "code"), [("TERM", 143), ("KILL", 137)])
def test_killing_the_qemu_ticker(qemu_board, inmates, tmp_path, signal_name, code):
    from tests.test_lifecycle_harness import wait_exit, wait_for

    z = Zic(qemu_board, tmp_path)
    pid = z.create("tick1", z.bundle("ticker", (inmates / "ticker.bin").read_bytes()))
    try:
        z.run("start", "tick1", check=True)
        wait_for(lambda: "tick 1" in z.run("logs", "tick1").stdout, timeout=60, what="first tick")
        z.run("kill", "tick1", signal_name, check=True)
        assert wait_exit(pid, timeout=60) == code
        assert qemu_board.cell_state("tick1") in ("shut down", None)
    finally:
        reap_all(z.monitors)
        z.run("delete", "--force", "tick1")
    assert qemu_board.cells() == {}
