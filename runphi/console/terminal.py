"""The ``process.terminal`` side of a ZIC: a pty pair and the console-socket hand-off.

``runphi create`` makes a pty pair, sends the **master** to the shim over
``--console-socket`` (one ``sendmsg``, a non-empty payload, exactly one
SCM_RIGHTS fd: the contract of containerd's shim) and keeps the **slave** for
the monitor, which pumps guest UART -> slave and slave -> guest UART. The shim
copies the master to the user's terminal and the user's keys into the master.

Termios choice: the slave is put in **raw mode** (no OPOST/ONLCR, no ECHO, no
ICANON, no ISIG, no ICRNL, 8-bit clean). runc leaves the slave cooked because a
Linux process on the slave expects a line discipline; here the process on the
other side is a guest that already *is* a serial terminal: it sends ``\\r\\n``,
echoes what it receives, and handles ``\\r``, backspace and Ctrl-C itself. So a
``ctr run -t`` user gets exactly what ``screen``/``minicom`` on the board's UART
would show:

* guest ``\\r\\n`` reaches the terminal unchanged (cooked ONLCR would make it
  ``\\r\\r\\n``, and break byte-exact logs);
* each typed key appears once, echoed by the guest (cooked ECHO would print it
  twice, the first copy before the guest even saw it);
* keys reach the guest at once, Enter as ``\\r`` like a serial terminal sends it
  (cooked ICANON would hold them until Enter and ICRNL would turn Enter into ``\\n``);
* Ctrl-C/Ctrl-Z/Ctrl-\\\\ reach the guest as bytes instead of becoming signals.

A guest that prints a bare ``\\n`` therefore "staircases", as it would on a real
serial line. Window resizes (the shim's TIOCSWINSZ on the master) change the
pty's size but reach no guest: a serial line carries no such signal.

The slave is opened with O_NOCTTY (``os.openpty``), so it never becomes the
monitor's controlling terminal and the shim closing the master cannot SIGHUP
the monitor.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

from runphi.console import ConsoleError

# What runc puts in the payload; the shim only uses it as the received file's name.
CONSOLE_PAYLOAD = b"/dev/ptmx"
CONNECT_TIMEOUT_SECONDS = 5.0


class PtyPair:
    """The two ends of a console pty; the caller owns and closes both fds."""

    __slots__ = ("master", "slave")

    def __init__(self, master: int, slave: int) -> None:
        self.master = master
        self.slave = slave

    def close(self) -> None:
        """Close whichever ends are still open in this process."""
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def open_console_pty(
    *, height: int | None = None, width: int | None = None, inheritable_slave: bool = True
) -> PtyPair:
    """Create a pty pair with a raw slave and, when given, the window size applied.

    Guarantees: the slave passes bytes unchanged in both directions (see the
    module docstring), is inheritable when ``inheritable_slave`` is true (the
    monitor keeps it) and is not anyone's controlling terminal; the master is
    never inheritable (only the shim may hold it). ``height``/``width`` are
    ``process.consoleSize``; zero or missing leaves the kernel default.
    """
    master, slave = os.openpty()
    try:
        set_raw(slave)
        if height and width:
            set_window_size(master, height=height, width=width)
        os.set_inheritable(slave, inheritable_slave)
        os.set_inheritable(master, False)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    return PtyPair(master, slave)


def set_raw(fd: int) -> None:
    """Put the terminal on ``fd`` in raw mode, the equivalent of cfmakeraw(3)."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~(
        termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
        | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
    )
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


def set_window_size(fd: int, *, height: int, width: int) -> None:
    """Set the pty's window size (rows x columns), as ``process.consoleSize`` asks."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def window_size(fd: int) -> tuple[int, int]:
    """Return the pty's (rows, columns)."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


def send_console_master(socket_path: str, master_fd: int, *, container_id: str) -> None:
    """Hand the pty master to whoever listens on ``socket_path`` (the shim).

    Guarantees: on return the master is queued on the connection in one
    ``sendmsg`` with a non-empty payload and exactly one SCM_RIGHTS fd, and the
    connection is closed (the shim accepts only after ``create`` exits, so the
    message waits in its listen backlog). The caller's ``master_fd`` stays open;
    close it once this returns. Raises :class:`ConsoleError` if the socket
    cannot be reached.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(CONNECT_TIMEOUT_SECONDS)
            conn.connect(socket_path)
            sent = socket.send_fds(conn, [CONSOLE_PAYLOAD], [master_fd])
            if sent != len(CONSOLE_PAYLOAD):
                raise OSError(f"short send ({sent} of {len(CONSOLE_PAYLOAD)} bytes)")
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConsoleError(
            f"cannot send the terminal of container {container_id} to --console-socket "
            f"{socket_path}: {why}; the caller (containerd's shim) must be listening there",
            container_id=container_id,
        ) from None
