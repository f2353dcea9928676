"""containerd's stdio FIFOs as a ZIC's console ends (shim-v2.md §6).

The client (ctr, CRI) has opened its ends before Create. What this module guarantees:

* opening never blocks: every FIFO gets our own read end first, so the write end
  opens at once even if the client has gone;
* the output FIFO keeps that read end (runc does the same): a client that detaches
  never makes a write fail with EPIPE, the console pump's buffer absorbs the stall;
* the stdin FIFO keeps our own writer until CloseIO, so a client detaching does not
  end the guest's input; CloseIO drops it, and the client's EOF then ends the input;
* :meth:`TaskStdio.close_output` gives the client its EOF once the console is drained.

``file:///path`` (``ctr run --log-uri file://...``) appends the console to that file,
as runc's shim does. ``binary://`` logging programs are refused with one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from runphi.errors import BundleError


@dataclass
class TaskStdio:
    """The fds of one task's stdio; -1 where containerd gave no path."""

    stdin: int = -1
    stdout: int = -1
    stderr: int = -1
    #: Our own fds that keep the FIFOs alive (readers of the outputs, the stdin writer).
    _keep: list[int] = field(default_factory=list)
    _stdin_writer: int = -1

    def close_stdin_writer(self) -> None:
        """CloseIO: from now on the client closing its end is the guest's end of input."""
        if self._stdin_writer >= 0:
            _close(self._stdin_writer)
            self._keep.remove(self._stdin_writer)
            self._stdin_writer = -1

    def close_output(self) -> None:
        """The console is drained: close the write ends, the client reads EOF."""
        for name in ("stdout", "stderr"):
            fd = getattr(self, name)
            if fd >= 0:
                _close(fd)
                setattr(self, name, -1)

    def close(self) -> None:
        """Close everything still open (idempotent)."""
        self.close_output()
        if self.stdin >= 0:
            _close(self.stdin)
            self.stdin = -1
        for fd in self._keep:
            _close(fd)
        self._keep.clear()
        self._stdin_writer = -1


def open_task_stdio(container_id: str, stdin: str, stdout: str, stderr: str) -> TaskStdio:
    """Open the FIFOs containerd named (module docstring); all or nothing."""
    stdio = TaskStdio()
    try:
        for path in (stdin, stdout, stderr):
            _check_scheme(container_id, path)
        if stdout.startswith("file://"):
            stdio.stdout = _open_log_file(container_id, stdout)
            stdout = stderr = ""
        if stdin:
            stdio.stdin = _open(container_id, stdin, os.O_RDONLY | os.O_NONBLOCK)
            stdio._stdin_writer = _open(container_id, stdin, os.O_WRONLY | os.O_NONBLOCK)
            stdio._keep.append(stdio._stdin_writer)
        if stdout:
            stdio._keep.append(_open(container_id, stdout, os.O_RDONLY | os.O_NONBLOCK))
            stdio.stdout = _open(container_id, stdout, os.O_WRONLY)
        if stderr:
            stdio._keep.append(_open(container_id, stderr, os.O_RDONLY | os.O_NONBLOCK))
            stdio.stderr = _open(container_id, stderr, os.O_WRONLY)
    except BaseException:
        stdio.close()
        raise
    return stdio


def _check_scheme(container_id: str, path: str) -> None:
    scheme = path.split("://", 1)[0] if "://" in path else ""
    if scheme not in ("", "file"):
        raise BundleError(f"cannot create ZIC {container_id}: stdio {path!r} uses the {scheme}:// scheme; "
                          "runphi's shim writes a ZIC's console to FIFOs or to a file:// log only",
                          container_id=container_id)


def _open_log_file(container_id: str, uri: str) -> int:
    """A ``file://`` log: created if needed (with its directory), appended to."""
    from urllib.parse import unquote, urlsplit

    path = unquote(urlsplit(uri).path)
    try:
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create ZIC {container_id}: log {path}: {exc.strerror}",
                          container_id=container_id) from None
    return _open(container_id, path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)


def _open(container_id: str, path: str, flags: int, mode: int = 0o644) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise BundleError(f"cannot create ZIC {container_id}: cannot open its stdio {path}: {exc.strerror}",
                          container_id=container_id) from None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
