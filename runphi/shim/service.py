"""``containerd.task.v2.Task`` for ZICs: containerd's calls mapped onto :class:`ZicTask` (§4).

Status codes as containerd maps them (shim-v2.md §3, pitfalls 6-11): an unknown id
or a finished process → NOT_FOUND; a duplicate Create → ALREADY_EXISTS; a runphi
refusal of bad input → INVALID_ARGUMENT / FAILED_PRECONDITION with runphi's one
line; what a ZIC cannot do (Exec, Pause, Resume, Update, Checkpoint) → UNIMPLEMENTED
saying why. Wait blocks until the exit, also when it comes before Start.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from google.protobuf import empty_pb2

from runphi.backends.base import BackendUnavailable
from runphi.errors import (
    BundleError,
    ContainerExists,
    ContainerNotFound,
    IllegalTransition,
    InvalidId,
    NotSupported,
    RunphiError,
)
from runphi.shim import task_events
from runphi.shim.cleanup import leave_delete_answer
from runphi.shim.mounts import MountSpec
from runphi.shim.proto import task_pb2, task_types_pb2
from runphi.shim.task import ProcessFinished, TaskRequest, ZicTask
from runphi.shim.ttrpc import Code, Method, TtrpcError

TASK_SERVICE = "containerd.task.v2.Task"

_CODES: tuple[tuple[type[BaseException], Code], ...] = (
    (ProcessFinished, Code.NOT_FOUND),
    (ContainerNotFound, Code.NOT_FOUND),
    (ContainerExists, Code.ALREADY_EXISTS),
    (NotSupported, Code.INVALID_ARGUMENT),
    (BundleError, Code.INVALID_ARGUMENT),
    (InvalidId, Code.INVALID_ARGUMENT),
    (IllegalTransition, Code.FAILED_PRECONDITION),
    (BackendUnavailable, Code.UNAVAILABLE),
    (RunphiError, Code.UNKNOWN),
)

_REFUSED = {
    "Exec": "exec is not supported: a partitioned container runs a guest on its own CPUs, "
            "there is no host process to run a command in",
    "Pause": "pause is not supported: a partitioned container's cell cannot be frozen",
    "Resume": "resume is not supported: a partitioned container's cell cannot be frozen",
    "Update": "update is not supported: a partitioned container's CPUs and memory are fixed at create",
    "Checkpoint": "checkpoint is not supported for a partitioned container",
}


def as_status(error: BaseException) -> TtrpcError:
    """The ttrpc status containerd expects for ``error`` (module docstring)."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return TtrpcError(code, str(getattr(error, "message", None) or error))
    raise error


