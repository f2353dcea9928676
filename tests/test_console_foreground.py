"""``runphi run``'s own terminal: the user's tty relayed to a container pty, raw, sized, restored.

The relay runs in a real child process whose controlling terminal is a real pty
(the "user's terminal"), so resizing it delivers a real SIGWINCH; the test holds
the container pty's slave, which is where a monitor would sit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import termios

import pytest

from runphi.console import ConsoleError
from runphi.console.foreground import PrivateConsoleSocket
from runphi.console.terminal import open_console_pty, send_console_master, set_window_size, window_size
from tests.test_lifecycle_harness import wait_for
from tests.fdread import read_until

RELAY = "import sys; from runphi.console.foreground import relay_terminal; relay_terminal(int(sys.argv[1]))"


def _session_on_stdin() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def relay():
    """(user-terminal master, container-pty slave, relay process, the user's original termios)."""
    user_master, user_slave = os.openpty()
    set_window_size(user_master, height=33, width=101)
    cooked = termios.tcgetattr(user_slave)
    container = open_console_pty(inheritable_slave=False)
    proc = subprocess.Popen([sys.executable, "-c", RELAY, str(container.master)], stdin=user_slave,
                            stdout=user_slave, stderr=subprocess.DEVNULL, pass_fds=[container.master],
                            preexec_fn=_session_on_stdin)
    os.close(user_slave)
    os.close(container.master)
    yield user_master, container.slave, proc, cooked
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    os.close(user_master)
    with contextlib.suppress(OSError):  # the hang-up test closed it already
        os.close(container.slave)


def test_keys_go_in_raw_output_comes_out_and_the_size_follows(relay):
    user, container, proc, cooked = relay
    wait_for(lambda: window_size(container) == (33, 101), what="the initial size copied")
    os.write(user, b"ls\r\x03")
    assert read_until(container, b"\x03") == b"ls\r\x03"
    os.write(container, b"guest says hi\r\n")
    assert read_until(user, b"\r\n") == b"guest says hi\r\n"
    set_window_size(user, height=40, width=120)  # the kernel sends SIGWINCH to the relay
    wait_for(lambda: window_size(container) == (40, 120), what="the new size followed")
    assert proc.poll() is None


def test_the_relay_ends_when_the_container_side_hangs_up_and_restores_the_tty(relay):
    user, container, proc, cooked = relay
    os.write(container, b"last words\r\n")
    os.close(container)
    assert proc.wait(timeout=10) == 0
    assert read_until(user, b"\r\n") == b"last words\r\n"
    assert termios.tcgetattr(user) == cooked


def test_the_private_socket_hands_over_exactly_the_pty_create_sends(tmp_path):
    console = PrivateConsoleSocket()
    directory = os.path.dirname(console.path)
    assert os.stat(directory).st_mode & 0o777 == 0o700
    pty = open_console_pty()
    send_console_master(console.path, pty.master, container_id="c1")
    master = console.receive_master("c1")
    try:
        os.write(pty.slave, b"x")
        assert os.read(master, 1) == b"x"
    finally:
        os.close(master)
        pty.close()
        console.close()
    assert not os.path.exists(directory)


def test_the_private_socket_refuses_a_message_without_a_pty():
    console = PrivateConsoleSocket()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(console.path)
            conn.sendall(b"no fd here")
        with pytest.raises(ConsoleError, match="cannot receive the terminal of container c2: no pty arrived"):
            console.receive_master("c2")
    finally:
        console.close()
