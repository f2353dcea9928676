"""The Jailhouse side of the node resource ledger (`runphi.backends.ledger`).

`Allocator` is the node ledger with Jailhouse's view of reality: the root cell's
current CPUs are its `cpus_assigned_list` in sysfs, the cells that exist are the
ones the hypervisor lists in sysfs, and a container's cell is named by
`runphi.backends.jailhouse.names.cell_name`.

The generic names (`Allocation`, `ResourceRequest`, `request_from`, ...) are
re-exported here for existing callers; new code imports them from
`runphi.backends.ledger`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from runphi.backends.cpulist import CpuListError, parse_cpu_list
from runphi.backends.jailhouse.names import cell_name
from runphi.backends.ledger import (
    CLAIMS_DIR,
    LEDGER_NAME,
    LEDGER_VERSION,
    LOCK_NAME,
    Allocation,
    AllocationError,
    Claim,
    Ledger,
    NodeLedger,
    ResourceRequest,
    Segment,
    best_fit,
    free_segments,
    request_from,
)

if TYPE_CHECKING:
    from runphi.backends.jailhouse.platform import Platform

__all__ = [
    "CLAIMS_DIR", "LEDGER_NAME", "LEDGER_VERSION", "LOCK_NAME", "Allocation", "AllocationError", "Allocator",
    "Claim", "Ledger", "ResourceRequest", "Segment", "best_fit", "free_segments", "request_from",
]


class Allocator(NodeLedger):
    """Allocation and release of node resources for one Jailhouse platform, under the ledger lock.

    `state_dir` holds the ledger; `sysfs` is the Jailhouse sysfs root (its
    `cells/0/cpus_assigned_list` is the root cell's current CPU set).
    """

    platform: Platform
    platform_setting = "[jailhouse] platform"

    def __init__(self, platform: Platform, state_dir: Path, sysfs: Path,
                 warn: Callable[[str], None] | None = None) -> None:
        self.sysfs = Path(sysfs)
        super().__init__(platform, state_dir, root_cpus=self._sysfs_root_cpus, live_cells=self._cell_names,
                         cell_name=cell_name, warn=warn)

    def _sysfs_root_cpus(self) -> frozenset[int]:
        """The root cell's current CPUs, from sysfs (kernel list syntax)."""
        path = self.sysfs / "cells" / "0" / "cpus_assigned_list"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise AllocationError(
                f"Jailhouse is not enabled ({path} does not exist): enable the hypervisor before creating ZICs"
            ) from None
        except OSError as exc:
            raise AllocationError(f"cannot read the root cell's CPUs from {path}: {exc.strerror}") from None
        try:
            return parse_cpu_list(text)
        except CpuListError as exc:
            raise AllocationError(f"root cell CPU list {path}: {exc}") from None

    def _cell_names(self) -> frozenset[str]:
        """Names of the cells the hypervisor lists now (empty when it is not enabled)."""
        names = set()
        try:
            entries = list((self.sysfs / "cells").iterdir())
        except OSError:
            return frozenset()
        for entry in entries:
            try:
                names.add((entry / "name").read_text().rstrip("\n"))
            except OSError:
                continue
        return frozenset(names)

    def _with_root(self, root: frozenset[int]) -> NodeLedger:
        return _FixedRoot(self.platform, self.state_dir, self.sysfs, root)


class _FixedRoot(Allocator):
    """An allocator whose root CPU set is given instead of read from sysfs (previews)."""

    def __init__(self, platform: Platform, state_dir: Path, sysfs: Path, root: frozenset[int]) -> None:
        super().__init__(platform, state_dir, sysfs)
        self._root = root

    def root_cpus(self) -> frozenset[int]:
        return self._root
