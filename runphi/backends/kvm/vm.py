"""Bring a planned VM up: QEMU started paused, its vCPUs pinned, its cgroup joined.

:func:`start_vm` runs in the process that will own the VM (the monitor or the shim
server, in the thread that runs trio), synchronously. The guarantees:

* QEMU is this process's child, in its own process group, with
  PR_SET_PDEATHSIG(SIGKILL): it never outlives its owner;
* when :func:`start_vm` returns, QEMU's control socket serves the verbs, every vCPU
  thread runs only on its host CPU (``sched_setaffinity`` on the thread ids of
  ``query-cpus-fast``, checked), the process is in the container's cgroup when
  there is one, and ``status.json`` says ``up``;
* when it raises (one line: QEMU's own error when it printed one), QEMU is killed
  and reaped and nothing of it is left.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from runphi.backends.base import BackendError
from runphi.backends.kvm.cells import QEMU_LOG_NAME, CellFile, write_status
from runphi.backends.kvm.cgroups import join_cgroup
from runphi.backends.kvm.machine import VmPlan, qemu_argv
from runphi.backends.kvm.qmp import BlockingQmp, QmpError, control_path, vcpu_threads

_PR_SET_PDEATHSIG = 1


@dataclass
class RunningVm:
    """A VM brought up by this process: QEMU, the owner's QMP session, QEMU's stderr."""

    process: subprocess.Popen[bytes]
    qmp: BlockingQmp
    #: Read end of QEMU's stderr (-1 when it goes to the cell's qemu.log).
    stderr_fd: int
    vcpu_threads: list[int]


def start_vm(directory: Path, plan: VmPlan, console_fd: int, *, timeout: float, follow_stderr: bool,
             tap_fd: int = -1) -> RunningVm:
    """Start ``plan``'s QEMU paused (module docstring); ``console_fd`` is QEMU's end of the
    console, ``tap_fd`` a pod link's tap (-1: none); both are closed here. ``follow_stderr``: a
    pipe for the caller, else qemu.log."""
    try:
        control = _control_listener(directory)
    except BaseException:
        for fd in (console_fd, tap_fd):
            if fd >= 0:
                os.close(fd)
        raise
    owner_ours, owner_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stderr_read, stderr_write = _stderr_target(directory, follow_stderr)
    try:
        argv = qemu_argv(plan, console_fd=console_fd, owner_qmp_fd=owner_theirs.fileno(),
                         control_fd=control.fileno(), tap_fd=tap_fd)
        fds = (console_fd, owner_theirs.fileno(), control.fileno(), *([tap_fd] if tap_fd >= 0 else []))
        process = _spawn(argv, fds, stderr_write, plan)
    except BaseException:
        owner_ours.close()
        if stderr_read >= 0:
            os.close(stderr_read)
        raise
    finally:
        for fd in (console_fd, stderr_write, tap_fd):
            if fd >= 0:
                os.close(fd)
        owner_theirs.close()
        control.close()
    try:
        qmp = BlockingQmp(owner_ours, timeout)
        qmp.negotiate()
        threads = _pin_vcpus(qmp, plan)
        join_cgroup(process.pid, plan.cgroup)
    except BaseException as exc:
        if isinstance(exc, QmpError):
            reason = _qemu_says(process, stderr_read, directory)
        else:
            kill_and_reap(process)
            reason = str(exc)
        owner_ours.close()
        if stderr_read >= 0:
            os.close(stderr_read)
        raise BackendError(f"QEMU could not bring up VM {plan.name}: {reason}") from None
    from runphi.procfs import process_start_time

    write_status(directory, CellFile(phase="up", pid=process.pid, start_time=process_start_time(process.pid) or 0,
                                     vcpu_threads=threads))
    return RunningVm(process=process, qmp=qmp, stderr_fd=stderr_read, vcpu_threads=threads)


def _control_listener(directory: Path) -> socket.socket:
    """The control socket, bound in the cell's directory (through a directory fd: the
    path may be longer than a socket address allows) and listening."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = control_path(dir_fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener.bind(path)
        listener.listen(8)
    except OSError as exc:
        listener.close()
        raise BackendError(f"cannot make QEMU's control socket in {directory}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    return listener


def _stderr_target(directory: Path, follow: bool) -> tuple[int, int]:
    """(read end for the caller or -1, the fd QEMU writes its stderr to)."""
    if follow:
        return os.pipe()
    return -1, os.open(directory / QEMU_LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


# Resolved before any fork: the child must not dlopen (another thread may hold the loader lock).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL this child when the forking thread dies (and if it already did)."""
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(127)


def _spawn(argv: list[str], fds: tuple[int, ...], stderr_fd: int, plan: VmPlan) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr_fd, stderr=stderr_fd,
                                pass_fds=fds, process_group=0, close_fds=True,
                                preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    except OSError as exc:
        raise BackendError(f"cannot run {plan.binary} for VM {plan.name}: {exc.strerror or exc} "
                           "(install qemu-system-arm, or set [kvm] qemu in runphi.toml)") from None


def _pin_vcpus(qmp: BlockingQmp, plan: VmPlan) -> list[int]:
    """Pin vCPU i's thread to host CPU ``plan.vcpu_host_cpus[i]``; the thread ids.

    Raises BackendError when QEMU runs several vCPUs on one thread (no per-vCPU pinning
    possible) or the kernel does not keep the affinity."""
    threads = [cpu.thread_id for cpu in vcpu_threads(qmp.execute("query-cpus-fast"))]
    if len(threads) != len(plan.vcpu_host_cpus) or len(set(threads)) != len(threads):
        raise BackendError(f"QEMU runs {len(plan.vcpu_host_cpus)} vCPUs on threads {threads}: "
                           "they cannot be pinned one by one")
    for thread, cpu in zip(threads, plan.vcpu_host_cpus, strict=True):
        try:
            os.sched_setaffinity(thread, {cpu})
            kept = os.sched_getaffinity(thread)
        except OSError as exc:
            raise BackendError(f"cannot pin vCPU thread {thread} to host CPU {cpu}: {exc.strerror}") from None
        if kept != {cpu}:
            raise BackendError(f"vCPU thread {thread} runs on CPUs {sorted(kept)}, not only on {cpu}")
    return threads


def _qemu_says(process: subprocess.Popen[bytes], stderr_fd: int, directory: Path) -> str:
    """Why QEMU did not come up: its own error line, after it was killed and reaped."""
    kill_and_reap(process)
    if stderr_fd >= 0:
        chunks = []
        while chunk := os.read(stderr_fd, 65536):
            chunks.append(chunk)
        text = b"".join(chunks).decode(errors="replace")
    else:
        text = (directory / QEMU_LOG_NAME).read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("qemu-system-")]
    return (own or lines or [f"it exited with status {process.returncode}"])[0]


def kill_and_reap(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL QEMU's process group and reap it (harmless when it already exited)."""
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


#: Where KVM shows a VM's statistics when debugfs is mounted: one directory per VM,
#: ``<pid>-<vm fd>``, one decimal file per counter.
KVM_DEBUGFS = "/sys/kernel/debug/kvm"


def kvm_vm_counters(pid: int, root: str = KVM_DEBUGFS) -> dict[str, int]:
    """KVM's per-VM counters of the QEMU process ``pid`` (``exits``, ``halt_exits``, ...);
    empty under TCG, without debugfs, or without the right to read it."""
    counters: dict[str, int] = {}
    try:
        directories = [entry.path for entry in os.scandir(root) if entry.name.startswith(f"{pid}-")]
    except OSError:
        return counters
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                with open(entry.path) as counter:
                    text = counter.read().strip()
            except OSError:
                continue
            if text.isdigit():
                counters[entry.name] = counters.get(entry.name, 0) + int(text)
    return counters
