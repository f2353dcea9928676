"""Opening a cell's console source in ``runphi create``, before the cell starts.

The per-cell source is the console slot's host tty device (a physical UART wired
back to the root cell, a virtio-over-ivshmem console endpoint, or the
simulator's UART pty). It is opened with pyserial so that line settings come
from the platform slot, the line is raw (no echo, no ``\\r``/``\\n`` translation,
8-bit clean) and ``exclusive=True`` takes an ``flock`` on the device: a second
monitor (or a stray terminal program using the same convention) can never share
the UART. pyserial also flushes input that was queued before the open, so a
container never sees bytes left over from a previous guest.

The pyserial object is only used to open and configure the line: the returned
:class:`ConsoleDevice` holds a plain duplicate of its descriptor, so the lock
(which lives on the open file description) and the O_NONBLOCK flag travel with
it into the monitor, which inherits it across ``fork``/``exec``. The monitor
needs nothing from pyserial; it waits on the fd with trio.
"""

from __future__ import annotations

import errno
import os
import termios
from typing import Literal

import msgspec

from runphi.console import ConsoleError

Parity = Literal["N", "E", "O", "M", "S"]


class UartSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Line settings of a console slot, as the platform description gives them."""

    baudrate: int = 115200
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Parity = "N"
    stopbits: float = 1  # 1, 1.5 or 2; pyserial rejects anything else


class ConsoleDevice(msgspec.Struct, frozen=True):
    """An open console source: the descriptor the monitor pumps from."""

    path: str
    fd: int

    def close(self) -> None:
        """Close this process's copy of the descriptor (other copies keep the lock)."""
        os.close(self.fd)


def open_uart(
    path: str,
    settings: UartSettings,
    *,
    container_id: str,
    inheritable: bool = True,
) -> ConsoleDevice:
    """Open the console UART at ``path`` raw, non-blocking and exclusively locked.

    Guarantees: on success the device is locked against every other exclusive
    opener for as long as any copy of the returned fd stays open, the line is raw
    8-bit clean with ``settings`` applied, reads never block, and the fd is
    inheritable when ``inheritable`` is true. On failure nothing stays open and
    :class:`ConsoleError` carries the one line to show the user.
    """
    import serial  # pyserial is only needed here, off every other verb's import path

    try:
        port = serial.Serial(
            port=path,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            timeout=0,
            write_timeout=0,
            xonxoff=False,
            rtscts=False,
            dsrdtr=False,
            exclusive=True,
        )
    except serial.SerialException as exc:
        raise ConsoleError(_open_failure(path, container_id, exc), container_id=container_id) from None
    except ValueError as exc:
        raise ConsoleError(
            f"console UART {path} of container {container_id} cannot be configured: {exc}; "
            "fix the console slot's line settings in the platform description",
            container_id=container_id,
        ) from None
    try:
        _wait_for_one_byte(port.fileno())
        fd = os.dup(port.fileno())
        os.set_inheritable(fd, inheritable)
    except (OSError, termios.error) as exc:
        raise ConsoleError(
            f"console UART {path} of container {container_id} cannot be configured: {exc.args[-1]}; "
            "check the platform's console slot",
            container_id=container_id,
        ) from None
    finally:
        port.close()
    return ConsoleDevice(path=path, fd=fd)


def _wait_for_one_byte(fd: int) -> None:
    """Make an empty line read as EAGAIN instead of a 0-byte read.

    pyserial leaves VMIN=0/VTIME=0 (it times reads with select); with those a
    non-blocking read of an empty tty returns 0 bytes, indistinguishable from
    the end of the line. VMIN=1 restores EAGAIN, so 0 bytes means hang-up.
    """
    attrs = termios.tcgetattr(fd)
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _open_failure(path: str, container_id: str, exc: Exception) -> str:
    """Word a pyserial open failure as one actionable line."""
    code = getattr(exc, "errno", None)
    what = f"console UART {path} of container {container_id}"
    if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY):
        return (
            f"{what} is in use by another process (another container's monitor or a "
            "terminal program holds it); stop that process or give the container another console slot"
        )
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return (
            f"{what} does not exist; check that the board's UART (or the simulator) is up "
            "and that the platform's console slot names the right device"
        )
    if code in (errno.EACCES, errno.EPERM):
        return f"{what} cannot be opened: permission denied; run runphi as root"
    if code is None:
        # pyserial reports a device that is not a terminal as a configuration failure.
        return f"{what} is not a usable serial device ({exc}); check the platform's console slot"
    return f"{what} cannot be opened: {os.strerror(code)}; check the platform's console slot"
