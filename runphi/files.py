"""Reading small untrusted files (a bundle's config.json, an image's boot description),
telling whether a directory is safe to keep state in, and replacing a file atomically.

Lean: verb processes import this module, so the stdlib only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class NotRegularFile(Exception):
    """The path names a FIFO, device, directory or socket, not a regular file."""


class FileTooLarge(Exception):
    """The file holds more than ``limit`` bytes.

    ``size`` is what fstat reported, or None when the file grew past the limit
    between fstat and the read. ``str()`` says which, for the caller's message.
    """

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__(size, limit)
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        if self.size is None:
            return f"more than {self.limit} bytes"
        return f"{self.size} bytes, at most {self.limit} accepted"


def read_regular_file(path: Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """The whole content of the regular file at ``path``, at most ``limit`` bytes.

    Guarantees: the file is opened non-blocking and checked with fstat on the
    open fd before anything is read, so a FIFO or device planted there can
    neither hang the caller nor feed it endless bytes; at most ``limit + 1``
    bytes are read; the fd is closed on every path. With ``follow_symlinks``
    false a symlink at ``path`` fails to open (OSError, errno ELOOP).

    Raises :class:`NotRegularFile`, :class:`FileTooLarge`, or the OSError of
    the open or read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path)
        if info.st_size > limit:
            raise FileTooLarge(info.st_size, limit)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileTooLarge(None, limit)
    return data


def unsafe_dir_reason(path: Path) -> str | None:
    """Why ``path`` is no place for runphi's state (None if it is fine).

    State lives in directories only this user can change: anyone else able to
    write there could plant symlinks or records and steer a root process. So a
    world-writable directory, or one owned by another user, is refused.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"cannot be inspected: {exc.strerror}"
    if info.st_uid != os.geteuid():
        return (f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}): "
                "refusing to keep state there")
    if info.st_mode & 0o002:
        return (f"is world-writable (mode {info.st_mode & 0o7777:o}): refusing to keep state there; "
                f"chmod o-w {path}")
    return None


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: Path, data: bytes) -> Path:
    """First half of an atomic write: ``data`` durably in a temp file next to ``path`` (removed
    again when writing it fails)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return tmp


def commit_temp(tmp: Path, path: Path) -> None:
    """Second half: rename the temp file over ``path`` (removing it when that fails) and make
    the rename durable."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes only."""
    commit_temp(write_temp(path, data), path)
