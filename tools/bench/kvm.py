"""kvm: the KVM backend (a ZIC as a ``qemu-system-aarch64`` VM; TCG on an x86 host) against its floors.

    python -m tools.bench.kvm [--quick]      (or: python -m tools.bench kvm)

Three parts, measured in one run on this machine; within a part the candidates
alternate round by round after a discarded warm-up:

* **backend path**: from calling ``launch`` of the KVM backend for the ``hello``
  inmate's ZIC (the image's boot description, the node ledger, the cell's
  directory and VM plan, the console socket pair, QEMU started paused as this
  process's child, the QMP handshake) through ``start_cell`` (QMP ``cont``) to the
  first byte read from the cell's console socket; next to the floor the ``qemu``
  suite measures (:func:`~tools.bench.qemu_first_byte.bare_qemu_first_byte`: the
  same inmate under a bare ``qemu-system-aarch64 -serial stdio``, launch to first
  byte). The cell is destroyed after each round, outside the timed part. Budget:
  median ratio <= 1.5x.
* **ctr run, KVM vs simulator**: ``ctr run --rm`` of the same hello ZIC through
  runphi's own shim (``io.containerd.runphi.v2``) on two private containerds
  (:func:`tools.testbed.containerd.running_zic_node`), one whose runphi runs ZICs
  as VMs (backend ``kvm``), one driving the Jailhouse simulator with its QEMU
  engine; runphi installed by ``target/install.sh`` as the ``shim`` suite installs
  it, both nodes polling their cells every 20 ms. Also timed: ctr's first stdout
  byte. Budget: KVM median <= simulator median.
* **concurrent launches**: 8 ``runphi create`` of the ``ticker`` inmate (one vCPU
  each) started at once against one state root and node, then ``runphi start`` of
  those created. The KVM backend lends each vCPU a host CPU of its own and this
  host lends the CPUs this process may run on, so exactly ``min(8, CPUs)`` must be
  created and every other create refused with the ledger's one line (``... CPU(s)
  requested, 0 free ...``), leaving nothing behind. Every running VM's vCPU
  threads must be allowed on exactly the host CPU its ``vm.json`` names, which
  must be the ledger's. Then ``delete --force`` of all of them: the ledger, the
  cells and the state root must be empty. Checks, not timings (the batch wall
  times are reported).
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from tools.inmates import build as inmates
from tools.jailhouse_sim.engines.qemu import DEFAULT_BINARY

from .e2e import _containerd_fixture
from .harness import Budget, Check, Options, Series, Skip, SuiteResult, ratio, standalone
from .qemu_first_byte import bare_qemu_first_byte
from .shim import REPO, Installed, ctr_run, install_runphi, stop_node_processes, user_env
from .zic import ExitWatch, become_subreaper, scratch_dir

if TYPE_CHECKING:
    from runphi.backends.base import Backend
    from runphi.oci import Config
    from tools.testbed.containerd import PrivateContainerd, ZicNode

    from .shim import Bench

PATH_BUDGET = 1.5
CTR_BUDGET = 1.0
CONCURRENT = 8
POLL_MS = 20
GUEST_TIMEOUT = 30.0  # seconds; a hello or a tick that takes longer is broken, not slow
HELLO_LINE = b"Hello from runphi inmate hello"
REFUSAL = "CPU(s) requested, 0 free"
KVM, SIM = "KVM backend", "simulator (QEMU engine)"


def require() -> None:
    """Skip with the reason when QEMU, the inmates' cross compiler or containerd is missing."""
    if shutil.which(DEFAULT_BINARY) is None:
        raise Skip(f"{DEFAULT_BINARY} is not installed")
    reason = inmates.missing_tools()
    if reason:
        raise Skip(f"cannot build the inmates: {reason}")
    _containerd_fixture()


def make_bundle(inmate: Path, bundle: Path) -> Path:
    """A ZIC bundle of ``inmate`` made by ``python -m tools.mkzic`` (bare metal, 16 MiB at the link address)."""
    done = subprocess.run([sys.executable, "-m", "tools.mkzic", "--inmate", str(inmate), "--os-var", "baremetal",
                           "--starting-vaddress", f"{inmates.LOAD_ADDRESS:#x}", "--memory", "16",
                           "--bundle", str(bundle)],
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"mkzic exited {done.returncode}: {done.stderr.strip()[-1000:]}")
    return bundle


