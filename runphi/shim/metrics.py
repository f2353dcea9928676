"""A ZIC's Stats answer as containerd's cgroup metrics (reference/shim-v2.md §7, §10 fact 11).

``ctr task metrics`` and CRI understand only ``io.containerd.cgroups.v1.Metrics`` and
``io.containerd.cgroups.v2.Metrics``, one per host cgroup mode, so a cell's figures go
into those messages. A cell has no cgroup; every field set here is one whose meaning
holds for a partition, and its value is exact:

* **CPU.** The cell owns its CPUs exclusively from the moment it starts: the host
  cannot schedule anything on them, whether the guest computes or idles. So the CPU
  time the container holds is ``uptime × number of the cell's CPUs``.
  v1 ``cpu.usage.total`` (ns) and v2 ``cpu.usage_usec`` (µs) carry that;
  v1 ``cpu.usage.per_cpu`` is indexed by host CPU number, as cpuacct's is: ``uptime``
  for each of the cell's CPUs, 0 for the host's others below the highest.
  User/kernel time (v1 ``user``/``kernel``, v2 ``user_usec``/``system_usec``) is
  left 0: the hypervisor does not tell the guest's user mode from its kernel mode.
  There is no throttling (no CFS quota applies), so those fields stay unset.
* **Memory.** The cell's RAM is carved out for it when it is created and no one else
  can use it until it is destroyed, so usage = limit = maximum = the cell's RAM
  (main RAM plus low RAM). v1: ``memory.usage.{usage,limit,max}`` and
  ``memory.hierarchical_memory_limit``; v2: ``memory.usage`` and ``memory.usage_limit``.
  Page-level breakdowns (rss, cache, anon, file…) are unknown to the host and unset.
* **Pids.** ``pids.current`` = 0 and ``pids.limit`` = 0 (no limit): a cell runs no host
  processes (present, so ``ctr task metrics`` prints them).
* **Not here:** block I/O, network, hugetlb and RDMA have no host-side counters for a
  cell. The hypervisor's VM-exit counters (total and per CPU) have no cgroup field at
  all; runphi exposes them through ``runphi events --stats ID`` (``data.cell.exits`` and
  ``data.cell.per_cpu``), not by bending unrelated fields here.

The cell's CPUs and RAM come from the backend's allocation document
(``record.cell.allocation``; Jailhouse: ``cpus`` a list of host CPU numbers, ``ram``
``{"start", "size"}`` covering main then low RAM). ``statistics`` only stands in for
the CPU list when the allocation has none: the hypervisor keeps exit counters for
exactly the cell's CPUs.
"""

from __future__ import annotations

import os

from google.protobuf import any_pb2

from runphi.backends.base import CellStatistics
from runphi.container import ContainerRecord
from runphi.shim import typeurl
from runphi.shim.proto import cgroups_v1_pb2, cgroups_v2_pb2

CGROUP_V2_MARKER = "/sys/fs/cgroup/cgroup.controllers"


def host_uses_cgroup_v2() -> bool:
    """Whether the host mounts the unified cgroup v2 hierarchy (containerd then expects v2 metrics)."""
    return os.path.exists(CGROUP_V2_MARKER)


def cell_cpus(record: ContainerRecord, statistics: CellStatistics | None) -> list[int]:
    """The host CPUs the cell owns, ascending: the allocation's, else those the hypervisor counts for."""
    cpus = record.cell.allocation.get("cpus") or []
    if not cpus and statistics is not None:
        cpus = list(statistics.per_cpu)
    return sorted(int(cpu) for cpu in cpus)


def cell_ram(record: ContainerRecord) -> int:
    """Bytes of RAM the cell owns (0 when the allocation does not say)."""
    ram = record.cell.allocation.get("ram") or {}
    return int(ram.get("size", 0)) if isinstance(ram, dict) else 0


def cell_metrics(record: ContainerRecord, statistics: CellStatistics | None, uptime_ns: int,
                 cgroup_v2: bool) -> any_pb2.Any:
    """The Stats ``stats`` Any for the cell of ``record``, running for ``uptime_ns``.

    ``io.containerd.cgroups.v2.Metrics`` when ``cgroup_v2``, else ``...v1.Metrics``,
    filled as the module docstring says, under the bare type name containerd looks up.
    """
    cpus, ram, uptime_ns = cell_cpus(record, statistics), cell_ram(record), max(uptime_ns, 0)
    if cgroup_v2:
        return typeurl.pack(_v2_metrics(cpus, ram, uptime_ns))
    return typeurl.pack(_v1_metrics(cpus, ram, uptime_ns))


def _v1_metrics(cpus: list[int], ram: int, uptime_ns: int) -> cgroups_v1_pb2.Metrics:
    per_cpu = [uptime_ns if cpu in cpus else 0 for cpu in range(cpus[-1] + 1)] if cpus else []
    return cgroups_v1_pb2.Metrics(
        pids=cgroups_v1_pb2.PidsStat(current=0, limit=0),
        cpu=cgroups_v1_pb2.CPUStat(usage=cgroups_v1_pb2.CPUUsage(total=uptime_ns * len(cpus), per_cpu=per_cpu)),
        memory=cgroups_v1_pb2.MemoryStat(hierarchical_memory_limit=ram,
                                         usage=cgroups_v1_pb2.MemoryEntry(limit=ram, usage=ram, max=ram)))


def _v2_metrics(cpus: list[int], ram: int, uptime_ns: int) -> cgroups_v2_pb2.Metrics:
    return cgroups_v2_pb2.Metrics(
        pids=cgroups_v2_pb2.PidsStat(current=0, limit=0),
        cpu=cgroups_v2_pb2.CPUStat(usage_usec=uptime_ns * len(cpus) // 1000),
        memory=cgroups_v2_pb2.MemoryStat(usage=ram, usage_limit=ram))
