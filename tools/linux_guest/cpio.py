"""A writer for the ``newc`` cpio format the Linux kernel unpacks as its initramfs.

Only what an initramfs needs: directories, regular files, symlinks and character
devices, all owned by root, with one fixed mtime so the same inputs give the same bytes.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member; ``path`` is relative (no leading ``/``), ``data`` is the file body
    or, for a symlink, its target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(path: str, perm: int = 0o755) -> Entry:
    """A directory entry."""
    return Entry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    """A regular file entry."""
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    """A symbolic link entry pointing at ``target``."""
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    """A character device node (the kernel creates it while unpacking, no privileges needed here)."""
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(ino: int, entry: Entry, mtime: int) -> bytes:
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, mtime, len(entry.data),
              0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def write_newc(entries: list[Entry], mtime: int = 0) -> bytes:
    """The complete archive: ``entries`` in the given order, then the trailer.

    Parents must come before their children (the kernel does not create missing
    directories); a duplicate path is refused because the kernel would silently keep one.
    """
    seen: set[str] = set()
    parts = []
    for ino, entry in enumerate(entries, start=1):
        if entry.path.startswith("/") or not entry.path:
            raise ValueError(f"cpio member path must be relative: {entry.path!r}")
        if entry.path in seen:
            raise ValueError(f"duplicate cpio member {entry.path!r}")
        parent = entry.path.rpartition("/")[0]
        if parent and parent not in seen:
            raise ValueError(f"cpio member {entry.path!r} comes before its directory {parent!r}")
        seen.add(entry.path)
        parts.append(_member(ino, entry, mtime))
    parts.append(_member(0, Entry(_TRAILER, 0), 0))
    return b"".join(parts)
