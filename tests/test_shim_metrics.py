"""runphi.shim.metrics: a cell's Stats as containerd's cgroup metrics, and the Any's type name.

The field numbers below are containerd's (containerd/cgroups stats/v1 and cgroup2/stats
metrics.proto, containerd's runtime/v2/runc/options/oci.proto): the subset protos must
put the bytes where containerd's decoder looks.
"""

from __future__ import annotations

import msgspec
import pytest
from google.protobuf import any_pb2

from runphi.backends.base import CellRecord, CellStatistics
from runphi.backends.jailhouse.allocator import Allocation, Segment
from runphi.container import ContainerRecord
from runphi.shim import metrics, typeurl
from runphi.shim.metrics import cell_metrics, host_uses_cgroup_v2
from runphi.shim.proto import cgroups_v1_pb2, cgroups_v2_pb2, runc_pb2, runphi_events_pb2

MiB = 1 << 20
UPTIME = 90 * 10**9 + 123_456  # ns


def record(allocation: dict) -> ContainerRecord:
    return ContainerRecord(id="zic-1", bundle="/b", rootfs="/b/rootfs", created="2026-12-01T00:00:00Z",
                           status="running", oci_version="1.0.2",
                           cell=CellRecord(cell_name="runphi-zic-1", cell_id=2, allocation=allocation))


@pytest.fixture
def jailhouse_record() -> ContainerRecord:
    """A record whose allocation is what the Jailhouse backend stores (CPUs 2-3, 64 MiB + 32 MiB low RAM)."""
    allocation = Allocation(container_id="zic-1", cpus=frozenset({3, 2}), ram=Segment(0x8000_0000, 96 * MiB),
                            main_ram_size=64 * MiB, uart_slot=1)
    return record(msgspec.to_builtins(allocation))


def test_v1_metrics_hold_the_cells_cpus_and_ram(jailhouse_record):
    packed = cell_metrics(jailhouse_record, None, UPTIME, cgroup_v2=False)
    assert packed.type_url == "io.containerd.cgroups.v1.Metrics"
    decoded = cgroups_v1_pb2.Metrics.FromString(packed.value)
    assert decoded.cpu.usage.total == 2 * UPTIME
    assert list(decoded.cpu.usage.per_cpu) == [0, 0, UPTIME, UPTIME]  # indexed by host CPU
    assert (decoded.cpu.usage.user, decoded.cpu.usage.kernel) == (0, 0)
    usage = decoded.memory.usage
    assert (usage.usage, usage.limit, usage.max, usage.failcnt) == (96 * MiB, 96 * MiB, 96 * MiB, 0)
    assert decoded.memory.hierarchical_memory_limit == 96 * MiB
    assert decoded.HasField("pids") and (decoded.pids.current, decoded.pids.limit) == (0, 0)


def test_v2_metrics_hold_the_cells_cpus_and_ram(jailhouse_record):
    packed = cell_metrics(jailhouse_record, None, UPTIME, cgroup_v2=True)
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    decoded = typeurl.unpack(packed, cgroups_v2_pb2.Metrics)
    assert decoded.cpu.usage_usec == 2 * UPTIME // 1000
    assert (decoded.cpu.user_usec, decoded.cpu.system_usec) == (0, 0)
    assert (decoded.memory.usage, decoded.memory.usage_limit) == (96 * MiB, 96 * MiB)
    assert decoded.HasField("pids") and decoded.pids.current == 0


def test_without_cpus_in_the_allocation_the_hypervisors_per_cpu_counters_name_them():
    statistics = CellStatistics(total={"total": 9}, per_cpu={5: {"total": 4}, 1: {"total": 5}})
    decoded = cgroups_v1_pb2.Metrics.FromString(cell_metrics(record({}), statistics, 1000, False).value)
    assert decoded.cpu.usage.total == 2000
    assert list(decoded.cpu.usage.per_cpu) == [0, 1000, 0, 0, 0, 1000]
    assert decoded.memory.usage.usage == 0


def test_a_cell_that_has_not_run_has_used_no_cpu_yet(jailhouse_record):
    for uptime in (0, -5):
        decoded = cgroups_v2_pb2.Metrics.FromString(cell_metrics(jailhouse_record, None, uptime, True).value)
        assert decoded.cpu.usage_usec == 0 and decoded.memory.usage == 96 * MiB


def test_host_cgroup_mode_is_read_from_the_unified_hierarchys_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "CGROUP_V2_MARKER", str(tmp_path / "cgroup.controllers"))
    assert not host_uses_cgroup_v2()
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert host_uses_cgroup_v2()


# ------------------------------------------------------------------------- containerd's numbers

CONTAINERD_FIELDS = {
    cgroups_v1_pb2.Metrics: {"pids": 2, "cpu": 3, "memory": 4},
    cgroups_v1_pb2.PidsStat: {"current": 1, "limit": 2},
    cgroups_v1_pb2.CPUStat: {"usage": 1},
    cgroups_v1_pb2.CPUUsage: {"total": 1, "kernel": 2, "user": 3, "per_cpu": 4},
    cgroups_v1_pb2.MemoryStat: {"hierarchical_memory_limit": 16, "usage": 33},
    cgroups_v1_pb2.MemoryEntry: {"limit": 1, "usage": 2, "max": 3, "failcnt": 4},
    cgroups_v2_pb2.Metrics: {"pids": 1, "cpu": 2, "memory": 4},
    cgroups_v2_pb2.PidsStat: {"current": 1, "limit": 2},
    cgroups_v2_pb2.CPUStat: {"usage_usec": 1, "user_usec": 2, "system_usec": 3},
    cgroups_v2_pb2.MemoryStat: {"usage": 32, "usage_limit": 33},
    runc_pb2.ProcessDetails: {"exec_id": 1},
}


@pytest.mark.parametrize("message", CONTAINERD_FIELDS, ids=lambda m: m.DESCRIPTOR.full_name)
def test_subset_messages_use_containerds_field_numbers(message):
    assert {f.name: f.number for f in message.DESCRIPTOR.fields} == CONTAINERD_FIELDS[message]


def test_per_cpu_is_packed_as_go_expects_a_repeated_uint64():
    usage = cgroups_v1_pb2.CPUUsage(per_cpu=[1, 2])
    assert usage.SerializeToString() == b"\x22\x02\x01\x02"  # field 4, length-delimited (packed)


# ------------------------------------------------------------------------- typeurl


def test_pack_writes_the_bare_name_where_any_pack_writes_a_prefix():
    details = runc_pb2.ProcessDetails(exec_id="e1")
    prefixed = any_pb2.Any()
    prefixed.Pack(details)
    assert prefixed.type_url == "type.googleapis.com/containerd.runc.v1.ProcessDetails"
    packed = typeurl.pack(details)
    assert packed.type_url == "containerd.runc.v1.ProcessDetails" and packed.value == prefixed.value
    assert typeurl.unpack(packed, runc_pb2.ProcessDetails) == details
    assert typeurl.unpack(prefixed, runc_pb2.ProcessDetails) == details
    with pytest.raises(ValueError):
        typeurl.unpack(packed, runphi_events_pb2.CellFailed)
