"""Reproducible tar and gzip streams: same entries in, same bytes out.

Every entry is owned by 0:0 with empty owner names, has mtime 0 and a fixed
mode; callers pass entries in the order they must appear.
"""

from __future__ import annotations

import gzip
import io
import tarfile

DIR_MODE = 0o755
FILE_MODE = 0o644


def _entry(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def parent_dirs(paths: list[str]) -> list[str]:
    """Every ancestor directory of the relative ``paths`` (``a/b/c`` → ``a/``, ``a/b/``), sorted."""
    dirs: set[str] = set()
    for path in paths:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:depth]) + "/")
    return sorted(dirs)


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A POSIX tar of ``files`` (relative path → content) preceded by their directories.

    Directories come first (sorted), then files in the mapping's order.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in parent_dirs(list(files)):
            tar.addfile(_entry(directory.rstrip("/"), tarfile.DIRTYPE, DIR_MODE))
        for name, data in files.items():
            tar.addfile(_entry(name, tarfile.REGTYPE, FILE_MODE, len(data)), io.BytesIO(data))
    return buffer.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip ``data`` with no file name and mtime 0, so the result depends on the content only."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as stream:
        stream.write(data)
    return buffer.getvalue()
