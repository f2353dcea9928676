"""``runphi run`` of a ZIC on the simulated board: create + start (+ wait + delete)."""

from __future__ import annotations

import os
import subprocess
import termios

from tests.test_lifecycle_harness import RUNPHI, board, guest_script, subreaper, wait_exit, zic  # noqa: F401
from tests.fdread import read_until


def test_run_in_the_foreground_returns_the_guest_verdict_and_cleans_up(zic):
    bundle = zic.bundle("fg", guest_script("print hello from run\\n", "shutdown"))
    result = zic.run("run", "--bundle", str(bundle), "run-fg")
    assert result.returncode == 0, result.stderr
    assert "hello from run" in result.stdout
    gone = zic.run("state", "run-fg")
    assert gone.returncode == 1 and "does not exist" in gone.stderr
    assert zic.board.cell_state("run-fg") is None


def test_run_keep_leaves_a_stopped_container(zic):
    bundle = zic.bundle("keep", guest_script("print kept\\n", "shutdown"))
    result = zic.run("run", "--keep", "--bundle", str(bundle), "run-keep")
    assert result.returncode == 0, result.stderr
    assert zic.status("run-keep") == "stopped"
    assert zic.run("delete", "run-keep").returncode == 0


def test_run_detached_leaves_a_running_container(zic):
    bundle = zic.bundle("det", guest_script("tick 50 alive"))
    pid_file = zic.base / "det.pid"
    result = zic.run("run", "-d", "--pid-file", str(pid_file), "--bundle", str(bundle), "run-det")
    assert result.returncode == 0, result.stderr
    monitor = int(pid_file.read_text())
    zic.monitors.append(monitor)
    assert zic.status("run-det") == "running"
    assert zic.run("kill", "run-det", "TERM").returncode == 0
    assert wait_exit(monitor) == 143
    assert zic.run("delete", "run-det").returncode == 0


def test_events_stats_of_a_running_zic(zic):
    import json

    pid = zic.create("ev", zic.bundle("ev", guest_script("tick 50 alive")))
    zic.run("start", "ev", check=True)
    result = zic.run("events", "--stats", "ev")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    event = json.loads(line)
    assert (event["type"], event["id"]) == ("stats", "ev")
    assert event["data"]["cell"]["name"] == "ev" and event["data"]["cell"]["state"] == "running"
    assert isinstance(event["data"]["cell"]["exits"], dict)
    bad = zic.run("events", "--interval", "0s", "ev")
    assert bad.returncode == 1 and "invalid --interval '0s'" in bad.stderr
    zic.run("kill", "ev", "KILL", check=True)
    assert wait_exit(pid) == 137
    stopped = zic.run("events", "ev")
    assert stopped.returncode == 1 and "container with id ev is not running" in stopped.stderr
    zic.run("delete", "ev", check=True)


def _controlling_terminal_on_stdin() -> None:
    """In the child: a new session whose controlling terminal is fd 0, as in a login shell."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_run_with_a_terminal_and_no_console_socket_is_the_terminal_itself(zic):
    bundle = zic.bundle("tty", guest_script("print login: \\n", "echo until exit", "shutdown"), terminal=True)
    master, slave = os.openpty()
    cooked = termios.tcgetattr(slave)
    proc = subprocess.Popen([str(RUNPHI), "--root", str(zic.root), "run", "--bundle", str(bundle), "run-tty"],
                            stdin=slave, stdout=slave, stderr=slave, env=zic.env,
                            preexec_fn=_controlling_terminal_on_stdin)
    os.close(slave)
    try:
        read_until(master, b"login: \r\n")
        # Raw: the guest gets the line at once with Enter as \r and is the only one to echo it.
        os.write(master, b"hello tty\r")
        assert read_until(master, b"tty\r") == b"hello tty\r"
        # Ctrl-C is a byte for the guest, not a SIGINT for run (which would end it with 130).
        os.write(master, b"\x03\r")
        assert read_until(master, b"\x03\r") == b"\x03\r"
        os.write(master, b"exit\r")
        assert proc.wait(timeout=30) == 0
        assert termios.tcgetattr(master) == cooked, "run must restore the terminal's settings"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    gone = zic.run("state", "run-tty")
    assert gone.returncode == 1 and "does not exist" in gone.stderr


def test_run_with_a_terminal_relays_plain_stdio_too(zic):
    bundle = zic.bundle("ttyp", guest_script("print over the pty\\n", "shutdown"), terminal=True)
    result = zic.run("run", "--bundle", str(bundle), "run-ttyp")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "over the pty\r\n"


def test_run_detached_with_a_terminal_still_needs_a_console_socket(zic):
    bundle = zic.bundle("ttyd", guest_script("tick 50 x"), terminal=True)
    result = zic.run("run", "-d", "--bundle", str(bundle), "run-ttyd")
    assert result.returncode == 1
    assert "process.terminal is true but no --console-socket" in result.stderr
    assert zic.board.cell_state("run-ttyd") is None