def kvm_node_env(base: Path) -> dict[str, str]:
    """A user's environment plus the test bed's KVM ``RUNPHI_*`` (config, state dir) under ``base``."""
    from tools.testbed.containerd import kvm_env

    base.mkdir(parents=True, exist_ok=True)
    return {**user_env(), **kvm_env(base)}


def ledger_allocations(state_dir: Path) -> dict[str, Any]:
    """The node ledger's allocations (container id -> allocation), empty when there is no ledger."""
    from runphi.backends.ledger import LEDGER_NAME

    path = state_dir / LEDGER_NAME
    return json.loads(path.read_text())["allocations"] if path.exists() else {}


def kvm_cells(state_dir: Path) -> list[str]:
    """The KVM cells on the node (directories under ``<state_dir>/kvm-cells``)."""
    cells = state_dir / "kvm-cells"
    return sorted(p.name for p in cells.iterdir()) if cells.is_dir() else []


# ---- 1. the backend path ------------------------------------------------------------------------


def backend_first_byte(backend: Backend, bundle: Path, config: Config, cid: str, container_dir: Path) -> float:
    """Seconds from ``launch`` (then ``start_cell``) to the first byte on the console socket; the cell
    is destroyed afterwards, untimed. The bytes read must begin the hello inmate's banner."""
    from runphi.backends.base import LaunchRequest

    container_dir.mkdir(parents=True)
    request = LaunchRequest(container_id=cid, bundle=str(bundle), rootfs=str(config.rootfs(bundle)),
                            container_dir=str(container_dir), config=config)
    start = time.perf_counter()
    launched = backend.launch(request)
    try:
        backend.start_cell(launched.cell.cell_name)
        if not select.select([launched.console_fd], [], [], GUEST_TIMEOUT)[0]:
            raise TimeoutError(f"{cid}: no console byte within {GUEST_TIMEOUT:g} s")
        first = os.read(launched.console_fd, 4096)
        elapsed = time.perf_counter() - start
    finally:
        os.close(launched.console_fd)
        backend.destroy_cell(launched.cell.cell_name)
    if not first or first[:len(HELLO_LINE)] != HELLO_LINE[:len(first)]:
        raise RuntimeError(f"{cid}: the console began with {first[:80]!r}, not {HELLO_LINE!r}")
    return elapsed


def backend_path(base: Path, options: Options, result: SuiteResult) -> tuple[Series, Series]:
    """Alternating rounds: the backend's launch -> first byte, then bare QEMU's; (backend, floor) series."""
    from runphi.backends.registry import open_backend
    from runphi.config import load_runtime_config
    from runphi.oci import load_config

    image = inmates.image_path("hello")
    bundle = make_bundle(image, base / "hello")
    direct = base / "direct"
    warnings: list[str] = []
    backend = open_backend(load_runtime_config(kvm_node_env(direct)), warnings.append)
    config = load_config(bundle)
    path, floor = [], []
    for i in range(options.warmup + options.count(10, 1)):
        seconds = backend_first_byte(backend, bundle, config, f"bench-kvm-path-{i}", direct / "containers" / str(i))
        bare = bare_qemu_first_byte(str(image))
        if i >= options.warmup:
            path.append(seconds)
            floor.append(bare)
    state = direct / "node"
    left = kvm_cells(state), ledger_allocations(state)
    result.checks.append(Check("backend path: no cell and no ledger entry left after the destroys, no warning",
                               not any(left) and not warnings,
                               f"cells {left[0]}, ledger {sorted(left[1])}, warnings {warnings}"))
    return (result.add(Series("backend: launch + start_cell -> first console byte", tuple(path))),
            result.add(Series("bare QEMU: launch -> first byte (floor)", tuple(floor))))


# ---- 2. ctr run --rm, KVM vs simulator ----------------------------------------------------------


class _Target(NamedTuple):
    """What :func:`tools.bench.shim.ctr_run` reads of its ``Bench``: the containerd."""

    daemon: PrivateContainerd


@contextmanager
def zic_nodes(installed: Installed, base: Path) -> Iterator[dict[str, ZicNode]]:
    """Two private containerds in shim mode on the installed runphi: KVM, and the simulator (QEMU
    engine) configured to poll as often as the KVM node does (the test bed's ``kvm_env``)."""
    from tools.testbed.containerd import running_zic_node

    sim_config = base / "sim-runphi.toml"
    sim_config.write_text(f'backend = "jailhouse"\n\n[jailhouse]\npoll_interval_ms = {POLL_MS}\n')
    with running_zic_node(installed.runphi, mode="shim", prefix="rphi-bk-", backend="kvm") as kvm:
        with running_zic_node(installed.runphi, mode="shim", prefix="rphi-bs-",
                              env={"RUNPHI_CONFIG": str(sim_config)}) as sim:
            yield {KVM: kvm, SIM: sim}


