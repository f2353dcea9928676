"""One ZIC as a containerd task, owned by the shim server (DESIGN §13).

A :class:`ZicTask` is what ``runphi create`` + its monitor are in the runc-CLI mode,
inside this process: the core creates the cell and hands it over (``adopt``), a
:class:`~runphi.core.supervise.Supervisor` watches it and pumps its console into
containerd's FIFOs, and the outcome is recorded where ``runphi state``/``events``
read it. Guarantees:

* :meth:`ZicTask.create` is all or nothing: a failure leaves no cell, no ledger
  entry, no record, no mount, no open fd;
* the exit is published (``/tasks/exit``) after ``/tasks/start``, once the console
  is drained, and only then does :attr:`ZicTask.exited` fire (``Wait`` returns);
* a cell that failed also announces ``/runphi/cell/failed`` with its failed CPUs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from runphi.backends.base import LaunchedCell
from runphi.container import SHIM_OWNER, ContainerRecord, current_process_identity
from runphi.core.create import CreateRequest, create_zic, load_zic_config
from runphi.core.delete import delete_zic
from runphi.core.kill import stop_signal
from runphi.core.node import TOOL_TIMEOUT
from runphi.core.outcome import EXIT_CRASHED, MonitorExit, record_exit_in_container_record, write_monitor_exit
from runphi.core.start import start_zic
from runphi.core.state import zic_stats
from runphi.errors import RunphiError
from runphi.core.supervise import Supervisor
from runphi.shim import task_events
from runphi.shim.mounts import MountSpec, mount_all, unmount_all
from runphi.shim.stdio import TaskStdio, open_task_stdio

if TYPE_CHECKING:
    from runphi.core.node import Node
    from runphi.shim.events import Publisher


class TaskRequest(msgspec.Struct, frozen=True, kw_only=True):
    """containerd's CreateTaskRequest, as the task keeps it (echoed by State)."""

    id: str
    bundle: str
    rootfs: list[MountSpec]
    terminal: bool
    stdin: str
    stdout: str
    stderr: str


