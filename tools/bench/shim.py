"""shim: ``ctr run`` through runphi's own shim vs runc-CLI mode vs runc, runphi installed as users do.

    python -m tools.bench.shim [--quick]      (or: python -m tools.bench shim)

runphi is installed the way users install it: ``target/install.sh`` into a
prefix venv under the bench's scratch directory (a copy of the source tree,
``PYTHON`` = this interpreter), not the editable development venv, whose import
hook costs every process about 24 ms. One private containerd serves both ways
of running runphi from that prefix: its PATH starts with the prefix's bindir, so
``--runtime io.containerd.runphi.v2`` finds ``containerd-shim-runphi-v2`` there,
and runc-CLI mode gets ``--runc-binary <bindir>/runphi``. containerd gets the
simulated board's ``RUNPHI_*`` environment (the tool being the timing wrapper,
so time inside the simulator's ``jailhouse`` is measured and reported apart)
and no ``PYTHON*`` variable of the development shell.

Measured in interleaved rounds after a discarded warm-up:

* ``ctr run --rm`` of a ZIC (script guest: prints a line, powers off) in shim
  and in runc-CLI mode, with the time to the first byte on ctr's stdout;
* ``ctr run --rm`` of busybox ``echo`` through ``io.containerd.runc.v2`` and
  through ``io.containerd.runphi.v2`` (which hands it to runc's shim);
* the floors: ``python -c pass`` of the prefix's interpreter,
  ``containerd-shim-runphi-v2 -v`` (interpreter + argparse + runphi's import)
  and an import of the modules the shim's ``start`` imports.

Then, not part of the budgets' samples: a few runs through timing wrappers of
the prefix's shim and ``runphi`` and of runc's shim and ``runc``, counting the
processes containerd starts per ``ctr run`` in each mode and timing each call;
phase durations from ``ctr events`` timestamps; and one idle ZIC (``ctr run
-d``, guest prints once then halts) whose shim server's CPU and RSS are read
from /proc after a settle period, next to a bare trio loop sleeping the poll
interval and ``python -c "import trio, google.protobuf"``, both of the prefix's
interpreter. From these the report states the least each budgeted ratio could
be (:func:`floors`). Budgets (the shim issue): shim-mode ZIC own share <= 1.2x
and overall <= 2.5x the runc busybox run; busybox through runphi's runtime
<= 1.25x runc's; first console byte in shim mode <= 0.5x runc-CLI mode; idle
server <= 0.5 % CPU and <= the reference's RSS + 8 MiB. Afterwards no
container, no cell and no runphi process (the warm parent included) is left.
"""

from __future__ import annotations

import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .console import _cpu_seconds, _rss_mib
from .e2e import _containerd_fixture, _verb_seconds
from .harness import Budget, Check, Options, Series, SuiteResult, standalone
from .zic import Node, build_tool_wrapper, guest_script, sim_node, take_calls

if TYPE_CHECKING:
    from tools.testbed.containerd import EventLog, PrivateContainerd

OVERALL_BUDGET = 2.5
OWN_SHARE_BUDGET = 1.2
PLAIN_BUDGET = 1.25
FIRST_BYTE_BUDGET = 0.5
IDLE_CPU_BUDGET_PERCENT = 0.5
RSS_MARGIN_MIB = 8.0

SHIM = "containerd-shim-runphi-v2"
RUNC_RUNTIME = "io.containerd.runc.v2"
ZIC_LINE = b"hello from a ZIC"
BUSYBOX_LINE = b"hello from busybox"
IDLE_LINE = b"ready"
REPO = Path(__file__).resolve().parents[2]
#: What a copy of the source tree for pip leaves out (as tests/test_mkzic_target.py does).
NOT_COPIED = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache",
              "out")


# ---- installing runphi as users do --------------------------------------------------------------


class Installed(NamedTuple):
    """runphi as ``target/install.sh`` left it: the prefix venv, the bindir links, the config file."""

    prefix: Path
    bindir: Path
    config: Path

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"

    @property
    def runphi(self) -> Path:
        return self.bindir / "runphi"

    @property
    def shim(self) -> Path:
        return self.bindir / SHIM