def ctr_rounds(nodes: dict[str, ZicNode], rootfs: Path, options: Options) -> dict[tuple[str, str], list[float]]:
    """Alternating ``ctr run --rm`` of the hello ZIC on each node: samples by (node, "wall" | "first byte")."""
    samples: dict[tuple[str, str], list[float]] = {(name, what): [] for name in nodes
                                                   for what in ("wall", "first byte")}
    for i in range(options.warmup + options.count(10, 1)):
        for index, (name, node) in enumerate(nodes.items()):
            done = ctr_run(cast("Bench", _Target(node.containerd)), node.zic_flags(), rootfs,
                           f"bench-kvm-ctr-{index}-{i}", ["/boot/hello.bin"], HELLO_LINE)
            if i >= options.warmup:
                samples[name, "wall"].append(done.wall)
                samples[name, "first byte"].append(done.first_byte)
    return samples


def node_leftovers(name: str, node: ZicNode) -> Check:
    """Nothing of the runs left on a node: no container, no cell, no ledger entry, no runphi process."""
    containers = node.containerd.ctr("containers", "list", "--quiet", timeout=60).stdout.split()
    cells, held = node.cells(), node.ledger()
    processes = stop_node_processes(f"RUNPHI_STATE_DIR={node.base / 'node'}")
    problems = containers or cells or held or processes
    return Check(f"{name}: nothing left (containers, cells, ledger, runphi processes)", not problems,
                 f"{len(containers)} containers, cells {sorted(cells)}, ledger {sorted(held)}, processes {processes}"
                 if problems else "")


def ctr_comparison(installed: Installed, base: Path, options: Options, result: SuiteResult) -> tuple[Series, Series]:
    """``ctr run --rm`` of the hello ZIC in shim mode on both nodes; (KVM, simulator) wall series."""
    rootfs = make_bundle(inmates.image_path("hello"), base / "ctr-hello") / "rootfs"
    with zic_nodes(installed, base) as nodes:
        samples = ctr_rounds(nodes, rootfs, options)
        result.checks += [node_leftovers(name, node) for name, node in nodes.items()]
    walls, firsts = {}, {}
    for name in (KVM, SIM):
        walls[name] = result.add(Series(f"ctr run --rm hello, shim mode, {name}", tuple(samples[name, "wall"])))
        firsts[name] = result.add(Series("  launch -> first stdout byte", tuple(samples[name, "first byte"])))
    result.info["ctr run --rm, first stdout byte, KVM / simulator"] = f"{ratio(firsts[KVM], firsts[SIM]):.2f}x"
    return walls[KVM], walls[SIM]


# ---- 3. concurrent launches ---------------------------------------------------------------------


def at_once(argvs: dict[str, list[str]], env: dict[str, str],
            stdout: dict[str, Path] | None = None) -> tuple[float, dict[str, tuple[int, str]]]:
    """Start every argv at once (stdout to its file, else nowhere), wait for all: (wall seconds,
    key -> (exit status, stderr))."""
    start = time.perf_counter()
    running = {}
    for key, argv in argvs.items():
        out = open(stdout[key], "wb") if stdout else None
        err = tempfile.TemporaryFile()
        running[key] = (subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL if out is None
                                         else out, stderr=err, env=env), err)
        if out is not None:
            out.close()  # the process (and the monitor it forks) holds its own copy
    done = {}
    for key, (process, err) in running.items():
        with err:
            status = process.wait(timeout=300)
            err.seek(0)
            done[key] = (status, err.read().decode(errors="replace").strip())
    return time.perf_counter() - start, done


