"""The simulated ``/sys/devices/jailhouse`` tree.

Every value is written to a temporary file and renamed into place, and a cell
directory is populated in a staging area before it is renamed into ``cells/``,
so a concurrent reader sees either the old or the new value, never a torn one,
and never a half-populated cell directory. :func:`publish_dir` and
:func:`withdraw_dir` do the same for other directories (the PCI netdevs of
:mod:`.netdev` under ``sys/bus/pci/devices``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cpu_list(cpus: set[int] | frozenset[int]) -> str:
    """Kernel list syntax (``%*pbl``): ``0-1,3``; the empty set is ``""``."""
    parts: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def cpu_bitmap(cpus: set[int] | frozenset[int], nr_cpus: int) -> str:
    """Kernel bitmap syntax (``%*pb``): lowercase hex, 32-bit chunks joined by ``,``."""
    value = sum(1 << c for c in cpus)
    chunks = []
    remaining = nr_cpus
    while remaining > 0:
        width = min(remaining, 32)
        chunks.append((value & 0xFFFFFFFF, width))
        value >>= 32
        remaining -= width
    chunks.reverse()
    text = [f"{v:0{(w + 3) // 4}x}" for v, w in chunks[:1]]
    text += [f"{v:08x}" for v, _ in chunks[1:]]
    return ",".join(text)


class SysfsTree:
    """Atomic writer for ``<sim root>/sys/devices/jailhouse``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.staging = base / ".staging"

    def reset(self) -> None:
        """Recreate the tree as a freshly loaded driver module leaves it (empty ``cells/``)."""
        if self.base.exists():
            shutil.rmtree(self.base)
        (self.base / "cells").mkdir(parents=True)
        self.staging.mkdir()

    def remove(self) -> None:
        """Remove the whole tree (module unloaded)."""
        shutil.rmtree(self.base, ignore_errors=True)

    def write(self, relpath: str, value: str | bytes) -> None:
        """Replace one attribute file atomically."""
        write_atomic(self.base / relpath, value)

    def publish_cell(self, cell_id: int, files: dict[str, str]) -> None:
        """Make ``cells/<id>`` appear at once, fully populated with ``files``."""
        publish_dir(self.staging / f"cell-{cell_id}", self.base / "cells" / str(cell_id), files)

    def withdraw_cell(self, cell_id: int) -> None:
        """Make ``cells/<id>`` disappear at once."""
        withdraw_dir(self.base / "cells" / str(cell_id), self.staging / f"gone-{cell_id}")


def publish_dir(stage: Path, target: Path, files: dict[str, str]) -> None:
    """Make directory ``target`` appear at once, holding ``files`` (relative path -> text).

    The directory is filled at ``stage`` (same file system, parent existing) and renamed
    into place, so a reader sees it whole or not at all."""
    if stage.exists():
        shutil.rmtree(stage)
    for rel, value in files.items():
        path = stage / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    os.rename(stage, target)


def withdraw_dir(target: Path, grave: Path) -> None:
    """Make directory ``target`` disappear at once (renamed to ``grave``, then deleted)."""
    if not target.exists():
        return
    if grave.exists():
        shutil.rmtree(grave)
    os.rename(target, grave)
    shutil.rmtree(grave)


def write_atomic(path: Path, value: str | bytes) -> None:
    """Write ``value`` to ``path`` via a temporary file and ``rename``."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = value.encode() if isinstance(value, str) else value
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
