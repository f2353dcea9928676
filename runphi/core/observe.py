"""The node seen at one instant, for ``runphi metrics`` and ``runphi top``.

A :class:`NodeSnapshot` holds every ZIC found under the state roots it is given (its
record, live status, cell statistics and console counters), the node ledger's use of
each resource, the hypervisor's pools and the verb latency histograms. Taking one only
reads (records, sysfs or the VM's files, ``console-stats.json``): it never talks to a
ZIC's owner and never changes anything.

Where ZICs are found: runphi's records live in ``<root>/<id>/`` for the runc-CLI mode run
by hand, and ``<root>/<namespace>/<id>/`` when containerd runs runphi (its shim, or runc's
shim with ``Root``) — so each scanned root is searched two levels deep, and the directory
between is the containerd namespace.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from runphi.backends.base import Backend, CellStats, PoolUse
from runphi.backends.ledger import ResourceUse
from runphi.console.stats import PumpStats, read_console_stats
from runphi.container import ContainerRecord, live_status
from runphi.core.latency import Histogram, read_latencies
from runphi.errors import RunphiError
from runphi.store import RECORD_NAME, Store

#: The CRI's annotations naming a container's pod (containerd's CRI plugin sets them).
POD_NAME_ANNOTATION = "io.kubernetes.cri.sandbox-name"
POD_NAMESPACE_ANNOTATION = "io.kubernetes.cri.sandbox-namespace"


class ZicSample(msgspec.Struct, frozen=True, kw_only=True):
    """One ZIC at the snapshot's instant."""

    container_id: str
    #: The containerd namespace ("" for a ZIC run by hand with the runphi CLI).
    namespace: str
    cell: str
    #: The OCI status right now (``created``, ``running``, ``stopped``).
    status: str
    pod: str = ""
    pod_namespace: str = ""
    cpus: tuple[int, ...] = ()
    uptime_seconds: float = 0.0
    #: How the last run ended (None while it runs, or when it never ran).
    exit_code: int | None = None
    #: None when the cell could not be read (no backend, gone hypervisor).
    stats: CellStats | None = None
    console: PumpStats | None = None


class NodeSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The node at ``taken`` (seconds, monotonic clock)."""

    taken: float
    backend: str
    zics: list[ZicSample]
    resources: list[ResourceUse]
    pools: list[PoolUse]
    latencies: dict[str, Histogram]


def zic_roots(roots: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """(state root, containerd namespace) of every root holding records, two levels deep."""
    found: dict[Path, str] = {}
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            continue
        found.setdefault(base, "")
        for entry in sorted(base.iterdir()):
            if entry.is_dir() and not (entry / RECORD_NAME).exists() and _holds_records(entry):
                found.setdefault(entry, entry.name)
    return sorted(found.items())


def _holds_records(directory: Path) -> bool:
    try:
        return any((entry / RECORD_NAME).is_file() for entry in directory.iterdir())
    except OSError:
        return False


def take_snapshot(backend: Backend, backend_name: str, state_dir: str,
                  roots: Iterable[str | os.PathLike[str]]) -> NodeSnapshot:
    """The node now (module docstring): the ZICs under ``roots``, the ledger, pools, latencies."""
    zics = [sample_zic(backend, record, namespace, root)
            for root, namespace in zic_roots(roots) for record in Store(root).records()]
    return NodeSnapshot(taken=time.monotonic(), backend=backend_name, zics=zics,
                        resources=_quietly(backend.resources, []), pools=_quietly(backend.pools, []),
                        latencies=read_latencies(state_dir))


def sample_zic(backend: Backend, record: ContainerRecord, namespace: str, root: Path) -> ZicSample:
    """One ZIC's record, live status, cell statistics (while its cell exists) and console counters."""
    status = live_status(record)
    stats = None
    if record.cell.cell_name:
        stats = _quietly(lambda: backend.stats(record.cell), None)
    cpus = tuple(sorted(int(cpu) for cpu in record.cell.allocation.get("cpus", ())))
    return ZicSample(container_id=record.id, namespace=namespace, cell=record.cell.cell_name, status=status,
                     pod=record.annotations.get(POD_NAME_ANNOTATION, ""),
                     pod_namespace=record.annotations.get(POD_NAMESPACE_ANNOTATION, ""),
                     cpus=cpus, uptime_seconds=seconds_since(record.created) if status != "stopped" else 0.0,
                     exit_code=record.cell.exit_code, stats=stats,
                     console=read_console_stats(root / record.id))


def seconds_since(rfc3339: str) -> float:
    """Seconds from an RFC 3339 UTC time (nanoseconds allowed) until now; 0 when unreadable."""
    text = rfc3339.rstrip("Z")
    whole, _, fraction = text.partition(".")
    try:
        then = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return 0.0
    seconds = then.timestamp() + (float(f"0.{fraction}") if fraction.isdigit() else 0.0)
    return max(time.time() - seconds, 0.0)


def _quietly(read, default):
    """``read()``, or ``default`` when the backend cannot answer (a snapshot never fails for it)."""
    try:
        return read()
    except (RunphiError, OSError):
        return default
