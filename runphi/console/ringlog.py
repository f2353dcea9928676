"""The console log: the last N KiB a container's guest printed, in its state directory.

Layout inside the container's state directory::

    console.log      current segment, appended to by the monitor's pump
    console.log.1    previous segment (replaced at each rotation)
    console.lock     flock'ed (exclusive) by the writer for as long as it lives

Each segment holds at most half the limit and a segment is rotated only once
full, so together they hold a contiguous tail of the output: never more than
``limit`` bytes, and at least half of it once that much was printed. Rotation is a
rename, so a reader sees every byte exactly once as long as it keeps up with one
rotation. The writer's lock tells a follower (``runphi logs -f``) when the
monitor is gone, even if it was SIGKILLed: the kernel drops the lock with it.

Lean on purpose (stdlib only): ``runphi logs`` imports this.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator

from runphi.console import ConsoleError

CURRENT_SEGMENT = "console.log"
PREVIOUS_SEGMENT = "console.log.1"
WRITER_LOCK = "console.lock"
DEFAULT_LOG_LIMIT = 256 * 1024
FOLLOW_POLL_SECONDS = 0.1

_SEGMENT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


class ConsoleLogWriter:
    """Appends console output to the rotating console log of one container.

    Guarantees: the two segments together never exceed ``limit`` bytes and keep
    the newest output; :meth:`write` never raises and never blocks on a reader
    (a failing disk disables the log and records why in :attr:`error`); only
    one writer per state directory at a time.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, limit: int = DEFAULT_LOG_LIMIT) -> None:
        if limit < 2:
            raise ValueError(f"console log limit must be at least 2 bytes, not {limit}")
        self.state_dir = os.fspath(state_dir)
        self.segment_limit = limit // 2
        self.error: str | None = None
        self._lock_fd = _take_writer_lock(self.state_dir)
        try:
            self._fd = os.open(self._path(CURRENT_SEGMENT), _SEGMENT_FLAGS, 0o640)
        except OSError:
            os.close(self._lock_fd)
            raise
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        """Append ``data``; a full current segment first becomes the previous one."""
        if self.error is not None or not data:
            return
        # Older bytes of a huge burst could not survive two segments anyway.
        view = memoryview(data)[-2 * self.segment_limit:]
        try:
            while view:
                room = self.segment_limit - self._size
                if room <= 0:
                    self._rotate()
                    room = self.segment_limit
                written = os.write(self._fd, view[:room])
                self._size += written
                view = view[written:]
        except OSError as exc:
            self.error = f"console log in {self.state_dir} disabled: {exc.strerror}"

    def close(self) -> None:
        """Close the segment and release the writer lock (followers then finish)."""
        os.close(self._fd)
        os.close(self._lock_fd)

    def _rotate(self) -> None:
        os.replace(self._path(CURRENT_SEGMENT), self._path(PREVIOUS_SEGMENT))
        new_fd = os.open(self._path(CURRENT_SEGMENT), _SEGMENT_FLAGS | os.O_TRUNC, 0o640)
        os.close(self._fd)
        self._fd = new_fd
        self._size = 0

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)


def _take_writer_lock(state_dir: str) -> int:
    fd = os.open(os.path.join(state_dir, WRITER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConsoleError(
            f"the console log in {state_dir} already has a writer; only one monitor per container may run"
        ) from None
    return fd


def writer_alive(state_dir: str | os.PathLike[str]) -> bool:
    """True while some process holds the console log's writer lock."""
    try:
        fd = os.open(os.path.join(state_dir, WRITER_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def read_console_log(state_dir: str | os.PathLike[str]) -> bytes:
    """Everything the console log holds now, oldest first (empty if there is none)."""
    chunks, current = _open_snapshot(os.fspath(state_dir))
    if current is not None:
        os.close(current)
    return b"".join(chunks)


def follow_console_log(
    state_dir: str | os.PathLike[str],
    *,
    poll_interval: float = FOLLOW_POLL_SECONDS,
    keep_following: Callable[[], bool] | None = None,
) -> Iterator[bytes]:
    """Yield the log's content, then new output as it is written, until the writer is gone.

    ``keep_following`` (default: the writer lock is held) is checked after each
    idle poll; once it is false, what is left is yielded and the iterator ends.
    Polling is the only option here: the log is a plain file.
    """
    state_dir = os.fspath(state_dir)
    alive = keep_following or (lambda: writer_alive(state_dir))
    chunks, fd = _open_snapshot(state_dir)
    try:
        yield from chunks
        while True:
            # Sample liveness before reading, so bytes written just before the
            # writer exited are still read on this round.
            running = alive()
            if fd is None:
                fd = _open_or_none(os.path.join(state_dir, CURRENT_SEGMENT))
            if fd is not None:
                # After a rename the writer never touches this file again, so reading
                # it to the end once the rotation is seen gets all of it.
                rotated = _rotated(state_dir, fd)
                if data := _read_to_end(fd):
                    yield data
                if rotated:
                    os.close(fd)
                    fd = None
                    continue
            if not running:
                return
            time.sleep(poll_interval)
    finally:
        if fd is not None:
            os.close(fd)


def _open_snapshot(state_dir: str) -> tuple[list[bytes], int | None]:
    """Read previous + current segment consistently; return the chunks and the
    current segment's fd positioned at its end (None if there is no log yet)."""
    current_path = os.path.join(state_dir, CURRENT_SEGMENT)
    previous_path = os.path.join(state_dir, PREVIOUS_SEGMENT)
    while True:
        current = _open_or_none(current_path)
        previous = _open_or_none(previous_path)
        try:
            # A rotation between the two opens would make us miss a segment: retry.
            if current is not None and (
                _rotated(state_dir, current) or _same_file(current, previous)
            ):
                continue
            chunks = [_read_to_end(previous)] if previous is not None else []
            if current is not None:
                chunks.append(_read_to_end(current))
            result = current
            current = None
            return chunks, result
        finally:
            for fd in (current, previous):
                if fd is not None:
                    os.close(fd)


def _open_or_none(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _read_to_end(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


def _rotated(state_dir: str, fd: int) -> bool:
    """True when ``fd`` is no longer the current segment (it was renamed away)."""
    try:
        now = os.stat(os.path.join(state_dir, CURRENT_SEGMENT))
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def _same_file(a: int, b: int | None) -> bool:
    if b is None:
        return False
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