def allowed_cpus(pid: int, tid: int) -> str:
    """``Cpus_allowed_list`` of one thread of ``pid``, as the kernel reports it."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"no Cpus_allowed_list for thread {tid} of {pid}")


def misplaced(state_dir: Path, cell: str, ledger_cpus: list[int]) -> list[str]:
    """What is wrong with where the cell's vCPU threads may run: each must be allowed on exactly the
    host CPU ``vm.json`` gives its vCPU, and those must be the ledger's CPUs. Empty: all pinned."""
    directory = state_dir / "kvm-cells" / cell
    status = json.loads((directory / "status.json").read_text())
    plan_cpus = json.loads((directory / "vm.json").read_text())["vcpu_host_cpus"]
    wrong = []
    if status.get("phase") != "up" or len(status.get("vcpu_threads", [])) != len(plan_cpus):
        wrong.append(f"{cell}: phase {status.get('phase')}, threads {status.get('vcpu_threads')}, plan {plan_cpus}")
    if sorted(plan_cpus) != sorted(ledger_cpus):
        wrong.append(f"{cell}: vm.json CPUs {plan_cpus}, ledger {ledger_cpus}")
    for tid, cpu in zip(status.get("vcpu_threads", []), plan_cpus):
        allowed = allowed_cpus(status["pid"], tid)
        if allowed != str(cpu):
            wrong.append(f"{cell}: vCPU thread {tid} allowed on {allowed}, not {cpu}")
    return wrong


def wait_for_ticks(consoles: list[Path]) -> list[str]:
    """Wait (against a deadline, on the console files the monitors write) until every ticker
    printed ``tick 1`` (the inmates end lines with CR LF); the names of those that did not."""
    deadline = time.monotonic() + GUEST_TIMEOUT
    while True:
        silent = [path.stem for path in consoles if b"tick 1\r\n" not in path.read_bytes()]
        if not silent or time.monotonic() > deadline:
            return silent
        time.sleep(0.05)


class Batch(NamedTuple):
    """One concurrent launch under ``work`` (the node's state dir ``node/``, the state root ``root/``,
    pid and console files): what was created, what was refused, each verb's batch wall time."""

    work: Path
    lent: int
    created: list[str]
    refused: dict[str, tuple[int, str]]
    walls: dict[str, float]

    @property
    def state(self) -> Path:
        return self.work / "node"  # where the test bed's kvm_env puts RUNPHI_STATE_DIR

    @property
    def root(self) -> Path:
        return self.work / "root"

    def argv(self, runphi: Path, *args: str) -> list[str]:
        return [str(runphi), "--root", str(self.root), *args]


def launch_batch(runphi: Path, bundle: Path, work: Path, env: dict[str, str]) -> Batch:
    """``CONCURRENT`` creates at once, each its own id (console of each to its file in ``work``)."""
    batch = Batch(work, len(os.sched_getaffinity(0)), [], {}, {})
    ids = [f"bench-kvm-many-{n}" for n in range(CONCURRENT)]
    wall, done = at_once({cid: batch.argv(runphi, "create", "--bundle", str(bundle), "--pid-file",
                                          str(work / f"{cid}.pid"), cid) for cid in ids},
                         env, {cid: work / f"{cid}.console" for cid in ids})
    batch.created.extend(cid for cid in ids if done[cid][0] == 0)
    batch.refused.update({cid: outcome for cid, outcome in done.items() if outcome[0] != 0})
    batch.walls["create"] = wall
    return batch


def refusal_checks(batch: Batch) -> list[Check]:
    """Exactly ``min(8, CPUs)`` created; each other create refused in one line naming 0 free CPUs,
    with no record, cell, ledger entry or pid file of it left."""
    expected = min(CONCURRENT, batch.lent)
    held = ledger_allocations(batch.state)
    wordy = {cid: err for cid, (_, err) in batch.refused.items() if len(err.splitlines()) != 1 or REFUSAL not in err}
    left = [cid for cid in batch.refused
            if (batch.root / cid).exists() or cid in held or (batch.state / "kvm-cells" / cid).exists()
            or (batch.work / f"{cid}.pid").exists()]
    first = next(iter(batch.refused.values()), (0, "none refused"))[1]
    example = first.partition("msg=")[2].strip('"') or first  # the log line's message, no time or level
    return [
        Check(f"{CONCURRENT} creates at once: exactly {expected} created (this host lends {batch.lent} CPUs)",
              len(batch.created) == expected, f"{len(batch.created)} created"),
        Check(f"the other {CONCURRENT - expected} refused with the ledger's one line, nothing left behind",
              len(batch.refused) == CONCURRENT - expected and not wordy and not left,
              f"e.g. {example!r}" if not (wordy or left) else f"not one refusal line: {wordy}; left: {left}"),
    ]


