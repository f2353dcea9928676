"""Driving real ZICs for the benchmarks: a simulated board, bundles, the real ``runphi`` CLI.

The benchmark process plays containerd's shim: it becomes a child subreaper,
so the monitor that ``runphi create`` double-forks is re-parented to it and
its exit is observed exactly (a pidfd becomes readable; no polling).

Time spent inside the hypervisor's tool is measured by pointing runphi at a
tiny compiled wrapper (``tool_wrapper``) that times each call of the real tool
and appends the seconds to a log: on a board the real ``jailhouse`` is a small
C program, while the simulator's is a Python script, so the suites report that
share separately from runphi's own.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from tools.jailhouse_sim.testing import SimBoard

from .harness import Skip, children_cpu_seconds

PR_SET_CHILD_SUBREAPER = 36
SCRIPT_MAGIC = "#!jailhouse-sim-inmate"
PLATFORM = "sim-qemu-arm64"

WRAPPER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/wait.h>

/* Run REAL with our arguments; append "<seconds> <caller pid> <cpu seconds> <args>" to LOG
   (one O_APPEND write). */
int main(int argc, char **argv) {
    struct timespec a, b;
    int status = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pid_t pid = fork();
    if (pid == 0) {
        argv[0] = REAL;
        execv(REAL, argv);
        _exit(127);
    }
    struct rusage usage;
    if (pid < 0 || wait4(pid, &status, 0, &usage) < 0)
        return 126;
    clock_gettime(CLOCK_MONOTONIC, &b);
    char line[512];
    double cpu = usage.ru_utime.tv_sec + usage.ru_stime.tv_sec
                 + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
    size_t n = (size_t)snprintf(line, sizeof line, "%.9f %d %.6f",
                                (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9, (int)getppid(), cpu);
    for (int i = 1; i < argc && n < sizeof line - 2; i++)
        n += (size_t)snprintf(line + n, sizeof line - 1 - n, " %s", argv[i]);
    if (n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    int fd = open(LOG, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd >= 0) {
        (void)!write(fd, line, n);
        close(fd);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
"""


def scratch_dir() -> str | None:
    """Where boards and bundles go: ``$RUNPHI_BENCH_TMPDIR``, else ``/dev/shm`` when usable.

    A memory-backed directory, because the simulator's sysfs stands in for the
    kernel's (in memory): on a disk filesystem every poll of a cell's state
    would cost several times what it costs on a board. None: the system default.
    """
    chosen = os.environ.get("RUNPHI_BENCH_TMPDIR")
    if chosen:
        return chosen
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def python_env(base: Path) -> dict[str, str]:
    """This process's environment, with Python bytecode caching on, into ``base/pycache``.

    An installed runphi runs from compiled bytecode (pip compiles at install).
    An environment with ``PYTHONDONTWRITEBYTECODE`` set would instead make
    every verb recompile runphi's modules from source on every call, so the
    processes the benchmarks start (runphi and the references alike) get a
    private cache: the warm-up fills it, the measured runs read it.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(base / "pycache")
    return env


def runphi_binary() -> Path:
    """The ``runphi`` console script installed next to this interpreter."""
    path = Path(sys.executable).parent / "runphi"
    if not path.exists():
        raise Skip(f"{path} is missing: install runphi into this environment (pip install -e .)")
    return path


def become_subreaper() -> None:
    """Adopt orphaned descendants (the double-forked monitors), as containerd's shim does."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def guest_script(*lines: str) -> bytes:
    """A script-engine guest image (language in tools/jailhouse_sim/README.md)."""
    return (SCRIPT_MAGIC + "\n" + "\n".join(lines) + "\n").encode()


