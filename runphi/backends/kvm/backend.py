"""The KVM :class:`~runphi.backends.base.Backend`: a ZIC as a pinned QEMU virtual machine.

``launch`` (in ``runphi create``, synchronous, without trio):

1. read the image's boot description; choose KVM or TCG; allocate the ZIC's host
   CPUs and RAM in the node's resource ledger (the ``kvm-host`` template lends them);
2. make the cell's directory with its VM plan (``vm.json``) and ``status.json``
   ``created`` (:mod:`runphi.backends.kvm.cells`);
3. for a networked ZIC, its link (:mod:`runphi.backends.kvm.net`): a tap on the host,
   or inside the pod's network namespace when the spec names one;
   then the console: a socket pair, one end the console source the core pumps, the
   other QEMU's serial;
4. when the core hands the cell to an owner (``LaunchRequest.owned``), QEMU is
   *not* started here: the owner's watch brings it up, so that the VM process is the
   owner's child (:mod:`runphi.backends.kvm.watch`). A direct caller of the protocol
   gets the VM started here, paused, as its own child.

Every step registers its undo; a failure runs them in reverse order. The verbs reach
a running VM through its control socket (QMP ``cont``, ``stop``, ``quit``,
``query-status``); a VM that has ended is described by ``status.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from runphi.backends.base import (GONE, LINUX_CMDLINE_ANNOTATION, BackendError, CellNotFound, CellRecord,
                                  CellState, CellStatistics, CellStats, CellStatus, LaunchedCell, LaunchRequest,
                                  OperationDenied, PoolUse, ResourceBusy, WatchSettings, shutdown_timeout)
from runphi.backends.kvm.cells import (PLAN_NAME, CellFile, cell_dir, cell_names, read_plan, read_status,
                                       remove_cell_dir, status_of, write_atomically, write_status)
from runphi.backends.kvm.qmp import BlockingQmp, QmpError
from runphi.backends.ledger import MiB
from runphi.errors import RunphiError
from runphi.pausepoint import pause_point
from runphi.undo import UndoStack

if TYPE_CHECKING:
    from runphi.backends.kvm.host import KvmHost
    from runphi.backends.kvm.machine import VmPlan
    from runphi.backends.ledger import Allocation, NodeLedger, ResourceUse
    from runphi.config import RuntimeConfig
    from runphi.image import BootDescription

#: Longest container id used as a cell name as it is.
NAME_MAX_LEN = 64
_NAME_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: QEMU's ``query-status`` words in runphi's terms (anything else: UNKNOWN, keep watching).
QEMU_STATES = {
    "prelaunch": CellState.CREATED,
    "running": CellState.RUNNING,
    "paused": CellState.SHUT_DOWN,
    "shutdown": CellState.SHUT_DOWN,
    "guest-panicked": CellState.FAILED,
    "internal-error": CellState.FAILED,
}
#: VMs this process started for a direct protocol caller (kept so they are reaped here).
_UNOWNED: dict[str, subprocess.Popen[bytes]] = {}


def vm_alive(file: CellFile) -> bool:
    """Whether the VM process of an ``up`` cell still runs (not a zombie, not a reused pid)."""
    from runphi.procfs import process_start_time

    return file.pid > 0 and process_start_time(file.pid) == file.start_time


class KvmBackend:
    """This host's QEMU/KVM, as configured in runphi.toml (``[kvm]``)."""

    def __init__(self, config: RuntimeConfig, warn: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.kvm = config.kvm
        self._warn = warn or (lambda message: None)
        self._host: KvmHost | None = None

    @property
    def host(self) -> KvmHost:
        if self._host is None:
            from runphi.backends.kvm.host import load_host

            self._host = load_host(self.kvm.host_path())
        return self._host

    def ledger(self) -> NodeLedger:
        from runphi.backends.kvm.host import host_cpus
        from runphi.backends.ledger import NodeLedger

        state_dir = self.config.state_dir
        return NodeLedger(self.host, Path(state_dir), root_cpus=host_cpus,
                          live_cells=lambda: cell_names(state_dir), cell_name=self.planned_cell_name,
                          warn=self._warn)

    def _dir(self, cell_name: str) -> Path:
        return cell_dir(self.config.state_dir, cell_name)

    # ---- the Backend protocol --------------------------------------------

    @property
    def poll_interval(self) -> float:
        return self.kvm.poll_interval_ms / 1000

    def planned_cell_name(self, container_id: str) -> str:
        """The id itself when it is a short, safe directory name; else a prefix and its hash."""
        if len(container_id) <= NAME_MAX_LEN and _NAME_SAFE.fullmatch(container_id):
            return container_id
        digest = hashlib.sha256(container_id.encode()).hexdigest()[:16]
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", container_id)[:40].lstrip(".-_")
        return f"{prefix}-{digest}" if prefix else f"zic-{digest}"

    def cell_state(self, cell: CellRecord) -> CellStatus:
        directory = self._dir(cell.cell_name)
        return self._status(directory, read_status(directory))

    @staticmethod
    def _status(directory: Path, file: CellFile | None) -> CellStatus:
        """The cell's status from its status file (``file``), asking QEMU while the VM is up."""
        known = status_of(file)
        if known is not None:
            return known
        assert file is not None
        if not vm_alive(file):
            return GONE  # the VM process ended without its owner recording how: vanished
        try:
            with BlockingQmp.connect(str(directory), timeout=5.0) as qmp:
                state = qmp.execute("query-status")["status"]
        except QmpError as exc:
            return CellStatus(CellState.UNKNOWN, f"unknown ({exc})")
        return CellStatus(QEMU_STATES.get(state, CellState.UNKNOWN), state)

    def cell_statistics(self, cell: CellRecord) -> CellStatistics:
        """CPU time (ms) each vCPU thread used, by the host CPU it is pinned to."""
        return self._vcpu_statistics(cell.cell_name, read_status(self._dir(cell.cell_name)))

    def _vcpu_statistics(self, name: str, file: CellFile | None) -> CellStatistics:
        from runphi.procfs import thread_cpu_ticks

        if file is None or file.phase != "up" or not vm_alive(file):
            raise CellNotFound(f"the VM of cell {name!r} is not running")
        plan = self._plan_of(name)
        per_cpu: dict[int, dict[str, int]] = {}
        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        for thread, cpu in zip(file.vcpu_threads, plan.vcpu_host_cpus, strict=False):
            ticks = thread_cpu_ticks(file.pid, thread) or 0
            per_cpu[cpu] = {"vcpu_ms": int(ticks * tick_ms)}
        return CellStatistics(total={"vcpu_ms": sum(c["vcpu_ms"] for c in per_cpu.values())}, per_cpu=per_cpu)

    def failed_cpus(self, cell: CellRecord) -> frozenset[int]:
        return _failed_cpus(read_status(self._dir(cell.cell_name)))

    def stats(self, cell: CellRecord) -> CellStats:
        """The VM's state and failed CPUs; while it runs, each vCPU thread's CPU time (by the
        host CPU it is pinned to) and KVM's per-VM counters where debugfs shows them."""
        from runphi.backends.kvm.vm import kvm_vm_counters

        directory = self._dir(cell.cell_name)
        file = read_status(directory)  # read once: status, failed CPUs and vCPU times agree
        status = self._status(directory, file)
        if status == GONE:
            return CellStats(status=GONE)
        failed = _failed_cpus(file)
        try:
            per_cpu = self._vcpu_statistics(cell.cell_name, file).per_cpu
        except CellNotFound:
            return CellStats(status=status, failed_cpus=failed)
        assert file is not None
        return CellStats(status=status, failed_cpus=failed,
                         cpu_seconds={cpu: counters["vcpu_ms"] / 1000 for cpu, counters in per_cpu.items()},
                         extra=kvm_vm_counters(file.pid))

    def pools(self) -> list[PoolUse]:
        """KVM has no pools of its own: the host's memory is the host's."""
        return []

    def resources(self) -> list[ResourceUse]:
        return self.ledger().usage()

    def start_cell(self, cell_name: str) -> None:
        """``cont`` (after a reset when the VM was stopped: a restart from its entry)."""
        with self._control(cell_name, "start") as qmp:
            if qmp.execute("query-status")["status"] in ("paused", "shutdown"):
                qmp.execute("system_reset")
            qmp.execute("cont")

    def shutdown_cell(self, cell_name: str, timeout: float | None = None) -> None:
        """``stop``: every vCPU halts, the VM stays (``paused``: shut down) until destroyed."""
        file = read_status(self._dir(cell_name))
        if file is None or file.phase != "up" or not vm_alive(file):
            return  # not running: nothing to stop
        with self._control(cell_name, "shut down") as qmp:
            qmp.execute("stop")

    def destroy_cell(self, cell_name: str, timeout: float | None = None) -> None:
        """End the VM process if it runs, remove the cell, release its container's resources.

        Idempotent: a cell that is already gone only has its resources released."""
        directory = self._dir(cell_name)
        file = read_status(directory)
        if file is not None and file.phase == "up" and vm_alive(file):
            self._end_vm(cell_name, file, timeout if timeout is not None else 5.0)
        self._remove_host_side(cell_name)
        remove_cell_dir(directory)
        self.release_cell_resources(cell_name)

    def release_cell_resources(self, cell_name: str) -> None:
        """Drop the ledger entry of the container whose cell is ``cell_name`` (if any)."""
        ledger = self.ledger()
        for allocation in ledger.allocations():
            if self.planned_cell_name(allocation.container_id) == cell_name:
                ledger.release(allocation.container_id)

    # ---- the VM from the outside ------------------------------------------

    def _control(self, cell_name: str, what: str) -> BlockingQmp:
        """A control session with the cell's running VM; OperationDenied when it has none."""
        directory = self._dir(cell_name)
        file = read_status(directory)
        if file is None:
            raise CellNotFound(f"no KVM cell named {cell_name!r}")
        if file.phase != "up" or not vm_alive(file):
            raise OperationDenied(f"cannot {what} cell {cell_name!r}: its VM is not running ({file.phase})")
        return BlockingQmp.connect(str(directory), timeout=5.0)

    def _end_vm(self, cell_name: str, file: CellFile, timeout: float) -> None:
        """``quit`` the VM; SIGKILL it when it is still there after ``timeout``."""
        try:
            with BlockingQmp.connect(str(self._dir(cell_name)), timeout=timeout) as qmp:
                qmp.execute("quit")
        except QmpError:
            pass
        deadline = time.monotonic() + timeout
        while vm_alive(file) and time.monotonic() < deadline:
            time.sleep(0.01)
        if vm_alive(file):
            try:
                os.kill(file.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        unowned = _UNOWNED.pop(cell_name, None)
        if unowned is not None:
            unowned.wait()

    def _plan_of(self, cell_name: str) -> VmPlan:
        return read_plan(self._dir(cell_name))

    def _remove_host_side(self, cell_name: str) -> None:
        """Remove the cgroup and the tap the cell's plan names (a cell without a plan has none)."""
        try:
            plan = self._plan_of(cell_name)
        except BackendError:
            return
        if plan.cgroup:
            from runphi.backends.kvm.cgroups import remove_cgroup

            remove_cgroup(plan.cgroup)
        if plan.pod_link is not None:
            from runphi.backends.kvm.net import remove_pod_redirect

            remove_pod_redirect(plan.pod_link)
        elif plan.host_link is not None:
            from runphi.backends.kvm.net import remove_tap

            remove_tap(plan.host_link.tap)

    # ---- create ------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> LaunchedCell:
        """Bring one ZIC's cell to created (module docstring); undo everything on failure."""
        undo = UndoStack()
        try:
            return self._launch(request, undo)
        except BaseException as exc:
            for problem in undo.unwind():
                self._warn(f"while undoing the create of {request.container_id}: {problem}")
            if isinstance(exc, OSError) and not isinstance(exc, RunphiError):
                raise BackendError(str(exc)) from None
            raise

    def _launch(self, request: LaunchRequest, undo: UndoStack) -> LaunchedCell:
        from runphi.backends.ledger import request_from
        from runphi.backends.links import pod_namespace
        from runphi.image import load_boot_description

        cid = request.container_id
        grace = shutdown_timeout(request.config.annotations, self.kvm.shutdown_timeout_ms)
        boot = load_boot_description(Path(request.rootfs))
        if boot.rpu_req:
            raise BackendError("a KVM host has no RPUs (remove rpu_req or run the image on Jailhouse)")
        plan_tools = self._qemu_and_accel()
        ledger = self.ledger()
        allocation = ledger.allocate(cid, request_from(request.config, boot, self.host))
        undo.push("release node resources", lambda: ledger.release(cid))
        name = self.planned_cell_name(cid)
        directory = self._dir(name)
        if directory.exists():
            raise ResourceBusy(f"a KVM cell named {name!r} already exists (left over, or used by another "
                               "namespace): delete its container first")
        directory.mkdir(mode=0o700, parents=True)
        undo.push("remove the cell directory", lambda: remove_cell_dir(directory))
        plan = self._plan(name, boot, allocation, request, *plan_tools)
        plan = self._with_network(plan, allocation.ivshmem_slot, pod_namespace(request.config), boot.netconf)
        # The plan first: a delete after a crash finds the tap and redirects it names.
        write_atomically(directory / PLAN_NAME, msgspec.json.encode(plan))
        tap_fd = self._make_link(plan, undo)
        pause_point("create:linked")
        write_status(directory, CellFile(phase="created"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        undo.push("close the console", ours.close)
        host_fds = (theirs.detach(), *([tap_fd] if tap_fd >= 0 else []))
        if request.owned:
            undo.push("close QEMU's ends", lambda: _close_all(host_fds))
        else:
            self._bring_up_here(name, directory, plan, host_fds, undo)  # takes the fds over
            host_fds = ()
        cell = CellRecord(cell_name=name, allocation=msgspec.to_builtins(allocation))
        undo.discard()
        return LaunchedCell(cell=cell, console_fd=ours.detach(), host_fds=host_fds,
                            watch=self._watch_settings(directory, grace))

    def _with_network(self, plan: VmPlan, slot: int | None, namespace: str, netconf: str) -> VmPlan:
        """``plan`` with the ZIC's link (ledger slot ``slot``; None: no network): inside the
        pod's network namespace when the spec names one, else a link-local /30 on the host (or
        the addresses the image's ``netconf`` states). A Linux guest finds its address on its
        kernel command line."""
        if slot is None:
            return plan
        from runphi.backends.kvm.net import plan_link, read_pod_link

        if namespace:
            pod = read_pod_link(namespace, plan.name)
            return msgspec.structs.replace(plan, pod_link=pod, append=_with_argument(plan, pod.guest_argument()))
        link = plan_link(plan.name, self.host.link_subnet, slot, netconf)
        return msgspec.structs.replace(plan, host_link=link, append=_with_argument(plan, link.guest_argument()))

    @staticmethod
    def _make_link(plan: VmPlan, undo: UndoStack) -> int:
        """Make the planned link; the tap's fd for QEMU when it lives in a pod (else -1)."""
        from runphi.backends.kvm.net import create_tap, open_pod_tap, remove_pod_redirect, remove_tap

        pod, link = plan.pod_link, plan.host_link
        if pod is not None:
            fd = open_pod_tap(pod)
            undo.push(f"remove the redirect on {pod.interface}", lambda: remove_pod_redirect(pod))
            return fd
        if link is not None:
            create_tap(link)
            undo.push(f"remove the tap {link.tap}", lambda: remove_tap(link.tap))
        return -1

    def _bring_up_here(self, name: str, directory: Path, plan: VmPlan, host_fds: tuple[int, ...],
                       undo: UndoStack) -> None:
        """Start the VM paused as this process's child (a direct protocol caller owns it); it
        takes over ``host_fds`` (QEMU's end of the console, a pod link's tap)."""
        from runphi.backends.kvm.vm import kill_and_reap, start_vm

        vm = start_vm(directory, plan, host_fds[0], tap_fd=host_fds[1] if len(host_fds) > 1 else -1,
                      timeout=10.0, follow_stderr=False)
        vm.qmp.close()
        _UNOWNED[name] = vm.process
        undo.push("kill the VM", lambda: kill_and_reap(_UNOWNED.pop(name, vm.process)))

    def _watch_settings(self, directory: Path, grace: float) -> WatchSettings:
        return WatchSettings(backend="kvm", backend_config={"cell_dir": str(directory.resolve())},
                             poll_interval=self.poll_interval, probe_interval=self.kvm.probe_interval_ms / 1000,
                             shutdown_timeout=grace, owner_brings_up=True)

    def _qemu_and_accel(self) -> tuple[str, str]:
        """(QEMU binary, accelerator), refusing a missing QEMU before anything is taken."""
        from runphi.backends.kvm.machine import choose_accel

        host = self.host
        binary = self.kvm.qemu or host.qemu.binary
        found = shutil.which(binary)
        if found is None:
            raise BackendError(f"QEMU ({binary}) is not installed or not on PATH "
                               "(install qemu-system-arm, or set [kvm] qemu in runphi.toml)")
        return found, choose_accel(self.kvm.accel, host.qemu.guest_arch)

    def _plan(self, name: str, boot: BootDescription, allocation: Allocation, request: LaunchRequest,
              binary: str, accel: str) -> VmPlan:
        from runphi.backends.kvm.machine import VmPlan

        qemu = self.host.qemu
        asked_mib = -(-allocation.main_ram_size // MiB)
        linux = linux_boot(boot, request.config.annotations, qemu.image_dtb) if boot.is_linux else {}
        memory_mib, images, entry = (asked_mib, [], None) if boot.is_linux else self._placement(boot, asked_mib)
        linux_cfg = request.config.linux
        return VmPlan(
            name=name, binary=binary, accel="kvm" if accel == "kvm" else "tcg",
            machine=qemu.kvm_machine if accel == "kvm" else qemu.machine,
            cpu=qemu.kvm_cpu if accel == "kvm" else qemu.cpu,
            memory_mib=memory_mib, vcpu_host_cpus=vcpu_host_cpus(boot, allocation.cpus),
            images=images, entry=entry, preallocate=qemu.preallocate, lock_memory=qemu.lock_memory,
            cgroup=(linux_cfg.cgroups_path or "") if linux_cfg else "", **linux)

    def _placement(self, boot: BootDescription, asked_mib: int) -> tuple[int, list, int]:
        """(``-m``, the inmate, its entry): RAM from the machine's base up to the inmate's
        address plus what the ZIC asked for (touched lazily; the ledger is charged the ask)."""
        from runphi.backends.kvm.machine import LoaderImage

        base = self.host.qemu.ram_base
        address = boot.starting_vaddress if boot.starting_vaddress is not None else base
        if address < base:
            raise BackendError(f"starting_vaddress {address:#x} is below the VM's RAM at {base:#x}: "
                               "link the inmate at or above it")
        try:
            size = os.stat(boot.inmate).st_size
        except OSError as exc:
            raise BackendError(f"cannot read the inmate {boot.inmate}: {exc.strerror}") from None
        if size > asked_mib * MiB:
            raise BackendError(f"the inmate ({size} bytes) does not fit the ZIC's {asked_mib} MiB of RAM "
                               "(raise \"memory\" in the boot description)")
        below = -(-(address - base) // MiB)
        return below + asked_mib, [LoaderImage(file=str(boot.inmate), address=address)], address


def vcpu_host_cpus(boot: BootDescription, cpus: frozenset[int]) -> list[int]:
    """Host CPU of each vCPU: the image's ``vcpu_pinning`` order, else the ledger's CPUs ascending."""
    if not boot.vcpu_pins:
        return sorted(cpus)
    by_vcpu = dict(boot.vcpu_pins)
    if sorted(by_vcpu) != list(range(len(by_vcpu))) or len(by_vcpu) != len(boot.vcpu_pins):
        raise BackendError("vcpu_pinning must name each vCPU 0..N-1 exactly once")
    return [by_vcpu[vcpu] for vcpu in range(len(by_vcpu))]


def _failed_cpus(file: CellFile | None) -> frozenset[int]:
    """The CPUs a failed cell's status file names (empty for any other phase)."""
    return frozenset(file.failed_cpus) if file is not None and file.phase == "failed" else frozenset()


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


def _with_argument(plan: VmPlan, argument: str) -> str:
    """A Linux guest's command line with ``argument`` added (a bare-metal guest has none)."""
    return f"{plan.append} {argument}".strip() if plan.kernel else plan.append


def linux_boot(boot: BootDescription, annotations: dict[str, str], image_dtb: bool) -> dict[str, Any]:
    """``VmPlan`` fields of a Linux guest: its files (the image's device tree only with
    ``image_dtb``) and a command line with the VM's serial console."""
    cmdline = annotations.get(LINUX_CMDLINE_ANNOTATION, "")
    if not any(word.startswith("console=") for word in cmdline.split()):
        cmdline = f"console=ttyAMA0 {cmdline}".rstrip()
    kernel = boot.kernel or boot.inmate
    return {"kernel": str(kernel), "initrd": str(boot.initrd) if boot.initrd else "",
            "dtb": str(boot.dtb) if boot.dtb and image_dtb else "", "append": cmdline}