class TaskService:
    """The Task API of one shim server: every ZIC it owns, by container id."""

    def __init__(self, node: Any, publisher: Any, nursery: trio.Nursery) -> None:
        self.node = node
        self.publisher = publisher
        self._nursery = nursery
        self.tasks: dict[str, ZicTask] = {}
        #: Set when containerd asked the server to shut down and it owns no task.
        self.shutdown = trio.Event()

    def methods(self) -> dict[str, dict[str, Method]]:
        """The service table for :func:`runphi.shim.ttrpc.serve`."""
        table = {
            "Create": Method(task_pb2.CreateTaskRequest, self.create),
            "Start": Method(task_pb2.StartRequest, self.start),
            "State": Method(task_pb2.StateRequest, self.state),
            "Kill": Method(task_pb2.KillRequest, self.kill),
            "Wait": Method(task_pb2.WaitRequest, self.wait),
            "Delete": Method(task_pb2.DeleteRequest, self.delete),
            "Pids": Method(task_pb2.PidsRequest, self.pids),
            "Connect": Method(task_pb2.ConnectRequest, self.connect),
            "Shutdown": Method(task_pb2.ShutdownRequest, self.shutdown_server),
            "CloseIO": Method(task_pb2.CloseIORequest, self.close_io),
            "ResizePty": Method(task_pb2.ResizePtyRequest, self.resize_pty),
            "Stats": Method(task_pb2.StatsRequest, self.stats),
        }
        refusals = {"Exec": task_pb2.ExecProcessRequest, "Pause": task_pb2.PauseRequest,
                    "Resume": task_pb2.ResumeRequest, "Update": task_pb2.UpdateTaskRequest,
                    "Checkpoint": task_pb2.CheckpointTaskRequest}
        for name, request_type in refusals.items():
            table[name] = Method(request_type, self._refusal(name))
        return {TASK_SERVICE: {name: Method(m.request_type, _mapped(m.handler)) for name, m in table.items()}}

    def _task(self, container_id: str, exec_id: str = "") -> ZicTask:
        if exec_id:
            raise TtrpcError(Code.NOT_FOUND, f"exec {exec_id} of container {container_id}: "
                                             "partitioned containers have no exec processes")
        task = self.tasks.get(container_id)
        if task is None:
            raise TtrpcError(Code.NOT_FOUND, f"container {container_id} not created")
        return task

    async def create(self, request: task_pb2.CreateTaskRequest) -> task_pb2.CreateTaskResponse:
        if request.id in self.tasks:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {request.id} already exists")
        if request.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "restoring from a checkpoint is not supported "
                                                 f"for partitioned container {request.id}")
        task = ZicTask(self.node, self.publisher, TaskRequest(
            id=request.id, bundle=request.bundle, terminal=request.terminal, stdin=request.stdin,
            stdout=request.stdout, stderr=request.stderr,
            rootfs=[MountSpec(type=m.type, source=m.source, options=list(m.options)) for m in request.rootfs]))
        self.tasks[request.id] = task
        try:
            await task.create(self._nursery)
        except BaseException:
            del self.tasks[request.id]
            raise
        return task_pb2.CreateTaskResponse(pid=task.pid)

    async def start(self, request: task_pb2.StartRequest) -> task_pb2.StartResponse:
        task = self._task(request.id, request.exec_id)
        await task.start()
        return task_pb2.StartResponse(pid=task.pid)

    async def state(self, request: task_pb2.StateRequest) -> task_pb2.StateResponse:
        task = self._task(request.id, request.exec_id)
        asked = task.request
        response = task_pb2.StateResponse(
            id=asked.id, bundle=asked.bundle, pid=task.pid, stdin=asked.stdin, stdout=asked.stdout,
            stderr=asked.stderr, terminal=asked.terminal, status=_status(task))
        if task.exited.is_set() and task.outcome is not None:
            response.exit_status = task.outcome.code
            response.exited_at.CopyFrom(task_events.timestamp(task.exited_at_ns))
        return response

    async def kill(self, request: task_pb2.KillRequest) -> empty_pb2.Empty:
        self._task(request.id, request.exec_id).kill(request.signal)
        return empty_pb2.Empty()

    async def wait(self, request: task_pb2.WaitRequest) -> task_pb2.WaitResponse:
        task = self._task(request.id, request.exec_id)
        await task.exited.wait()
        assert task.outcome is not None
        return task_pb2.WaitResponse(exit_status=task.outcome.code,
                                     exited_at=task_events.timestamp(task.exited_at_ns))

    async def delete(self, request: task_pb2.DeleteRequest) -> task_pb2.DeleteResponse:
        task = self._task(request.id, request.exec_id)
        if not task.exited.is_set():
            if task.started:
                raise TtrpcError(Code.FAILED_PRECONDITION,
                                 f"cannot delete container {request.id} that is not stopped: running")
            task.kill(signal.SIGKILL)  # a created task is deleted like runc: killed first
            await task.exited.wait()
        await task.delete()
        del self.tasks[request.id]
        self.publisher.publish("/tasks/delete", task_events.delete(task))
        assert task.outcome is not None
        response = task_pb2.DeleteResponse(pid=task.pid, exit_status=task.outcome.code,
                                           exited_at=task_events.timestamp(task.exited_at_ns))
        leave_delete_answer(task.request.bundle, response.SerializeToString())
        return response

    async def pids(self, request: task_pb2.PidsRequest) -> task_pb2.PidsResponse:
        task = self._task(request.id)
        if task.exited.is_set():
            return task_pb2.PidsResponse()
        return task_pb2.PidsResponse(processes=[task_types_pb2.ProcessInfo(pid=task.pid)])

    async def connect(self, request: task_pb2.ConnectRequest) -> task_pb2.ConnectResponse:
        task = self._task(request.id)
        return task_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=task.pid)

    async def shutdown_server(self, request: task_pb2.ShutdownRequest) -> empty_pb2.Empty:
        if not self.tasks:
            self.shutdown.set()
        return empty_pb2.Empty()

    async def close_io(self, request: task_pb2.CloseIORequest) -> empty_pb2.Empty:
        task = self._task(request.id, request.exec_id)
        if request.stdin:
            task.stdio.close_stdin_writer()
        return empty_pb2.Empty()

    async def resize_pty(self, request: task_pb2.ResizePtyRequest) -> empty_pb2.Empty:
        self._task(request.id, request.exec_id)  # a UART has no window size: accepted as is
        return empty_pb2.Empty()

    async def stats(self, request: task_pb2.StatsRequest) -> task_pb2.StatsResponse:
        task = self._task(request.id)
        return task_pb2.StatsResponse(stats=await task.metrics())

    def _refusal(self, name: str) -> Callable[[Any], Awaitable[Any]]:
        async def refuse(request: Any) -> Any:
            raise TtrpcError(Code.UNIMPLEMENTED, f"{_REFUSED[name]} (container {request.id})")
        return refuse


def _status(task: ZicTask) -> task_types_pb2.Status:
    if task.exited.is_set():
        return task_types_pb2.STOPPED
    return task_types_pb2.RUNNING if task.started else task_types_pb2.CREATED


def _mapped(handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """``handler`` with runphi's errors turned into containerd's status codes."""
    async def call(request: Any) -> Any:
        try:
            return await handler(request)
        except TtrpcError:
            raise
        except (RunphiError, ProcessFinished) as error:
            raise as_status(error) from None
    return call