def running_checks(batch: Batch, runphi: Path, env: dict[str, str]) -> list[Check]:
    """``runphi start`` of every created ZIC at once; each then ticks, each vCPU pinned where the ledger says."""
    wall, started = at_once({cid: batch.argv(runphi, "start", cid) for cid in batch.created}, env)
    batch.walls["start"] = wall
    failed = {cid: err for cid, (status, err) in started.items() if status != 0}
    silent = wait_for_ticks([batch.work / f"{cid}.console" for cid in batch.created])
    held = ledger_allocations(batch.state)
    wrong = [problem for cid in batch.created for problem in misplaced(batch.state, cid, held[cid]["cpus"])]
    cpus = [cpu for cid in batch.created for cpu in held[cid]["cpus"]]
    if len(set(cpus)) != len(cpus):
        wrong.append(f"two ZICs share a host CPU: {cpus}")
    return [
        Check(f"all {len(batch.created)} created ZICs started and ticking", not failed and not silent,
              f"start failed: {failed}; no tick from: {silent}" if failed or silent else "each printed tick 1"),
        Check("every vCPU thread allowed only on the host CPU the ledger gave it", not wrong,
              "; ".join(wrong) or f"host CPUs {sorted(cpus)}"),
    ]


def delete_all(batch: Batch, runphi: Path, env: dict[str, str], monitors: dict[str, ExitWatch]) -> list[Check]:
    """``runphi delete --force`` of every created ZIC at once, their monitors reaped; nothing may be left."""
    wall, deleted = at_once({cid: batch.argv(runphi, "delete", "--force", cid) for cid in batch.created}, env)
    batch.walls["delete --force"] = wall
    stuck = []
    for cid, watch in monitors.items():
        try:
            watch.wait(GUEST_TIMEOUT)
        except TimeoutError:
            stuck.append(cid)
    failed = {cid: err for cid, (status, err) in deleted.items() if status != 0}
    records = [p.name for p in batch.root.iterdir()] if batch.root.is_dir() else []
    cells, held = kvm_cells(batch.state), ledger_allocations(batch.state)
    problems = failed or stuck or records or cells or held
    return [Check("after delete --force: ledger, cells and state root empty, monitors exited", not problems,
                  f"delete failed {failed}, monitors still up {stuck}, records {records}, cells {cells}, "
                  f"ledger {sorted(held)}" if problems else f"{len(batch.created)} deleted")]


def concurrent_launches(installed: Installed, base: Path, result: SuiteResult) -> None:
    """Part 3 (module docstring): checks into ``result``, batch wall times as series."""
    work = base / "many"
    env = kvm_node_env(work)
    bundle = make_bundle(inmates.image_path("ticker"), base / "ticker")
    batch = launch_batch(installed.runphi, bundle, work, env)
    monitors = {cid: ExitWatch(int((work / f"{cid}.pid").read_text())) for cid in batch.created}
    try:
        result.checks += refusal_checks(batch)
        result.checks += running_checks(batch, installed.runphi, env)
        if batch.created:
            plan = json.loads((batch.state / "kvm-cells" / batch.created[0] / "vm.json").read_text())
            result.info["accelerator the KVM backend chose"] = f"{plan['accel']} ({plan['binary']}, -cpu {plan['cpu']})"
    finally:
        result.checks += delete_all(batch, installed.runphi, env, monitors)
    for verb, wall in batch.walls.items():
        count = CONCURRENT if verb == "create" else len(batch.created)
        result.add(Series(f"{count} x runphi {verb} at once (batch wall)", (wall,)))
    result.info["concurrent launches"] = (f"this host lends {batch.lent} CPUs: {len(batch.created)} of "
                                          f"{CONCURRENT} created, {len(batch.refused)} refused by the ledger")


# ---- the suite ----------------------------------------------------------------------------------


def run(options: Options) -> SuiteResult:
    require()
    become_subreaper()  # the monitors runphi create double-forks are adopted, and reaped, here
    result = SuiteResult("kvm")
    base = Path(tempfile.mkdtemp(prefix="rphi-bench-kvm-", dir=scratch_dir()))
    try:
        path, floor = backend_path(base, options, result)
        installed = install_runphi(base / "install")
        kvm, sim = ctr_comparison(installed, base, options, result)
        concurrent_launches(installed, base, result)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result.info["guests"] = f"hello and ticker inmates, one vCPU and 16 MiB each, under {DEFAULT_BINARY}"
    result.info["nodes"] = f"shim mode, runphi from target/install.sh, both polling every {POLL_MS} ms"
    result.budgets += [
        Budget("backend path: launch + start -> first console byte / bare QEMU", ratio(path, floor), PATH_BUDGET,
               "<=", "x"),
        Budget("ctr run --rm hello, shim mode: KVM / simulator", ratio(kvm, sim), CTR_BUDGET, "<=", "x"),
    ]
    return result


if __name__ == "__main__":
    sys.exit(standalone("kvm", run))