def install_runphi(work: Path) -> Installed:
    """``sh target/install.sh`` of a copy of this tree into ``work`` (prefix, bindir, config all there)."""
    tree = work / "src"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    installed = Installed(work / "opt", work / "bin", work / "etc" / "runphi.toml")
    done = subprocess.run(["sh", str(tree / "target" / "install.sh"), str(tree)],
                          env={**user_env(), "RUNPHI_PREFIX": str(installed.prefix),
                               "RUNPHI_BINDIR": str(installed.bindir), "RUNPHI_CONFIG": str(installed.config),
                               "PYTHON": sys.executable},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not installed.shim.exists():
        raise RuntimeError(f"target/install.sh exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return installed


def user_env() -> dict[str, str]:
    """This process's environment without the development shell's ``PYTHON*`` variables
    (no bytecode cache prefix, no ``PYTHONDONTWRITEBYTECODE``: the prefix's own .pyc files are used)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}


def containerd_env(node: Node, installed: Installed) -> dict[str, str]:
    """containerd's environment: a user's, the board's ``RUNPHI_*``, the installed config, the bindir first on PATH."""
    env = user_env()
    env.update({key: value for key, value in node.env.items() if key.startswith("RUNPHI_")})
    env["RUNPHI_CONFIG"] = str(installed.config)
    env["PATH"] = f"{installed.bindir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


# ---- the bench: board, installation, containerd, ctr events ------------------------------------


class Bench(NamedTuple):
    """Everything one run of the suite drives."""

    node: Node
    installed: Installed
    daemon: PrivateContainerd
    events: EventLog
    zic_rootfs: Path
    busybox: Path
    #: Filled on the way out of :func:`bench`: processes still carrying the node's marker.
    left: list[str]

    @property
    def marker(self) -> str:
        """In the environment of every process started for this node (shims, warm parent, servers)."""
        return f"RUNPHI_STATE_DIR={self.node.env['RUNPHI_STATE_DIR']}"

    def shim_flags(self, runtime: str = "io.containerd.runphi.v2") -> list[str]:
        return ["--runtime", runtime, "--env", "PATH=/bin"]

    def cli_flags(self, runphi: Path | None = None) -> list[str]:
        return self.daemon.runtime_flags(runphi or self.installed.runphi)


@contextmanager
def bench() -> Iterator[Bench]:
    """A board, runphi installed into a prefix, containerd using it, ``ctr events`` recording.

    On the way out every task and container is removed, containerd stopped, and
    every process carrying the node's marker killed (the shim's warm parent);
    ``Bench.left`` then lists any that survived.
    """
    helpers = _containerd_fixture()
    with sim_node() as node:
        installed = install_runphi(node.base / "install")
        env = containerd_env(node, installed)
        daemon = helpers.PrivateContainerd(node.base / "ctd", installed.runphi, env=env)
        daemon.env = env  # exactly a user's environment, not layered over this process's
        events: EventLog | None = None
        left: list[str] = []
        daemon.start()
        try:
            events = helpers.EventLog(daemon, node.base / "events.log")
            zic = node.bundle("shim-zic", guest_script("print hello from a ZIC\\n", "shutdown")) / "rootfs"
            busybox = helpers.make_busybox_rootfs(node.base / "busybox")
            yield Bench(node, installed, daemon, events, zic, busybox, left)
        finally:
            try:
                if events is not None:
                    events.close()
                daemon.remove_leftovers()
            finally:
                daemon.stop()
                left[:] = stop_node_processes(f"RUNPHI_STATE_DIR={node.env['RUNPHI_STATE_DIR']}")


# ---- one ctr run --------------------------------------------------------------------------------


class Run(NamedTuple):
    """One ``ctr run --rm``: wall seconds to ctr's exit, and to the first byte on its stdout."""

    wall: float
    first_byte: float


def ctr_run(b: Bench, flags: list[str], rootfs: Path, cid: str, args: list[str], expected: bytes) -> Run:
    """``ctr run --rm FLAGS --rootfs ROOTFS CID ARGS``, timed from launch to the first stdout byte
    (read as it arrives) and to ctr's exit; it must exit 0 having printed ``expected``."""
    argv = b.daemon.ctr_argv("run", "--rm", *flags, "--rootfs", str(rootfs), cid, *args)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=b.daemon.env)
        try:
            fd = proc.stdout.fileno()
            if not select.select([fd], [], [], 120.0)[0]:
                raise TimeoutError(f"ctr run {cid}: no output within 120 s")
            output = os.read(fd, 65536)
            first = time.perf_counter() - start
            output += proc.stdout.read()  # to EOF: ctr has exited
            status = proc.wait(timeout=120)
            wall = time.perf_counter() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        if status != 0 or expected not in output:
            raise RuntimeError(f"ctr run {cid} exited {status} printing {output[:200]!r} (expected {expected!r}): "
                               f"{err.read().decode(errors='replace').strip()[-1000:]}")
    return Run(wall, first)


def timed_process(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one process run to completion (output discarded; it must exit 0)."""
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=60)
    return time.perf_counter() - start


# ---- the interleaved rounds ---------------------------------------------------------------------

ZIC_SHIM = "ZIC, shim mode"
ZIC_CLI = "ZIC, runc-CLI mode"
BUSYBOX_RUNC = "busybox echo, io.containerd.runc.v2"
BUSYBOX_RUNPHI = "busybox echo, io.containerd.runphi.v2"
PYTHON_PASS = "python -c pass"
SHIM_VERSION = "containerd-shim-runphi-v2 -v"
START_IMPORTS = "python -c 'import <shim start's modules>'"
#: What ``containerd-shim-runphi-v2 start`` imports on its way to answering for a ZIC.
START_MODULES = ("runphi.shim.main", "runphi.shim.bootstrap", "runphi.forward", "runphi.shim.mounts",
                 "runphi.shim.launch", "runphi.store")


def candidates(b: Bench) -> dict[str, Callable[[str], dict[str, float]]]:
    """What each round runs, in order: name -> (container id -> named samples of that run)."""
    zic_args, echo = ["/boot/boot.bin"], ["echo", BUSYBOX_LINE.decode()]
    env = b.daemon.env

    def zic(flags: list[str]) -> Callable[[str], dict[str, float]]:
        def one(cid: str) -> dict[str, float]:
            b.node.tool_seconds()  # empty the tool log
            run = ctr_run(b, flags, b.zic_rootfs, cid, zic_args, ZIC_LINE)
            return {"wall": run.wall, "first byte": run.first_byte, "tool": b.node.tool_seconds()}
        return one

    def busybox(flags: list[str]) -> Callable[[str], dict[str, float]]:
        return lambda cid: {"wall": ctr_run(b, flags, b.busybox, cid, echo, BUSYBOX_LINE).wall}

    return {
        ZIC_SHIM: zic(b.shim_flags()),
        ZIC_CLI: zic(b.cli_flags()),
        BUSYBOX_RUNC: busybox(b.shim_flags(RUNC_RUNTIME)),
        BUSYBOX_RUNPHI: busybox(b.shim_flags()),
        PYTHON_PASS: lambda cid: {"wall": timed_process([str(b.installed.python), "-c", "pass"], env)},
        SHIM_VERSION: lambda cid: {"wall": timed_process([str(b.installed.shim), "-v"], env)},
        START_IMPORTS: lambda cid: {"wall": timed_process([str(b.installed.python), "-c",
                                                           f"import {', '.join(START_MODULES)}"], env)},
    }


class Rounds(NamedTuple):
    """Samples of the measured rounds: (candidate, quantity) -> values; candidate -> its container ids."""

    samples: dict[tuple[str, str], list[float]]
    cids: dict[str, list[str]]

    def series(self, candidate: str, quantity: str = "wall", label: str | None = None) -> Series:
        return Series(label or candidate, tuple(self.samples[candidate, quantity]))


def interleave(b: Bench, runs: int, warmup: int) -> Rounds:
    """Every candidate once per round, ``warmup + runs`` rounds; the warm-up rounds are discarded
    (they start the shim's warm parent and fill the page cache)."""
    rounds, measures = Rounds({}, {}), candidates(b)
    for number in range(warmup + runs):
        for index, (name, measure) in enumerate(measures.items()):
            cid = f"bench-shim-{number}-{index}"
            measured = measure(cid)
            if number < warmup:
                continue
            rounds.cids.setdefault(name, []).append(cid)
            for quantity, value in measured.items():
                rounds.samples.setdefault((name, quantity), []).append(value)
    return rounds


# ---- where the time goes: ctr events, the processes containerd starts ----------------------------

#: (from topic, to topic, label): consecutive events of one ``ctr run --rm``.
PHASES = (("/containers/create", "/tasks/create", "task create (shim start + Create)"),
          ("/tasks/create", "/tasks/start", "task start"),
          ("/tasks/start", "/tasks/exit", "run until exit seen"),
          ("/tasks/exit", "/tasks/delete", "task delete"),
          ("/tasks/delete", "/containers/delete", "shim cleanup until container delete"))


def event_times(path: Path) -> dict[str, dict[str, float]]:
    """container id -> topic -> its first event's timestamp (seconds), from a ``ctr events`` file."""
    import json

    times: dict[str, dict[str, float]] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(" ", 6)  # date time +0000 UTC namespace topic payload
        if len(parts) < 7 or not parts[5].startswith("/"):
            continue
        try:
            payload = json.loads(parts[6])
            whole, _, fraction = parts[1].partition(".")
            stamp = datetime.fromisoformat(f"{parts[0]}T{whole}").timestamp() + float(f"0.{fraction or 0}")
        except ValueError:  # the last line, still being written
            continue
        cid = payload.get("container_id") or payload.get("id")
        times.setdefault(cid, {}).setdefault(parts[5], stamp)
    return times


def phase_medians(times: dict[str, dict[str, float]], cids: list[str], walls: list[float]) -> dict[str, float]:
    """Median seconds of each :data:`PHASES` step over ``cids``, plus ctr's time outside them
    (its wall time minus container create -> container delete)."""
    medians = {}
    for first, second, label in PHASES:
        values = [times[c][second] - times[c][first] for c in cids if first in times.get(c, {})
                  and second in times.get(c, {})]
        if values:
            medians[label] = statistics.median(values)
    spans = [wall - (times[c]["/containers/delete"] - times[c]["/containers/create"])
             for c, wall in zip(cids, walls) if {"/containers/create", "/containers/delete"} <= set(times.get(c, {}))]
    if spans:
        medians["ctr outside containerd"] = statistics.median(spans)
    return medians


class Calls(NamedTuple):
    """The calls of one binary containerd made for one ``ctr run --rm`` (seen through a timing
    wrapper): median count, median total wall seconds, per verb the median (calls, seconds)."""

    processes: float
    seconds: float
    verbs: dict[str, tuple[float, float]]

    def describe(self) -> str:
        return ", ".join(f"{verb}{f' x{calls:g}' if calls != 1 else ''} {seconds * 1e3:.0f} ms"
                         for verb, (calls, seconds) in self.verbs.items())


def _summary(per_run: list[list]) -> Calls:
    verbs = {}
    for verb in _verb_seconds([call for calls in per_run for call in calls]):
        counts = [sum(1 for call in calls if verb in call.args) for calls in per_run]
        seconds = [_verb_seconds(calls).get(verb, 0.0) for calls in per_run]
        verbs[verb] = (statistics.median(counts), statistics.median(seconds))
    return Calls(statistics.median(len(calls) for calls in per_run),
                 statistics.median(sum(call.seconds for call in calls) for calls in per_run), verbs)


#: Kinds of the counted runs that are not timed-round candidates: runc's shim and runc, wrapped.
RUNC_SHIM_CALLS = "busybox echo: containerd-shim-runc-v2 calls"
RUNC_CALLS = "busybox echo: runc calls"


def process_calls(b: Bench, runs: int) -> dict[str, Calls]:
    """Per kind of run, the processes containerd starts for one ``ctr run --rm`` and their wall times:
    the prefix's shim and runphi (each call a Python process), and for the runc reference runc's
    shim and runc (Go).

    Extra runs, not part of the timed rounds: containerd reaches each binary through a timing
    wrapper (``--runtime /path/to/wrapper``, ``--runc-binary /path/to/wrapper``) that logs every call.
    """
    runc_shim_path, runc_path = shutil.which("containerd-shim-runc-v2"), shutil.which("runc")
    if runc_shim_path is None or runc_path is None:
        raise RuntimeError("containerd-shim-runc-v2 or runc vanished from PATH")
    view = b.node.base / "process-calls"
    view.mkdir()
    shim, shim_log = build_tool_wrapper(b.installed.prefix / "bin" / SHIM, view, SHIM)
    runphi, runphi_log = build_tool_wrapper(b.installed.prefix / "bin" / "runphi", view, "runphi")
    runc_shim, runc_shim_log = build_tool_wrapper(Path(runc_shim_path), view, "containerd-shim-runc-v2")
    runc, runc_log = build_tool_wrapper(Path(runc_path), view, "runc")
    zic, echo = (b.zic_rootfs, ["/boot/boot.bin"], ZIC_LINE), (b.busybox, ["echo", BUSYBOX_LINE.decode()], BUSYBOX_LINE)
    kinds = {ZIC_SHIM: (b.shim_flags(str(shim)), zic, shim_log),
             ZIC_CLI: (b.cli_flags(runphi), zic, runphi_log),
             BUSYBOX_RUNPHI: (b.shim_flags(str(shim)), echo, shim_log),
             RUNC_SHIM_CALLS: (b.shim_flags(str(runc_shim)), echo, runc_shim_log),
             RUNC_CALLS: (b.cli_flags(runc), echo, runc_log)}
    calls: dict[str, list[list]] = {name: [] for name in kinds}
    for number in range(runs):
        for index, (name, (flags, (rootfs, args, expected), log)) in enumerate(kinds.items()):
            take_calls(log)
            ctr_run(b, flags, rootfs, f"bench-shim-count-{number}-{index}", args, expected)
            calls[name].append(take_calls(log))
    return {name: _summary(per_run) for name, per_run in calls.items()}


# ---- the idle shim server -----------------------------------------------------------------------


class Idle(NamedTuple):
    """An idle ZIC's shim server: own CPU and its tools' CPU (shares of one CPU), memory, identity;
    and, over the same window, the CPU of a bare trio loop waking up at the same poll interval."""

    own_cpu: float
    tools_cpu: float
    poller_cpu: float
    #: The same two shares from the scheduler's nanosecond run times (/proc/<pid>/task/*/schedstat),
    #: where utime + stime count whole clock ticks.
    own_cpu_ns: float
    poller_cpu_ns: float
    rss_mib: float
    pss_mib: float
    printed: bool
    cmdline: str


def task_pid(b: Bench, cid: str) -> int:
    """The task's pid as ``ctr task ls`` shows it (in shim mode: the shim server's)."""
    for row in b.daemon.ctr("task", "ls", timeout=60).stdout.decode().splitlines()[1:]:
        fields = row.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise RuntimeError(f"ctr task ls shows no task {cid}")


def _pss_mib(pid: int) -> float:
    """Proportional set size: pages shared with the warm parent it was forked from count in part."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def poll_interval(b: Bench) -> float:
    """The installed configuration's ``[jailhouse] poll_interval_ms``, in seconds."""
    import tomllib

    with open(b.installed.config, "rb") as config:
        return tomllib.load(config).get("jailhouse", {}).get("poll_interval_ms", 50) / 1000


def _run_ns(pid: int) -> int:
    """Nanoseconds every thread of ``pid`` has run on a CPU (first field of each task's schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total


def cpu_over(pids: list[int], settle: float, window: float) -> list[tuple[float, float, float]]:
    """(own, reaped children's, own from schedstat) CPU share of each process over ``window``
    seconds, after ``settle`` seconds (both measurement windows, not synchronisation)."""
    time.sleep(settle)  # let start-up work (imports, first polls) finish before the window
    before = [(*_cpu_seconds(pid), _run_ns(pid) / 1e9) for pid in pids]
    start = time.perf_counter()
    time.sleep(window)  # the measurement window itself
    after = [(*_cpu_seconds(pid), _run_ns(pid) / 1e9) for pid in pids]
    elapsed = time.perf_counter() - start
    return [tuple((x - y) / elapsed for x, y in zip(a, b)) for a, b in zip(after, before)]


def idle_shim(b: Bench, settle: float, window: float) -> Idle:
    """``ctr run -d`` of a ZIC that prints once then halts; its shim server's CPU over ``window``
    after ``settle`` seconds, next to a bare trio loop sleeping the poll interval (same interpreter)."""
    cid = "bench-shim-idle"
    rootfs = b.node.bundle("shim-idle", guest_script("print ready\\n", "halt")) / "rootfs"
    console = b.node.base / "idle-console.log"
    started = b.daemon.ctr("run", "-d", *b.shim_flags(), "--log-uri", f"file://{console}", "--rootfs", str(rootfs),
                           cid, "/boot/boot.bin", timeout=120)
    if started.returncode != 0:
        raise RuntimeError(f"ctr run -d {cid} exited {started.returncode}: {started.stderr.decode().strip()}")
    loop = (f"import trio\nasync def main():\n    while True:\n        await trio.sleep({poll_interval(b)})\n"
            "trio.run(main)")
    poller = subprocess.Popen([str(b.installed.python), "-c", loop], stdin=subprocess.DEVNULL, env=b.daemon.env)
    try:
        pid = task_pid(b, cid)
        (own, tools, own_ns), (poller_cpu, _, poller_ns) = cpu_over([pid, poller.pid], settle, window)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        return Idle(own, tools, poller_cpu, own_ns, poller_ns, _rss_mib(pid), _pss_mib(pid),
                    IDLE_LINE in console.read_bytes(), cmdline)
    finally:
        poller.kill()
        poller.wait()
        b.daemon.ctr("task", "rm", "--force", cid, timeout=60)
        b.daemon.ctr("containers", "rm", cid, timeout=60)


def reference_rss_mib(b: Bench) -> float:
    """VmRSS of ``python -c "import trio, google.protobuf"`` (the prefix's interpreter) blocked on stdin."""
    code = "import sys, trio, google.protobuf\nprint('ready', flush=True)\nsys.stdin.read()"
    proc = subprocess.Popen([str(b.installed.python), "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=b.daemon.env)
    try:
        if proc.stdout.readline() != b"ready\n":  # its imports are done
            raise RuntimeError("the RSS reference process did not start")
        return _rss_mib(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()


def warm_parent_rss_mib(b: Bench) -> float | None:
    """VmRSS of the node's warm parent (one per node, resident by design), None when none runs."""
    from tools.testbed.containerd import WARM_PARENT, processes_with_env

    for line in processes_with_env(b.marker, exclude={os.getpid()}):
        if WARM_PARENT in line:
            return _rss_mib(int(line.split()[0]))
    return None


def stop_node_processes(marker: str) -> list[str]:
    """SIGKILL every process carrying ``marker`` (the warm parent, stray servers), wait for each to
    exit (pidfd), reap those adopted by this subreaper, remove the killed warm parent's socket
    (it removes it itself only when it exits idle); return what still carries the marker."""
    from tools.testbed.containerd import WARM_PARENT, kill_processes_with_env, processes_with_env

    found = processes_with_env(marker, exclude={os.getpid()})
    pids = [int(line.split()[0]) for line in found]
    sockets = [line.split()[-1] for line in found if WARM_PARENT in line]
    watches = []
    for pid in pids:
        try:
            watches.append((pid, os.pidfd_open(pid)))
        except ProcessLookupError:
            pass
    kill_processes_with_env(marker)
    for pid, fd in watches:
        try:
            select.select([fd], [], [], 10.0)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not ours to reap: its parent does
        finally:
            os.close(fd)
    for path in sockets:
        Path(path).unlink(missing_ok=True)
    return processes_with_env(marker, exclude={os.getpid()})


# ---- the suite ----------------------------------------------------------------------------------


class Measured(NamedTuple):
    """Everything one run of the suite measured, before it is turned into series and budgets."""

    rounds: Rounds
    calls: dict[str, Calls]
    idle: Idle
    reference_rss: float
    warm_rss: float | None
    times: dict[str, dict[str, float]]
    poll: float


def idle_window(options: Options) -> float:
    """Seconds the idle server's CPU is measured over (100 clock ticks a second: 0.2 % resolution at 5 s)."""
    return 1.0 if options.quick else 5.0


def leftovers(b: Bench) -> list[Check]:
    """Nothing of the runs may be left: no container in containerd, no cell on the board."""
    containers = b.daemon.ctr("containers", "list", "--quiet", timeout=60).stdout.split()
    cells = [p.name for p in b.node.sim.sysfs_path("cells").iterdir() if p.name != "0"]
    return [Check("nothing left in containerd after the runs", not containers, f"{len(containers)} containers left"),
            Check("no cell left on the board", not cells, f"cells {cells}")]


def run(options: Options) -> SuiteResult:
    result = SuiteResult("shim")
    with bench() as b:
        rounds = interleave(b, options.count(10, 1), options.warmup)
        calls = process_calls(b, options.count(3, 1))
        idle = idle_shim(b, settle=0.5 if options.quick else 2.0, window=idle_window(options))
        measured = Measured(rounds, calls, idle, reference_rss_mib(b), warm_parent_rss_mib(b),
                            event_times(b.events.path), poll_interval(b))
        result.checks += leftovers(b)
        prefix = str(b.installed.prefix)
    result.checks += [
        Check("idle guest printed before the window", idle.printed, "its console log holds 'ready'"),
        Check("the shim server runs the installed runphi", prefix in idle.cmdline, idle.cmdline),
        Check("no runphi process left after cleanup (warm parent, servers)", not b.left, "; ".join(b.left)),
    ]
    report(result, measured, options)
    return result


def report(result: SuiteResult, m: Measured, options: Options) -> None:
    """Series, info lines (where the time goes, the floors) and budgets from what :func:`run` measured."""
    r = m.rounds
    zic = {mode: zic_series(result, r, mode) for mode in (ZIC_SHIM, ZIC_CLI)}
    runc = result.add(r.series(BUSYBOX_RUNC, label=f"ctr run --rm {BUSYBOX_RUNC}"))
    plain = result.add(r.series(BUSYBOX_RUNPHI, label=f"ctr run --rm {BUSYBOX_RUNPHI}"))
    floor = result.add(r.series(PYTHON_PASS, label=f"{PYTHON_PASS} (prefix interpreter)"))
    result.add(r.series(SHIM_VERSION))
    result.add(r.series(START_IMPORTS))
    for name, calls in m.calls.items():
        result.info[f"processes per ctr run, {name}"] = f"{calls.processes:g}: {calls.describe()}"
    for name in (ZIC_SHIM, ZIC_CLI, BUSYBOX_RUNC, BUSYBOX_RUNPHI):
        phases = phase_medians(m.times, r.cids[name], r.samples[name, "wall"])
        result.info[f"phases (ctr events, medians), {name}"] = " | ".join(
            f"{label} {seconds * 1e3:.0f} ms" for label, seconds in phases.items())
    (shim_wall, shim_own, shim_first), (cli_wall, cli_own, cli_first) = zic[ZIC_SHIM], zic[ZIC_CLI]
    result.info["ZIC, runc-CLI mode / runc busybox"] = (
        f"overall {cli_wall.median / runc.median:.2f}x, own share {cli_own.median / runc.median:.2f}x")
    result.info.update(floors(m, runc, floor, r.series(SHIM_VERSION), shim_first, cli_first))
    result.info["idle shim server"] = (
        f"own CPU {m.idle.own_cpu * 100:.2f} % (schedstat {m.idle.own_cpu_ns * 100:.3f} %); a bare trio loop "
        f"sleeping {m.poll * 1e3:g} ms, same window: {m.idle.poller_cpu * 100:.2f} % (schedstat "
        f"{m.idle.poller_cpu_ns * 100:.3f} %); its tools' CPU {m.idle.tools_cpu * 100:.2f} % (hypervisor probe); "
        f"RSS {m.idle.rss_mib:.1f} MiB (PSS {m.idle.pss_mib:.1f} MiB: pages shared with the warm parent count "
        f"in part); warm parent RSS " + (f"{m.warm_rss:.1f} MiB" if m.warm_rss is not None else "- (none)"))
    result.budgets += budgets(m, options, runc, plain, shim_wall, shim_own, shim_first, cli_first)


def floors(m: Measured, runc: Series, floor: Series, version: Series, shim_first: Series,
           cli_first: Series) -> dict[str, str]:
    """The least each budgeted quantity could be, from what was measured in the same run.

    ``fixed``: the runc run minus what runc's shim and runc took (containerd's and
    ctr's own work, which a ZIC pays as well); each Python process costs at
    least ``python -c pass`` (and a shim entry point that parses its flags with
    argparse and imports runphi at least ``-v``); a guest's self-shutdown is seen
    at least one poll interval after it happened (it is confirmed by a second poll).
    """
    calls = m.calls
    fixed = runc.median - calls[RUNC_SHIM_CALLS].seconds - calls[RUNC_CALLS].seconds
    count = calls[ZIC_SHIM].processes
    start_call = calls[ZIC_SHIM].verbs.get("start", (0, 0.0))[1]
    bare_start = shim_first.median - start_call + floor.median
    lines = {"containerd + ctr fixed cost (runc run minus runc's shim and runc)": f"{fixed * 1e3:.0f} ms"}
    for per_start, label in ((floor, "python -c pass"), (version, "-v")):
        least = fixed + count * per_start.median + m.poll
        lines[f"least own share, shim mode: fixed + Python starts x {label} + one poll interval"] = (
            f"{fixed * 1e3:.0f} + {count:g} x {per_start.median * 1e3:.0f} + {m.poll * 1e3:g} = "
            f"{least * 1e3:.0f} ms = {least / runc.median:.2f}x the runc run")
    return lines | {
        "least busybox through runphi's runtime: runc run + Python starts x python -c pass": (
            f"{(runc.median + calls[BUSYBOX_RUNPHI].processes * floor.median) / runc.median:.2f}x the runc run"),
        "first byte, shim mode, if start cost only python -c pass": (
            f"{bare_start * 1e3:.0f} ms = {bare_start / cli_first.median:.2f}x runc-CLI mode "
            f"(start took {start_call * 1e3:.0f} ms)"),
    }


def budgets(m: Measured, options: Options, runc: Series, plain: Series, shim_wall: Series, shim_own: Series,
            shim_first: Series, cli_first: Series) -> list[Budget]:
    """The shim issue's budgets."""
    return [
        Budget("ZIC shim mode / runc busybox, overall", shim_wall.median / runc.median, OVERALL_BUDGET, "<=", "x"),
        Budget("ZIC shim mode: runphi's own share / runc busybox", shim_own.median / runc.median, OWN_SHARE_BUDGET,
               "<=", "x", "simulator tool time excluded"),
        Budget("busybox: io.containerd.runphi.v2 / io.containerd.runc.v2", plain.median / runc.median, PLAIN_BUDGET,
               "<=", "x"),
        Budget("create -> first console byte, shim / runc-CLI mode", shim_first.median / cli_first.median,
               FIRST_BYTE_BUDGET, "<=", "x"),
        Budget("idle shim server CPU (own)", m.idle.own_cpu * 100, IDLE_CPU_BUDGET_PERCENT, "<=", "%",
               f"over {idle_window(options):g} s"),
        Budget("idle shim server RSS", m.idle.rss_mib, m.reference_rss + RSS_MARGIN_MIB, "<=", "MiB",
               f"python -c 'import trio, google.protobuf' {m.reference_rss:.1f} MiB + {RSS_MARGIN_MIB:g}"),
    ]


def zic_series(result: SuiteResult, r: Rounds, mode: str) -> tuple[Series, Series, Series]:
    """Add the series of one mode's ZIC runs; return (wall, own share, first byte)."""
    wall = result.add(r.series(mode, label=f"ctr run --rm {mode}"))
    tool = r.samples[mode, "tool"]
    result.add(Series("  of which in the simulator's jailhouse tool", tuple(tool)))
    own = result.add(Series("  runphi's own share (minus tool)", tuple(w - t for w, t in zip(wall.samples, tool))))
    first = result.add(Series("  launch -> first stdout byte", tuple(r.samples[mode, "first byte"])))
    return wall, own, first


if __name__ == "__main__":
    sys.exit(standalone("shim", run))
