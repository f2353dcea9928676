"""The monitor side of console streaming (issue #7): played exactly as the shim plays it.

* no terminal: `create` gets pipes as fds 0/1/2; the monitor inherits them;
  guest output arrives on the stdout pipe, which reaches EOF when the monitor exits;
* terminal: the pty master arrives over `--console-socket`; bytes typed into it
  reach the guest and its echo comes back; create's own stdio is not kept.
"""

from __future__ import annotations

import os
import socket
import subprocess

from tests.fdread import read_to_eof, read_until
from tests.test_lifecycle_harness import (RUNPHI, board, guest_script, subreaper, wait_exit,  # noqa: F401
                                          zic)


def create_with_pipes(zic, cid: str, bundle) -> tuple[int, int, int]:
    """`runphi create` with shim-style pipes; returns (monitor pid, stdin write end, stdout read end)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pid_file = zic.base / f"{cid}.pid"
    proc = subprocess.run([str(RUNPHI), "--root", str(zic.root), "create", "--bundle", str(bundle),
                           "--pid-file", str(pid_file), cid],
                          stdin=in_r, stdout=out_w, stderr=out_w, env=zic.env, timeout=60)
    os.close(in_r)
    os.close(out_w)
    assert proc.returncode == 0, read_to_eof(out_r)
    pid = int(pid_file.read_text())
    zic.monitors.append(pid)
    return pid, in_w, out_r


def test_guest_output_reaches_the_stdout_pipe_and_it_closes_when_the_monitor_exits(zic):
    bundle = zic.bundle("b", guest_script("print hello from the cell\\n", "sleep 100", "print bye\\n", "shutdown"))
    pid, stdin, stdout = create_with_pipes(zic, "pipez", bundle)
    os.close(stdin)
    zic.run("start", "pipez", check=True)
    output = read_to_eof(stdout)
    assert output == b"hello from the cell\r\nbye\r\n"
    assert wait_exit(pid) == 0
    logs = zic.run("logs", "pipez")
    assert logs.returncode == 0 and "hello from the cell" in logs.stdout


def test_stdin_bytes_reach_the_guest_unchanged(zic):
    bundle = zic.bundle("b", guest_script("echo until quit", "shutdown"))
    pid, stdin, stdout = create_with_pipes(zic, "stdinz", bundle)
    zic.run("start", "stdinz", check=True)
    os.write(stdin, b"ping \xff\x00 pong\r")
    assert read_until(stdout, b"pong\r") == b"ping \xff\x00 pong\r"
    os.write(stdin, b"quit\r")
    assert wait_exit(pid) == 0
    os.close(stdin)
    os.close(stdout)


def test_terminal_session_round_trips_a_line(zic):
    bundle = zic.bundle("b", guest_script("print login: \\n", "echo until exit", "shutdown"), terminal=True)
    sock_dir = zic.base / "pty"
    sock_dir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_dir / "pty.sock"))
    listener.listen(1)
    out_r, out_w = os.pipe()
    pid_file = zic.base / "tty.pid"
    proc = subprocess.Popen([str(RUNPHI), "--root", str(zic.root), "create", "--bundle", str(bundle),
                             "--console-socket", str(sock_dir / "pty.sock"), "--pid-file", str(pid_file),
                             "ttyz"], stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, env=zic.env)
    os.close(out_w)
    assert proc.wait(timeout=60) == 0
    pid = int(pid_file.read_text())
    zic.monitors.append(pid)
    # In terminal mode the monitor must not keep create's stdout: it is at EOF already.
    assert read_to_eof(out_r, timeout=5) == b""
    os.close(out_r)
    conn, _ = listener.accept()
    with conn:
        message, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    listener.close()
    assert message and len(fds) == 1
    master = fds[0]
    assert os.isatty(master)
    zic.run("start", "ttyz", check=True)
    assert b"login: \r\n" in read_until(master, b"login: \r\n")
    os.write(master, b"hello tty\r")
    assert read_until(master, b"hello tty\r").endswith(b"hello tty\r")
    os.write(master, b"exit\r")
    assert wait_exit(pid) == 0
    os.close(master)
