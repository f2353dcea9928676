"""``process.terminal``: the test plays containerd's shim on a real console socket.

The shim listens on a unix socket, ``create`` connects and sends the pty master,
the shim accepts only afterwards (oci-runtime.md §4.1), checks what it got the
way the shim does, and then talks to the guest through the master while the
monitor's pumps join the pty slave and a real pty "board UART".
"""

from __future__ import annotations

import array
import os
import socket
import termios

import pytest
import trio

from runphi.console import ConsoleError
from runphi.console.pump import ConsolePump, FdSource, pump_input
from runphi.console.terminal import open_console_pty, send_console_master, window_size
from runphi.console.uart import UartSettings, open_uart

TEST_TIMEOUT = 30


@pytest.fixture
def shim_socket(tmp_path):
    """A listening console socket, as the shim creates it (pty<random>/pty.sock)."""
    path = tmp_path / "pty1234" / "pty.sock"
    path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    yield listener, str(path)
    listener.close()


def shim_receive_master(listener: socket.socket) -> tuple[bytes, int]:
    """Accept and receive the way go-runc does: one message, one SCM_RIGHTS, one fd."""
    conn, _ = listener.accept()
    with conn:
        fd_size = array.array("i").itemsize
        data, ancillary, flags, _ = conn.recvmsg(4096, socket.CMSG_SPACE(2 * fd_size))
        assert len(ancillary) == 1, "exactly one control message"
        level, kind, payload = ancillary[0]
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds = array.array("i")
        fds.frombytes(payload)
        assert len(fds) == 1, "exactly one fd"
        assert not flags & socket.MSG_CTRUNC
        assert conn.recv(1) == b"", "create closed the connection after the one message"
    return data, fds[0]


def test_master_is_sent_before_the_shim_accepts(shim_socket):
    listener, path = shim_socket
    pty = open_console_pty(height=45, width=123)
    try:
        send_console_master(path, pty.master, container_id="zic1")
        os.close(pty.master)  # create keeps no copy; the message holds one in flight
        data, master = shim_receive_master(listener)
    finally:
        os.close(pty.slave)
    try:
        assert data == b"/dev/ptmx"
        assert os.isatty(master)
        termios.tcgetattr(master)  # what console.ConsoleFromFile does first
        assert window_size(master) == (45, 123)
    finally:
        os.close(master)


def test_slave_is_raw_and_master_not_inheritable():
    pty = open_console_pty()
    try:
        iflag, oflag, _, lflag, _, _, cc = termios.tcgetattr(pty.slave)
        assert not oflag & termios.OPOST
        assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
        assert not iflag & (termios.ICRNL | termios.IXON)
        assert cc[termios.VMIN] == 1
        assert os.get_inheritable(pty.slave)
        assert not os.get_inheritable(pty.master)
        assert window_size(pty.master) == (0, 0)  # no consoleSize: kernel default
    finally:
        pty.close()


def test_unreachable_console_socket_is_one_clear_line(tmp_path):
    pty = open_console_pty()
    try:
        missing = str(tmp_path / "pty9" / "pty.sock")
        with pytest.raises(ConsoleError) as no_socket:
            send_console_master(missing, pty.master, container_id="zic1")
        message = str(no_socket.value)
        assert message.startswith(f"cannot send the terminal of container zic1 to --console-socket {missing}: ")
        assert "No such file or directory" in message and "\n" not in message

        stale = tmp_path / "stale.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(stale))
        dead.close()  # the file stays, nobody listens
        with pytest.raises(ConsoleError, match="Connection refused"):
            send_console_master(str(stale), pty.master, container_id="zic1")
    finally:
        pty.close()


async def test_shim_played_tty_session_round_trip(shim_socket):
    listener, path = shim_socket
    board_master, board_slave = os.openpty()
    uart = open_uart(os.ttyname(board_slave), UartSettings(), container_id="zic1")
    # --- create: pty, send the master, keep the slave for the monitor.
    pty = open_console_pty(height=24, width=80)
    send_console_master(path, pty.master, container_id="zic1")
    os.close(pty.master)
    # --- the shim accepts after create exited.
    _, shim_master = shim_receive_master(listener)
    assert os.isatty(shim_master)
    guest = trio.lowlevel.FdStream(os.dup(board_master))
    shim = trio.lowlevel.FdStream(shim_master)

    async def shim_expects(expected: bytes) -> None:
        got = bytearray()
        while len(got) < len(expected):
            got += await shim.receive_some(len(expected) - len(got))
        assert bytes(got) == expected

    async def guest_expects(expected: bytes) -> None:
        got = bytearray()
        while len(got) < len(expected):
            got += await guest.receive_some(len(expected) - len(got))
        assert bytes(got) == expected

    try:
        pump = ConsolePump(FdSource(uart.fd), pty.slave)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as monitor:
                await monitor.start(pump.run)
                monitor.start_soon(pump_input, pty.slave, uart.fd)
                # The guest's banner arrives byte for byte: no ONLCR \r\r\n.
                await guest.send_all(b"echo inmate ready\r\n> ")
                await shim_expects(b"echo inmate ready\r\n> ")
                # The user types a line: Enter is \r and reaches the guest as \r.
                await shim.send_all(b"hello \x1b[D\x7f\r")
                await guest_expects(b"hello \x1b[D\x7f\r")
                # The guest echoes; the next bytes the shim sees are the guest's
                # echo, so the pty itself echoed nothing.
                await guest.send_all(b"hello\r\n> ")
                await shim_expects(b"hello\r\n> ")
                # Ctrl-C is a byte for the guest, not a signal for the monitor.
                await shim.send_all(b"\x03")
                await guest_expects(b"\x03")
                monitor.cancel_scope.cancel()
    finally:
        await shim.aclose()
        await guest.aclose()
        os.close(pty.slave)
        uart.close()
        os.close(board_master)
        os.close(board_slave)


async def test_shim_closing_the_master_ends_input_but_not_the_monitor(shim_socket):
    listener, path = shim_socket
    board_master, board_slave = os.openpty()
    uart = open_uart(os.ttyname(board_slave), UartSettings(), container_id="zic1")
    pty = open_console_pty()
    send_console_master(path, pty.master, container_id="zic1")
    os.close(pty.master)
    _, shim_master = shim_receive_master(listener)
    guest = trio.lowlevel.FdStream(os.dup(board_master))
    try:
        pump = ConsolePump(FdSource(uart.fd), pty.slave)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as monitor:
                await monitor.start(pump.run)
                os.close(shim_master)  # the shim is gone
                stats = await pump_input(pty.slave, uart.fd)
                assert stats.ended == "end of stdin"
                # The guest keeps printing: the UART is still drained, output is lost.
                await guest.send_all(bytes(256 * 1024))
                final = await pump.finish(quiet=0.05)
        assert final.sink_closed is not None
        assert final.read_bytes == 256 * 1024
    finally:
        await guest.aclose()
        os.close(pty.slave)
        uart.close()
        os.close(board_master)
        os.close(board_slave)
