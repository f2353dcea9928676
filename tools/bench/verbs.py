"""verbs: runphi's short-lived verb processes against the Python floor and runc, same run.

    python -m tools.bench.verbs [--quick]      (or: python -m tools.bench verbs)

References, interleaved round by round with the verbs they judge:

* ``python -c pass``: the bare interpreter (this environment's, the one runphi runs on);
* ``python -c "import argparse, msgspec"``: the floor every verb pays with our libraries;
* ``runc state`` of a live runc container (busybox ``sleep``), when runc and root are there.

Process references, ``state``/``list`` and ``create`` are also measured in CPU
time (user + system of the process and what it waited for): on a loaded
machine wall time mostly measures waiting for a CPU, CPU time what the process
itself costs. The budgets are checked on CPU-time medians, the wall ratios are
reported next to them.

Measured on a live ZIC on the simulator: ``state`` and ``list`` repeatedly, and
per container cycle ``create``, ``start``, ``kill`` and ``delete``, each as wall
time and as its own time (wall minus the hypervisor tool calls it made). Budgets (DESIGN §12):
``state`` <= 1.25x the floor, ``create``'s own time <= 2x the floor.

Every Python process here (runphi and the references) runs with bytecode
caching into a private directory, as an installed runphi runs from compiled
bytecode (see ``zic.python_env``).

Import audit: every verb also runs once under a driver that records
``sys.modules`` when the verb process exits (the forked monitor excluded);
trio, structlog, asyncio or serial there fails the suite (DESIGN §2),
except pyserial in ``create``, which opens the console UART itself. (An
unknown id is forwarded to runc by ``exec``, so there is nothing to audit.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .harness import Budget, Check, Options, Series, SuiteResult, interleaved, ratio, standalone
from .zic import ExitWatch, Node, guest_script, sim_node

STATE_BUDGET = 1.25
CREATE_BUDGET = 2.0
FORBIDDEN_IN_VERBS = ("trio", "structlog", "asyncio", "serial")
#: create opens the console UART itself (before the fork, so no guest byte is lost):
#: pyserial is needed there and only there (DESIGN §2, §8).
NEEDED_BY = {"create": ("serial",)}
FLOOR = "import argparse, msgspec"

#: Runs runphi's CLI like the console script and, in the verb's own process only,
#: writes the names in sys.modules to $RUNPHI_BENCH_AUDIT when it exits.
AUDIT_DRIVER = """
import atexit, os, sys
_pid = os.getpid()
def _record():
    if os.getpid() == _pid:
        with open(os.environ["RUNPHI_BENCH_AUDIT"], "w") as out:
            out.write("\\n".join(sorted(sys.modules)))
