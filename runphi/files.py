"""Reading small untrusted files (a bundle's config.json, an image's boot description),
and telling whether a directory is safe to keep state in.

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
