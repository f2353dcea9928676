"""The events a ZIC task publishes, as containerd's registered messages (shim-v2.md §5.2).

``/tasks/create``, ``/tasks/start``, ``/tasks/exit`` and ``/tasks/delete`` carry
``containerd.events.Task*`` (``ctr events`` prints them); ``/runphi/cell/failed``
carries runphi's own ``runphi.events.v1.CellFailed`` (docs/shim-events.md shows a
subscriber decoding it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from runphi.shim.proto import events_pb2, mount_pb2

if TYPE_CHECKING:
    from runphi.shim.task import ZicTask


def timestamp(ns: int) -> Timestamp:
    """A protobuf Timestamp of ``ns`` nanoseconds since the epoch."""
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def create(task: ZicTask) -> events_pb2.TaskCreate:
    request = task.request
    return events_pb2.TaskCreate(
        container_id=request.id, bundle=request.bundle, pid=task.pid,
        rootfs=[mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in request.rootfs],
        io=events_pb2.TaskIO(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr,
                             terminal=request.terminal))


def start(task: ZicTask) -> events_pb2.TaskStart:
    return events_pb2.TaskStart(container_id=task.request.id, pid=task.pid)


def exit(task: ZicTask) -> events_pb2.TaskExit:
    assert task.outcome is not None
    return events_pb2.TaskExit(container_id=task.request.id, id=task.request.id, pid=task.pid,
                               exit_status=task.outcome.code, exited_at=timestamp(task.exited_at_ns))


def delete(task: ZicTask) -> events_pb2.TaskDelete:
    code = task.outcome.code if task.outcome is not None else 0
    return events_pb2.TaskDelete(container_id=task.request.id, pid=task.pid, exit_status=code,
                                 exited_at=timestamp(task.exited_at_ns))


def cell_failed(task: ZicTask, failed_cpus: list[int]):
    """``/runphi/cell/failed``: which container, which cell, which CPUs, in what state, when."""
    from runphi.shim.events import cell_failed as event

    assert task.record is not None and task.outcome is not None
    return event(task.record, task.outcome.cell_state or "failed", failed_cpus, task.exited_at_ns)
