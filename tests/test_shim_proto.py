"""runphi/shim/proto: the checked-in generated code is what its .proto files compile to,
and the messages encode containerd's field numbers.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from google.protobuf import any_pb2, timestamp_pb2

from runphi.shim.proto import (cgroups_v1_pb2, cgroups_v2_pb2, events_pb2, events_service_pb2, generate, mount_pb2,
                               runc_pb2, runphi_events_pb2, task_pb2, task_types_pb2)

CHECKED_IN = Path(generate.__file__).resolve().parent


def generated_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*_pb2.py*"))}


def test_generated_code_is_up_to_date(tmp_path):
    generate.generate(tmp_path)
    fresh = generated_files(tmp_path / "runphi" / "shim" / "proto")
    assert len(fresh) == 2 * len(generate.PROTOS)
    stale = sorted(name for name in fresh.keys() | generated_files(CHECKED_IN).keys()
                   if fresh.get(name) != generated_files(CHECKED_IN).get(name))
    assert not stale, f"run `python -m runphi.shim.proto.generate` and check in: {stale}"


def test_every_proto_is_generated():
    assert sorted(generate.PROTOS) == sorted(p.name for p in CHECKED_IN.glob("*.proto"))


def test_create_task_request_with_mounts_round_trips():
    request = task_pb2.CreateTaskRequest(
        id="c1", bundle="/run/b/c1", terminal=True, stdin="/fifo/in", stdout="/fifo/out",
        rootfs=[mount_pb2.Mount(type="overlay", source="overlay", options=["index=off", "lowerdir=/l"])],
        options=any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\x0a\x01x"))
    decoded = task_pb2.CreateTaskRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert list(decoded.rootfs[0].options) == ["index=off", "lowerdir=/l"]
    assert decoded.rootfs[0].target == ""
    # Field 1 (id), wire type 2: what containerd's Go encoding puts first.
    assert request.SerializeToString().startswith(b"\x0a\x02c1")


def test_wait_response_with_timestamp_round_trips():
    exited = timestamp_pb2.Timestamp()
    exited.FromDatetime(datetime.datetime(2026, 12, 1, 12, 0, 0, 500, tzinfo=datetime.timezone.utc))
    response = task_pb2.WaitResponse(exit_status=137, exited_at=exited)
    decoded = task_pb2.WaitResponse.FromString(response.SerializeToString())
    assert decoded.exit_status == 137
    assert decoded.exited_at.ToDatetime(tzinfo=datetime.timezone.utc) == datetime.datetime(
        2026, 12, 1, 12, 0, 0, 500, tzinfo=datetime.timezone.utc)


def test_stats_response_with_any_round_trips():
    # containerd's typeurl v1 writes the bare full name, with no "type.googleapis.com/" prefix.
    info = task_types_pb2.ProcessInfo(pid=7)
    stats = any_pb2.Any(type_url="containerd.v1.types.ProcessInfo", value=info.SerializeToString())
    decoded = task_pb2.StatsResponse.FromString(task_pb2.StatsResponse(stats=stats).SerializeToString())
    assert decoded.stats.type_url == "containerd.v1.types.ProcessInfo"
    # protobuf's Any.Unpack wants a "/" in the URL, so such an Any is decoded by hand.
    assert not decoded.stats.Unpack(task_types_pb2.ProcessInfo())
    assert task_types_pb2.ProcessInfo.FromString(decoded.stats.value) == info


def test_state_response_status_enum():
    state = task_pb2.StateResponse(id="c1", status=task_types_pb2.RUNNING)
    assert task_pb2.StateResponse.FromString(state.SerializeToString()).status == 2


def test_task_service_methods_name_their_messages():
    service = task_pb2.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == "containerd.task.v2.Task"
    assert len(service.methods) == 17
    assert service.methods_by_name["Create"].input_type.full_name == "containerd.task.v2.CreateTaskRequest"
    assert service.methods_by_name["Kill"].output_type.full_name == "google.protobuf.Empty"


def test_event_envelope_carries_a_task_exit():
    exit_event = events_pb2.TaskExit(container_id="c1", id="c1", pid=42, exit_status=3)
    event = any_pb2.Any(type_url="containerd.events.TaskExit", value=exit_event.SerializeToString())
    forward = events_service_pb2.ForwardRequest(envelope=events_service_pb2.Envelope(
        namespace="default", topic="/tasks/exit", event=event))
    decoded = events_service_pb2.ForwardRequest.FromString(forward.SerializeToString())
    assert decoded.envelope.topic == "/tasks/exit"
    assert events_pb2.TaskExit.FromString(decoded.envelope.event.value) == exit_event
    assert events_service_pb2.DESCRIPTOR.services_by_name["Events"].full_name == (
        "containerd.services.events.ttrpc.v1.Events")


def test_subset_protos_keep_containerds_package_names():
    # The bare full name is the type_url containerd looks up (reference/shim-v2.md §7, §10 fact 11).
    assert cgroups_v1_pb2.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert cgroups_v2_pb2.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v2.Metrics"
    assert runc_pb2.ProcessDetails.DESCRIPTOR.full_name == "containerd.runc.v1.ProcessDetails"


def test_cell_failed_round_trips():
    failed = runphi_events_pb2.CellFailed(container_id="c1", cell="runphi-c1", failed_cpus=[2, 3],
                                          state="failed", cpus=[1, 2, 3])
    failed.failed_at.FromNanoseconds(1_796_000_000_000_000_001)
    decoded = runphi_events_pb2.CellFailed.FromString(failed.SerializeToString())
    assert decoded == failed and decoded.failed_at.ToNanoseconds() == 1_796_000_000_000_000_001
    assert runphi_events_pb2.CellFailed.DESCRIPTOR.full_name == "runphi.events.v1.CellFailed"