class ZicTask:
    """One ZIC from Create to Delete."""

    def __init__(self, node: Node, publisher: Publisher, request: TaskRequest) -> None:
        self.node = node
        self.publisher = publisher
        self.request = request
        self.pid = os.getpid()
        self.record: ContainerRecord | None = None
        self.supervisor: Supervisor | None = None
        self.stdio = TaskStdio()
        self.started = False
        self.started_at_ns = 0
        #: Fires once the exit is known and published (Wait returns).
        self.exited = trio.Event()
        self.outcome: MonitorExit | None = None
        self.exited_at_ns = 0
        self._start_announced = trio.Event()
        self._kept: list[int] = []
        self._mounted = False
        self._launched: LaunchedCell | None = None
        self._start_fd = -1

    @property
    def container_dir(self) -> Path:
        return self.node.store.container_dir(self.request.id)

    # ---- Create ----------------------------------------------------------------------

    async def create(self, nursery: trio.Nursery) -> None:
        """Mount the rootfs, open the stdio, create the cell (owned here), start supervising."""
        try:
            await trio.to_thread.run_sync(self._create_sync)
            try:
                self.supervisor = self._make_supervisor()
            except BaseException:
                await self._delete_zic()
                raise
        except BaseException:
            self._release_host_side()
            raise
        nursery.start_soon(self._supervise, self.supervisor)
        self.publisher.publish("/tasks/create", task_events.create(self))

    def _create_sync(self) -> None:
        request = self.request
        bundle = Path(request.bundle)
        if request.rootfs:
            mount_all(request.rootfs, bundle / "rootfs")
            self._mounted = True
        config_bytes, config = load_zic_config(self.node, bundle, request.id)
        self.stdio = open_task_stdio(request.id, request.stdin, request.stdout,
                                     "" if request.terminal else request.stderr)
        create = CreateRequest(container_id=request.id, bundle=bundle, config=config, config_bytes=config_bytes,
                               owner=SHIM_OWNER, open_stdin=bool(request.stdin))
        self.record = create_zic(self.node, create, adopt=self._adopt)

    def _adopt(self, launched: LaunchedCell, start_fd: int) -> tuple[int, int]:
        """Keep the console source and the start fifo; this process now owns the ZIC."""
        console_fd = os.dup(launched.console_fd) if launched.console_fd >= 0 else -1
        start = os.dup(start_fd)
        host_fds = tuple(os.dup(fd) for fd in launched.host_fds)
        self._kept = [fd for fd in (console_fd, start, *host_fds) if fd >= 0]
        self._launched = msgspec.structs.replace(launched, console_fd=console_fd, host_fds=host_fds)
        self._start_fd = start
        return current_process_identity()

    def _make_supervisor(self) -> Supervisor:
        from runphi.backends.registry import open_cell_watch
        from runphi.monitor_console import ConsoleTasks

        launched = self._launched
        assert launched is not None
        cell = open_cell_watch(launched.watch.backend, launched.watch.backend_config,
                               launched.cell.cell_name, TOOL_TIMEOUT, launched.host_fds)
        # The watch owns the host fds now (it closes them once the cell is up).
        self._kept = [fd for fd in self._kept if fd not in launched.host_fds]
        cell.bring_up()  # in the trio thread: a VM process dies with the thread that forked it
        console = None
        if launched.console_fd >= 0:
            output = self.stdio.stdout if self.stdio.stdout >= 0 else self._null_output()
            stdin = self.stdio.stdin if self.stdio.stdin >= 0 else None
            console = ConsoleTasks(console_fd=launched.console_fd, output_fd=output, input_fd=stdin,
                                   log_dir=str(self.container_dir), kind=launched.console_kind,
                                   cell_name=launched.cell.cell_name)
        return Supervisor(cell, launched.watch, start_fd=self._start_fd, console=console)

    def _null_output(self) -> int:
        """Where the console goes when containerd gave no stdout (it still reaches ``runphi logs``)."""
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self._kept.append(fd)
        return fd

    # ---- the ZIC's life ----------------------------------------------------------------

    async def _supervise(self, supervisor: Supervisor) -> None:
        """Supervise until the exit status is decided; record and announce it."""
        outcome = await supervisor.run()
        self.stdio.close_output()
        self.outcome = outcome
        self.exited_at_ns = time.time_ns()
        directory = str(self.container_dir)
        write_monitor_exit(directory, outcome)
        await trio.to_thread.run_sync(record_exit_in_container_record, directory, outcome)
        if outcome.code == EXIT_CRASHED:
            await self._announce_failure()
        if self.started:
            with trio.move_on_after(5):
                await self._start_announced.wait()  # /tasks/start goes out first
        self.publisher.publish("/tasks/exit", task_events.exit(self))
        self.exited.set()

    async def _announce_failure(self) -> None:
        """``/runphi/cell/failed``, naming the failed CPUs when the backend can tell."""
        assert self.record is not None
        record = self.record
        try:
            cpus = sorted(await trio.to_thread.run_sync(
                lambda: self.node.backend(record.id).failed_cpus(record.cell)))
        except RunphiError:
            cpus = []  # the cell is gone already: which CPUs failed can no longer be read
        self.publisher.publish("/runphi/cell/failed", task_events.cell_failed(self, cpus))

    async def start(self) -> None:
        """Start the cell and release the supervisor (the core's ``start``)."""
        if self.exited.is_set():
            raise ProcessFinished(self.request.id)
        try:
            self.record = await trio.to_thread.run_sync(start_zic, self.node, self.request.id)
            self.started = True
            self.started_at_ns = time.time_ns()
            self.publisher.publish("/tasks/start", task_events.start(self))
        finally:
            self._start_announced.set()

    async def metrics(self) -> Any:
        """The cell's statistics as containerd's cgroups metrics (see :mod:`runphi.shim.metrics`)."""
        from runphi.shim.metrics import cell_metrics, host_uses_cgroup_v2

        assert self.record is not None
        record = self.record
        statistics = None
        if not self.exited.is_set():
            try:
                _, statistics = await trio.to_thread.run_sync(zic_stats, self.node, record)
            except RunphiError:
                statistics = None  # the cell is going away: its totals are no longer readable
        uptime = 0
        if self.started_at_ns:
            uptime = (self.exited_at_ns or time.time_ns()) - self.started_at_ns
        return cell_metrics(record, statistics, uptime, host_uses_cgroup_v2())

    def kill(self, signum: int) -> None:
        """Ask the supervisor to stop the cell; ProcessFinished once it has exited."""
        if self.exited.is_set() or self.supervisor is None:
            raise ProcessFinished(self.request.id)
        self.supervisor.stop(stop_signal(self.request.id, signum))

    async def delete(self) -> None:
        """After the exit: destroy the cell, release its resources, remove the record and mounts."""
        await self._delete_zic()
        self._release_host_side()

    async def _delete_zic(self) -> None:
        """The core's delete of this ZIC (its cell, resources and record); this process owns it."""
        await trio.to_thread.run_sync(lambda: delete_zic(self.node, self.request.id, force=True, owned_here=True))

    def _release_host_side(self) -> None:
        """Close every fd and unmount the rootfs (idempotent)."""
        self.stdio.close()
        for fd in self._kept:
            try:
                os.close(fd)
            except OSError:
                pass
        self._kept = []
        if self._mounted:
            unmount_all(Path(self.request.bundle) / "rootfs")
            self._mounted = False


class ProcessFinished(Exception):
    """The task's process has exited (containerd expects NotFound)."""

    def __init__(self, container_id: str) -> None:
        super().__init__(f"process already finished: container {container_id} has exited")
