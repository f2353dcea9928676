"""The caller's terminal as the container's console, for ``runphi run`` in the foreground.

runc, asked to ``run`` a container with ``process.terminal`` and no
``--console-socket``, becomes the terminal itself: it receives the pty master
through a console socket of its own and copies the user's keys into it and the
container's output out of it until the container is gone. runphi does the same:

* :class:`PrivateConsoleSocket` is a listening socket in a fresh 0700 directory
  (under ``$TMPDIR``), handed to ``create`` as if the shim had passed it;
* :func:`relay_terminal` copies stdin -> master and master -> stdout. When stdin
  is a tty it is put in raw mode for the duration (every key, Ctrl-C included,
  goes to the guest as a byte, as over a serial line) and its window size is
  copied to the container's pty, now and on every SIGWINCH.

Lean: the standard library only (selectors, termios); one process, three fds,
no trio.
"""

from __future__ import annotations

import errno
import os
import selectors
import shutil
import signal
import socket
import tempfile
import termios
from pathlib import Path

from runphi.console import ConsoleError
from runphi.console.terminal import set_raw, set_window_size, window_size

ACCEPT_TIMEOUT_SECONDS = 5.0
_CHUNK = 65536


class PrivateConsoleSocket:
    """A console socket only this process listens on; ``close`` removes it."""

    def __init__(self) -> None:
        self._directory = tempfile.mkdtemp(prefix="runphi-console-")
        self.path = str(Path(self._directory) / "console.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            self._listener.listen(1)
        except OSError:
            self.close()
            raise

    def receive_master(self, container_id: str) -> int:
        """The pty master ``create`` queued on the socket (exactly one fd).

        Raises :class:`ConsoleError` when nothing usable arrived.
        """
        self._listener.settimeout(ACCEPT_TIMEOUT_SECONDS)
        try:
            conn, _ = self._listener.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        except OSError as exc:
            raise ConsoleError(f"cannot receive the terminal of container {container_id}: "
                               f"{exc.strerror or exc}", container_id=container_id) from None
        if len(fds) != 1 or not os.isatty(fds[0]):
            for fd in fds:
                os.close(fd)
            raise ConsoleError(f"cannot receive the terminal of container {container_id}: "
                               "no pty arrived on the console socket", container_id=container_id)
        return fds[0]

    def close(self) -> None:
        """Stop listening and remove the socket and its directory."""
        self._listener.close()
        shutil.rmtree(self._directory, ignore_errors=True)


def relay_terminal(master: int, stdin: int = 0, stdout: int = 1) -> None:
    """Copy ``stdin`` into the pty ``master`` and the master out to ``stdout``.

    Returns once every holder of the pty's other end has closed it (the
    container's monitor has exited) and all output it wrote has reached
    ``stdout``. A tty on ``stdin`` is raw meanwhile and restored on return,
    whatever happened. End of input stops the stdin side only; a failing
    ``stdout`` drops further output but the relay still waits for the end.
    """
    saved = _enter_raw(stdin)
    previous_winch = _follow_window_size(stdin, master) if saved is not None else None
    try:
        _copy_until_hangup(master, stdin, stdout)
    finally:
        if previous_winch is not None:
            signal.signal(signal.SIGWINCH, previous_winch)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _enter_raw(fd: int) -> list | None:
    """Raw mode on ``fd`` if it is a terminal; returns the settings to restore."""
    if not os.isatty(fd):
        return None
    saved = termios.tcgetattr(fd)
    set_raw(fd)
    return saved


def _follow_window_size(tty: int, master: int):
    """Copy ``tty``'s size to the pty now and on each SIGWINCH; returns the old handler."""

    def copy_size(_signum: int = 0, _frame: object = None) -> None:
        try:
            rows, cols = window_size(tty)
            if rows and cols:
                set_window_size(master, height=rows, width=cols)
        except OSError:
            pass  # the pty is gone or the tty has no size: nothing to follow

    copy_size()
    return signal.signal(signal.SIGWINCH, copy_size)


def _copy_until_hangup(master: int, stdin: int, stdout: int) -> None:
    """The select loop: both directions until reading the master reports hang-up."""
    output: int | None = stdout
    # poll, not epoll: stdin may be a regular file or /dev/null, which epoll refuses.
    with selectors.PollSelector() as selector:
        selector.register(master, selectors.EVENT_READ)
        if _is_open(stdin):
            selector.register(stdin, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fd == master:
                    data = _read(master)
                    if data is None:
                        return
                    output = _write_all(output, data)
                else:
                    data = _read(stdin)
                    if not data:
                        selector.unregister(stdin)
                    elif _write_all(master, data) is None:
                        return


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _read(fd: int) -> bytes | None:
    """Up to one chunk; None once the other end hung up (EIO is how a pty master says it)."""
    try:
        return os.read(fd, _CHUNK) or None
    except OSError as exc:
        if exc.errno == errno.EIO:
            return None
        raise


def _write_all(fd: int | None, data: bytes) -> int | None:
    """Write all of ``data``; returns ``fd``, or None once it cannot take more."""
    if fd is None:
        return None
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        return None
    return fd