def write_bundle(path: Path, guest: bytes, *, memory_mib: int = 16) -> Path:
    """A ZIC bundle: config.json + rootfs/boot/{config.json, boot.bin}."""
    boot = path / "rootfs" / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "config.json").write_text(json.dumps({
        "os_var": "baremetal", "inmate": "/boot/boot.bin", "starting_vaddress": "0x70000000",
        "memory": memory_mib}))
    (boot / "boot.bin").write_bytes(guest)
    (path / "config.json").write_text(json.dumps({
        "ociVersion": "1.0.2", "root": {"path": "rootfs"},
        "process": {"terminal": False, "args": ["/boot/boot.bin"], "cwd": "/"},
        "annotations": {"org.runphi.runtime": "runphi"}}))
    return path


class Call(NamedTuple):
    """One call through a timing wrapper."""

    seconds: float
    caller: int
    cpu: float
    args: tuple[str, ...]


def build_tool_wrapper(real: Path, work: Path, name: str = "jailhouse") -> tuple[Path, Path]:
    """Compile a timing wrapper around ``real`` as ``work/name``; return (wrapper, its log file)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise Skip("no C compiler (cc/gcc) to build the tool-timing wrapper")
    source, wrapper, log = work / f"{name}-wrapper.c", work / name, work / f"{name}-calls.log"
    source.write_text(WRAPPER_C)
    subprocess.run([compiler, "-O2", f'-DREAL="{real}"', f'-DLOG="{log}"', "-o", str(wrapper), str(source)],
                   check=True, stdin=subprocess.DEVNULL)
    return wrapper, log


class Created(NamedTuple):
    """One ``runphi create``: the monitor's pid, wall and CPU seconds, and those inside the hypervisor tool.

    ``cpu`` is create's own CPU plus that of the processes it waited for (the
    tool calls, the intermediate fork), not the monitor's.
    """

    monitor: int
    wall: float
    tool: float
    cpu: float = 0.0
    tool_cpu: float = 0.0


def take_calls(log: Path) -> list[Call]:
    """The calls a timing wrapper logged since the last take (the log is emptied)."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    log.unlink()
    calls = []
    for line in text.splitlines():
        seconds, caller, cpu, *args = line.split()
        calls.append(Call(float(seconds), int(caller), float(cpu), tuple(args)))
    return calls