atexit.register(_record)
sys.argv[0] = "runphi"
from runphi.cli import main
sys.exit(main())
"""


def quiet(argv: list[str], env: dict[str, str] | None = None) -> Callable[[], None]:
    """A callable running ``argv`` to completion, output discarded, failing on a non-zero exit."""

    def call() -> None:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=env, check=True, timeout=60)

    return call


# ---- the runc reference ----------------------------------------------------------------------


def runc_missing() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("runc", "busybox"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@contextmanager
def live_runc_container(base: Path) -> Iterator[list[str]]:
    """A created+started runc container running busybox ``sleep``; yields ``runc --root R``."""
    rootfs = base / "runc-bundle" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox"), rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sleep").symlink_to("busybox")
    bundle = rootfs.parent
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, stdin=subprocess.DEVNULL)
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(terminal=False, args=["/bin/sleep", "1000"])
    (bundle / "config.json").write_text(json.dumps(config))
    runc = ["runc", "--root", str(base / "runc-root")]
    quiet([*runc, "run", "--detach", "--bundle", str(bundle), "bench-runc"])()
    try:
        yield runc
    finally:
        subprocess.run([*runc, "delete", "--force", "bench-runc"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---- import audit ----------------------------------------------------------------------------


def imported_by(node: Node, *args: str) -> set[str]:
    """Modules the verb process ``runphi ARGS`` had imported when it exited."""
    record = node.base / "audit-modules.txt"
    record.unlink(missing_ok=True)
    env = {**node.env, "RUNPHI_BENCH_AUDIT": str(record)}
    with tempfile.TemporaryFile() as sink:
        subprocess.run([sys.executable, "-c", AUDIT_DRIVER, "--root", str(node.root), *args],
                       stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=env, timeout=60)
    return set(record.read_text().split()) if record.exists() else set()


def import_audit(node: Node) -> list[Check]:
    """One check per verb: no module DESIGN §2 keeps off the verb paths."""
    bundle = node.bundle("bench-audit", guest_script("print audit\\n", "halt"))
    pid_file = node.base / "bench-audit.pid"
    steps = [
        ("--version", ("--version",)),
        ("create", ("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "bench-audit")),
        ("state", ("state", "bench-audit")),
        ("start", ("start", "bench-audit")),
        ("list", ("list",)),
        ("ps", ("ps", "bench-audit")),
        ("kill", ("kill", "bench-audit", "KILL")),
        ("delete", ("delete", "--force", "bench-audit")),
    ]
    checks = []
    for label, args in steps:
        modules = imported_by(node, *args)
        if label == "create" and pid_file.exists():
            node.monitors["bench-audit"] = int(pid_file.read_text())
        forbidden = set(FORBIDDEN_IN_VERBS) - set(NEEDED_BY.get(label, ()))
        heavy = sorted(m for m in modules if m.split(".")[0] in forbidden)
        if not modules:
            checks.append(Check(f"imports of runphi {label}", False, "the verb did not exit normally"))
        else:
            checks.append(Check(f"imports of runphi {label}", not heavy,
                                f"{len(modules)} modules" + (f"; forbidden: {', '.join(heavy[:6])}" if heavy else "")))
    node.cleanup()
    return checks


# ---- timings ---------------------------------------------------------------------------------


def cycle_timings(node: Node, cycles: int, warmup: int) -> dict[str, list[float]]:
    """``cycles`` full create/start/kill/delete rounds after ``warmup`` ones, each verb timed:
    wall, and own (wall minus the hypervisor tool calls the verb made)."""
    bundle = node.bundle("bench-cycle", guest_script("print cycle\\n", "halt"))
    timings: dict[str, list[float]] = {}
    for i in range(warmup + cycles):
        cid = f"bench-cycle-{i}"
        created = node.create_timed(cid, bundle)
        watch = ExitWatch(created.monitor)
        walls = {"create": (created.wall, created.tool), "start": node.run_timed("start", cid),
                 "kill": node.run_timed("kill", cid, "TERM")}
        watch.wait(30.0)
        node.monitors.pop(cid, None)
        walls["delete"] = node.run_timed("delete", cid)
        if i < warmup:
            continue
        timings.setdefault("create (own) [cpu]", []).append(created.cpu - created.tool_cpu)
        for verb, (wall, tool) in walls.items():
            timings.setdefault(f"{verb} (wall)", []).append(wall)
            timings.setdefault(f"{verb} (own)", []).append(wall - tool)
    return timings


def run(options: Options) -> SuiteResult:
    result = SuiteResult("verbs")
    runs = options.count(30, 3)
    python = sys.executable
    with sim_node() as node, tempfile.TemporaryDirectory(prefix="rphi-bench-runc-") as tmp:
        result.checks += import_audit(node)

        live = "bench-live"
        node.create(live, node.bundle(live, guest_script("print live\\n", "halt")))
        node.run("start", live)
        candidates = {
            "python -c pass": quiet([python, "-c", "pass"], node.env),
            f'python -c "{FLOOR}" (floor)': quiet([python, "-c", FLOOR], node.env),
            "runphi state": quiet(node.argv("state", live), node.env),
            "runphi list": quiet(node.argv("list"), node.env),
        }
        why_not_runc = runc_missing()
        with live_runc_container(Path(tmp)) if why_not_runc is None else nullcontext() as runc:
            if runc:
                candidates["runc state"] = quiet([*runc, "state", "bench-runc"])
            else:
                result.info["runc state"] = f"not measured: {why_not_runc}"
            series = interleaved(candidates, runs, warmup=2 * options.warmup, child_cpu=True)
        floor = series[f'python -c "{FLOOR}" (floor)']
        floor_cpu = series[f'python -c "{FLOOR}" (floor) [cpu]']
        for s in series.values():
            result.add(s)
        for name, samples in cycle_timings(node, options.count(8, 1), options.warmup).items():
            result.add(Series(f"runphi {name}", tuple(samples)))
    by_name = {s.name: s for s in result.series}
    for s in result.series:
        if s.name.endswith("[cpu]") and (s.name.startswith("runphi") or s.name.startswith("runc")):
            result.info[f"{s.name} / floor [cpu]"] = f"{ratio(s, floor_cpu):.2f}x"
        elif s.name.startswith("runphi") or s.name == "runc state":
            result.info[f"{s.name} / floor"] = f"{ratio(s, floor):.2f}x"
    result.budgets += [
        Budget("runphi state / argparse+msgspec floor [cpu]", ratio(by_name["runphi state [cpu]"], floor_cpu),
               STATE_BUDGET, "<=", "x", f"wall: {ratio(by_name['runphi state'], floor):.2f}x"),
        Budget("runphi create own / floor [cpu]", ratio(by_name["runphi create (own) [cpu]"], floor_cpu),
               CREATE_BUDGET, "<=", "x",
               f"own = minus its jailhouse tool calls; wall: {ratio(by_name['runphi create (own)'], floor):.2f}x"),
    ]
    return result


if __name__ == "__main__":
    sys.exit(standalone("verbs", run))
