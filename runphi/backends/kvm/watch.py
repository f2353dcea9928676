"""The KVM :class:`~runphi.backends.base.CellWatch`: a ZIC's VM, owned by its long-lived process.

``bring_up`` starts QEMU paused as this process's child (:func:`~runphi.backends.kvm.vm.start_vm`);
``follow`` then turns what QEMU reports into the cell's state, which ``read_state``
returns without asking anyone:

* QMP ``RESUME`` → running; ``STOP`` (a verb's ``shutdown_cell``) → shut down ("paused");
* ``SHUTDOWN`` from the guest: a power-off → shut down; a reset or a panic → failed;
  ``GUEST_PANICKED`` → failed; a guest access to unassigned memory (QEMU's
  ``guest_errors`` log) → failed, every vCPU's host CPU reported as failed;
* QEMU exiting with none of these decided → gone (the VM vanished).

Once the end is decided it is written to ``status.json`` and the VM process ends
(``quit``, then SIGKILL), so a cell that ended holds no host CPU and keeps reporting
how it ended until ``destroy_cell``. Imported by the owner only (trio is loaded there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import trio

from runphi.backends.base import GONE, BackendError, CellState, CellStatus
from runphi.backends.kvm.cells import CellFile, read_plan, read_status, status_of, write_status
from runphi.backends.kvm.machine import VmPlan
from runphi.backends.kvm.qmp import QmpMessage, command_line, parse_line
from runphi.backends.kvm.vm import RunningVm, kill_and_reap, start_vm

_INVALID_ACCESS = re.compile(rb"Invalid (read|write|access) at addr 0x([0-9A-Fa-f]+), size (\d+)")
CREATED = CellStatus(CellState.CREATED, "prelaunch")
RUNNING = CellStatus(CellState.RUNNING, "running")


class KvmCellWatch:
    """One VM, as the process that owns it sees it."""

    def __init__(self, directory: Path, cell_name: str, tool_timeout: float, host_fds: tuple[int, ...]) -> None:
        self.directory = directory
        self.name = cell_name
        self.tool_timeout = tool_timeout
        #: QEMU's end of the console, and a pod link's tap when there is one.
        self._host_fds = host_fds
        self.vm: RunningVm | None = None
        self._plan: VmPlan | None = None
        self.status = CREATED
        self._ended = trio.Event()
        self._exited = trio.Event()
        self._powerdown_sent = False
        #: QEMU's last line on stderr (said when the VM vanishes).
        self._last_stderr = ""
        self._qmp_stream: trio.SocketStream | None = None

    # ---- bring-up ------------------------------------------------------------

    def bring_up(self) -> None:
        try:
            self._plan = read_plan(self.directory)
        except BackendError:
            for fd in self._host_fds:
                os.close(fd)
            raise
        fds, self._host_fds = self._host_fds, ()
        self.vm = start_vm(self.directory, self._plan, fds[0], tap_fd=fds[1] if len(fds) > 1 else -1,
                           timeout=self.tool_timeout, follow_stderr=True)

    # ---- the CellWatch protocol ------------------------------------------------

    def read_state(self) -> tuple[bool, CellStatus]:
        return True, self.status

    async def reachable(self) -> bool:
        return True  # no management side to lose: the VM is this process's child

    async def request_shutdown(self) -> bool:
        """Press the power button once (``system_powerdown``); True once the VM has stopped.

        A VM that never ran has nobody to press it for: it counts as stopped at once (it
        stays paused, as created, until destroyed)."""
        if self._stopped():
            return True
        if self.status is CREATED:
            self.status = CellStatus(CellState.SHUT_DOWN, "stopped before it started")
            return True
        if not self._powerdown_sent:
            self._powerdown_sent = True
            await self._send("system_powerdown")
        return self._stopped()

    async def force_destroy(self) -> bool:
        """``quit`` the VM, SIGKILL it after the tool deadline; True once it has exited."""
        if self.vm is None:
            return True
        await self._send("quit")
        with trio.move_on_after(self.tool_timeout):
            await self._exited.wait()
            return True
        kill_and_reap(self.vm.process)
        return True

    def _stopped(self) -> bool:
        return self.status.state in (CellState.SHUT_DOWN, CellState.FAILED, CellState.GONE)

    async def _send(self, command: str) -> None:
        if self._qmp_stream is None or self._exited.is_set():
            return
        try:
            await self._qmp_stream.send_all(command_line(command))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # QEMU is going: its exit decides

    # ---- following the VM ------------------------------------------------------

    async def follow(self) -> None:
        """Follow QEMU's events, stderr and exit until cancelled (module docstring)."""
        vm = self.vm
        if vm is None:
            return
        try:
            self._qmp_stream = trio.SocketStream(trio.socket.from_stdlib_socket(vm.qmp.sock))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_events, vm.qmp.events, vm.qmp.take_unread())
                nursery.start_soon(self._read_stderr, vm.stderr_fd)
                nursery.start_soon(self._wait_exit, vm)
        finally:
            with trio.CancelScope(shield=True):
                self._record_last_state()
                kill_and_reap(vm.process)

    async def _read_events(self, early: list[QmpMessage], pending: bytes) -> None:
        """Events the bring-up already received, then every line QEMU sends the owner."""
        for message in early:
            await self._on_event(message)
        assert self._qmp_stream is not None
        while True:
            try:
                chunk = await self._qmp_stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.strip():
                    await self._on_event(parse_line(line))

    async def _on_event(self, message: QmpMessage) -> None:
        if message.event == "RESUME" and not self._ended.is_set():
            self.status = RUNNING
        elif message.event == "STOP" and not self._ended.is_set():
            self.status = CellStatus(CellState.SHUT_DOWN, "paused")
        elif message.event == "SHUTDOWN" and message.data.get("guest"):
            reason = str(message.data.get("reason", ""))
            if reason == "guest-shutdown":
                await self._end(CellFile(phase="shut down", detail="shut down"))
            else:
                await self._fail(f"guest {reason.removeprefix('guest-')}")
        elif message.event == "GUEST_PANICKED":
            await self._fail("guest panicked")

    async def _read_stderr(self, fd: int) -> None:
        stream = trio.lowlevel.FdStream(fd)
        pending = b""
        async with stream:
            while chunk := await stream.receive_some(65536):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        self._last_stderr = line.decode(errors="replace").strip()
                    match = _INVALID_ACCESS.search(line)
                    if match:
                        kind, address, size = match.groups()
                        await self._fail(f"unhandled data {kind.decode()} at 0x{int(address, 16):x}({int(size)})")

    async def _wait_exit(self, vm: RunningVm) -> None:
        pidfd = os.pidfd_open(vm.process.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        vm.process.wait()
        self._exited.set()
        if not self._ended.is_set():
            self._ended.set()
            said = f": {self._last_stderr}" if self._last_stderr else ""
            self.status = CellStatus(CellState.GONE, f"gone: QEMU exited with status {vm.process.returncode}{said}")
            self._write(CellFile(phase="gone", detail=self.status.detail or "gone"))

    async def _fail(self, why: str) -> None:
        cpus = self._plan.vcpu_host_cpus if self._plan else []
        await self._end(CellFile(phase="failed", detail=f"failed: {why}", failed_cpus=list(cpus)))

    async def _end(self, ending: CellFile) -> None:
        """The first end decided wins: record it, then let the VM go."""
        if self._ended.is_set():
            return
        self._ended.set()
        self._write(ending)
        self.status = status_of(ending) or GONE  # an ending is never `up`
        await self._send("quit")

    def _write(self, file: CellFile) -> None:
        try:
            write_status(self.directory, file)
        except BackendError:
            pass  # the cell was destroyed under us: nothing left to describe

    def _record_last_state(self) -> None:
        """When supervision ends with the VM still there: what it was, for ``cell_state``."""
        if self._ended.is_set():
            return
        self._ended.set()
        current = read_status(self.directory)
        if current is None:
            return
        if self.status.state is CellState.SHUT_DOWN:
            self._write(CellFile(phase="shut down", detail=self.status.detail or "shut down"))
        else:
            self._write(CellFile(phase="gone", detail="gone: its owner ended"))


def open_cell_watch(backend_config: dict[str, str], cell_name: str, tool_timeout: float,
                    host_fds: tuple[int, ...] = ()) -> KvmCellWatch:
    """The watch of one VM, with the settings ``launch`` put in its WatchSettings; it takes
    over QEMU's end of the console (``host_fds[0]``) and a pod link's tap (``host_fds[1]``)."""
    return KvmCellWatch(Path(backend_config["cell_dir"]), cell_name, tool_timeout, host_fds)
