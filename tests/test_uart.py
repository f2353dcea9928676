"""Opening a console UART the way ``create`` does: real ptys, real processes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import termios

import pytest

from runphi.console import ConsoleError
from runphi.console.uart import UartSettings, open_uart
from runphi.errors import RunphiError


@pytest.fixture
def board_uart():
    """A real pty; yields (master fd, slave path) like the simulator's UART."""
    master, slave = os.openpty()
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_opened_line_is_raw_nonblocking_inheritable(board_uart):
    master, path = board_uart
    device = open_uart(path, UartSettings(baudrate=57600), container_id="zic1")
    try:
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(device.fd)
        assert not oflag & termios.OPOST
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not iflag & (termios.ICRNL | termios.IXON | termios.ISTRIP)
        assert cflag & termios.CSIZE == termios.CS8
        assert ispeed == ospeed == termios.B57600
        assert fcntl.fcntl(device.fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert os.get_inheritable(device.fd)
        with pytest.raises(BlockingIOError):
            os.read(device.fd, 1)  # empty line: "try again", never a fake end of file
        os.write(master, b"\x00\r\n\xff")
        assert os.read(device.fd, 16) == b"\x00\r\n\xff"
    finally:
        device.close()


def test_second_opener_is_refused_while_the_first_holds_it(board_uart):
    _, path = board_uart
    first = open_uart(path, UartSettings(), container_id="zic1")
    try:
        with pytest.raises(ConsoleError) as refused:
            open_uart(path, UartSettings(), container_id="zic2")
        message = str(refused.value)
        assert message.startswith(f"console UART {path} of container zic2 is in use by another process")
        assert "\n" not in message
        assert isinstance(refused.value, RunphiError) and refused.value.container_id == "zic2"
    finally:
        first.close()
    open_uart(path, UartSettings(), container_id="zic2").close()


def test_lock_travels_with_the_fd_into_the_monitor(board_uart):
    # create opens the UART, the monitor inherits it, create exits: the lock must
    # stay with the monitor.
    _, path = board_uart
    device = open_uart(path, UartSettings(), container_id="zic1")
    monitor = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, pass_fds=[device.fd],
    )
    try:
        device.close()
        with pytest.raises(ConsoleError, match="in use by another process"):
            open_uart(path, UartSettings(), container_id="zic2")
    finally:
        monitor.communicate(b"", timeout=30)
    open_uart(path, UartSettings(), container_id="zic2").close()


def test_missing_device(tmp_path):
    path = str(tmp_path / "ttyAMA7")
    with pytest.raises(ConsoleError) as missing:
        open_uart(path, UartSettings(), container_id="zic1")
    assert str(missing.value).startswith(f"console UART {path} of container zic1 does not exist")


def test_not_a_terminal(tmp_path):
    plain = tmp_path / "not-a-uart"
    plain.write_bytes(b"")
    with pytest.raises(ConsoleError, match="is not a usable serial device"):
        open_uart(str(plain), UartSettings(), container_id="zic1")


def test_bad_line_settings_are_a_clear_error(board_uart):
    _, path = board_uart
    with pytest.raises(ConsoleError, match="cannot be configured"):
        open_uart(path, UartSettings(stopbits=3), container_id="zic1")


def test_nothing_stays_open_after_a_refusal(board_uart):
    _, path = board_uart
    first = open_uart(path, UartSettings(), container_id="zic1")
    before = set(os.listdir("/proc/self/fd"))
    try:
        for _ in range(5):
            with pytest.raises(ConsoleError):
                open_uart(path, UartSettings(), container_id="zic2")
        assert set(os.listdir("/proc/self/fd")) == before
    finally:
        first.close()