class ExitWatch:
    """Waits for one adopted process (a monitor) to exit, on its pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def wait(self, timeout: float) -> tuple[int, float]:
        """(exit status as the shim computes it, perf_counter when the exit became visible)."""
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"monitor {self.pid} did not exit within {timeout} s")
            seen = time.perf_counter()
            _, status = os.waitpid(self.pid, 0)
        finally:
            os.close(self.fd)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status), seen


class Node:
    """The runphi CLI bound to one simulated board, state root and node state dir."""

    def __init__(self, sim: SimBoard, base: Path, platform: str = PLATFORM) -> None:
        self.sim = sim
        self.base = base
        self.root = base / "root"
        self.runphi = runphi_binary()
        self.wrapper, self.tool_log = build_tool_wrapper(sim.jailhouse_path, base)
        config = base / "runphi.toml"
        config.write_text('backend = "jailhouse"\n')
        self.env = {**python_env(base),
                    "RUNPHI_CONFIG": str(config), "RUNPHI_BACKEND": "jailhouse",
                    "RUNPHI_JAILHOUSE": str(self.wrapper), "RUNPHI_SYSFS": str(sim.sysfs_path("")),
                    "RUNPHI_PLATFORM": platform, "RUNPHI_STATE_DIR": str(base / "node")}
        self.monitors: dict[str, int] = {}
        self._bundles = base / "bundles"

    def bundle(self, name: str, guest: bytes) -> Path:
        return write_bundle(self._bundles / name, guest)

    def argv(self, *args: str) -> list[str]:
        return [str(self.runphi), "--root", str(self.root), *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``runphi --root R ARGS`` to completion; output through temp files (a monitor
        forked by the verb could hold a pipe open forever)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.run(self.argv(*args), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  env=self.env, timeout=120)
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
        if check and done.returncode != 0:
            raise RuntimeError(f"runphi {' '.join(args)} exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()}")
        return done

    def run_timed(self, *args: str) -> tuple[float, float]:
        """``runphi ARGS`` (must succeed): (wall seconds, seconds inside its own hypervisor tool calls)."""
        self.tool_seconds()
        with tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            proc = subprocess.Popen(self.argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, env=self.env)
            status = proc.wait(timeout=120)
            wall = time.perf_counter() - start
            if status != 0:
                err.seek(0)
                raise RuntimeError(f"runphi {' '.join(args)} exited {status}: "
                                   f"{err.read().decode(errors='replace').strip()}")
        return wall, self.tool_seconds(caller=proc.pid)

    def create(self, cid: str, bundle: Path, *, stdin: int | None = None, stdout: int | None = None) -> int:
        """``runphi create``; the monitor inherits ``stdin``/``stdout`` (fds). Returns the monitor pid."""
        return self.create_timed(cid, bundle, stdin=stdin, stdout=stdout).monitor

    def create_timed(self, cid: str, bundle: Path, *, stdin: int | None = None,
                     stdout: int | None = None) -> Created:
        """``runphi create`` with its wall time and the time its own hypervisor tool calls took."""
        pid_file = self.base / f"{cid}.pid"
        self.tool_seconds()  # start from an empty log
        with tempfile.TemporaryFile() as err:
            cpu_before = children_cpu_seconds()
            start = time.perf_counter()
            proc = subprocess.Popen(self.argv("create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid),
                                    stdin=subprocess.DEVNULL if stdin is None else stdin,
                                    stdout=subprocess.DEVNULL if stdout is None else stdout,
                                    stderr=err, env=self.env)
            status = proc.wait(timeout=120)
            wall = time.perf_counter() - start
            cpu = children_cpu_seconds() - cpu_before
            err.seek(0)
            if status != 0:
                raise RuntimeError(f"runphi create {cid} exited {status}: "
                                   f"{err.read().decode(errors='replace').strip()}")
        pid = int(pid_file.read_text())
        self.monitors[cid] = pid
        tool_wall, tool_cpu = self.tool_usage(caller=proc.pid)
        return Created(pid, wall, tool_wall, cpu, tool_cpu)

    def tool_seconds(self, caller: int | None = None) -> float:
        """Seconds spent inside the hypervisor tool since the last call (and reset the log).

        With ``caller``, only the calls that process made (monitors probe the
        hypervisor in the background and would otherwise be counted too).
        """
        return self.tool_usage(caller)[0]

    def tool_usage(self, caller: int | None = None) -> tuple[float, float]:
        """(wall, CPU) seconds inside the hypervisor tool since the last call; see :meth:`tool_seconds`."""
        calls = [call for call in take_calls(self.tool_log) if caller is None or call.caller == caller]
        return sum(call.seconds for call in calls), sum(call.cpu for call in calls)

    def cleanup(self) -> None:
        """Delete every container left (force), reap their monitors."""
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.is_dir():
                    self.run("delete", "--force", entry.name, check=False)
        for pid in self.monitors.values():
            try:
                ExitWatch(pid).wait(10.0)
            except (ProcessLookupError, ChildProcessError, TimeoutError):
                pass  # already reaped by a suite, or stuck: the board teardown ends it
        self.monitors.clear()


@contextmanager
def sim_node(engine: str = "script", *, board: str = PLATFORM, platform: str = PLATFORM,
             base: Path | None = None) -> Iterator[Node]:
    """A running simulated board and a runphi node bound to it, torn down afterwards.

    ``board`` (simulator board name or file) and ``platform`` (runphi template
    name or file) must describe the same machine. ``base`` (removed afterwards)
    defaults to a fresh temporary directory.
    """
    runphi_binary()
    become_subreaper()
    base = base or Path(tempfile.mkdtemp(prefix="rphi-bench-", dir=scratch_dir()))
    try:
        with SimBoard.running(base / "sim", board=board, engine=engine) as sim:
            node = Node(sim, base, platform)
            try:
                yield node
            finally:
                node.cleanup()
    finally:
        shutil.rmtree(base, ignore_errors=True)
