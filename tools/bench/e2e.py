"""e2e: ``ctr run --rm`` of a ZIC vs ``ctr run --rm`` of busybox ``echo`` under runc, one containerd.

    python -m tools.bench.e2e [--quick]      (or: python -m tools.bench e2e)

A private containerd (the test suite's fixture class) whose runc shim runs
``runphi`` for the ZIC (a script guest on the simulator that prints a line and
powers off) and plain ``runc`` for busybox. The two runs alternate. The ZIC's
time inside the simulator's ``jailhouse`` tool is measured by the timing
wrapper runphi is pointed at and reported apart: on a board that tool is a
small C program, here a Python script. The argparse + msgspec floor is timed
in the same loop: the shim's number of runphi calls times that floor is the
least any Python runtime's share can be. runphi itself is called through the
same kind of wrapper, so the report breaks the ZIC's time down by the verbs
the shim ran. Budgets (DESIGN §12): ZIC <= 3x runc
overall, runphi's own share (ZIC minus tool time) <= 1.5x runc.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from .harness import Budget, Check, Options, Series, Skip, SuiteResult, standalone, timed
from .zic import build_tool_wrapper, guest_script, runphi_binary, sim_node, take_calls

OVERALL_BUDGET = 3.0
OWN_SHARE_BUDGET = 1.5


def _containerd_fixture():
    """The private-containerd test-bed, or Skip with the reason it cannot run here."""
    from tools.testbed import containerd

    reason = containerd.missing_requirements()
    if reason:
        raise Skip(reason)
    return containerd


def run(options: Options) -> SuiteResult:
    helpers = _containerd_fixture()
    result = SuiteResult("e2e")
    runs = options.count(10, 1)
    with sim_node() as node:
        daemon = helpers.PrivateContainerd(node.base / "ctd", runphi_binary(), env=node.env)
        # The helper layers its env over this process's: drop what node.env dropped
        # (bytecode writing off) so containerd -> shim -> runphi get node.env's view.
        for key in set(daemon.env) - set(node.env):
            del daemon.env[key]
        daemon.start()
        try:
            zic_rootfs = node.bundle("e2e-zic", guest_script("print hello from a ZIC\\n", "shutdown")) / "rootfs"
            busybox = helpers.make_busybox_rootfs(node.base / "busybox")
            (node.base / "shim-view").mkdir()
            runphi, runphi_log = build_tool_wrapper(runphi_binary(), node.base / "shim-view", "runphi")

            def ctr_run(cid: str, binary: str, rootfs, *args: str) -> float:
                start = time.perf_counter()
                done = daemon.ctr("run", "--rm", *daemon.runtime_flags(binary), "--rootfs", str(rootfs), cid, *args,
                                  timeout=120)
                elapsed = time.perf_counter() - start
                if done.returncode != 0:
                    raise RuntimeError(f"ctr run {cid} exited {done.returncode}: "
                                       f"{done.stderr.decode(errors='replace').strip()}")
                expected = b"hello from a ZIC" if binary != "runc" else b"hello from runc"
                if expected not in done.stdout:
                    raise RuntimeError(f"ctr run {cid} printed {done.stdout[:200]!r}, not {expected!r}")
                return elapsed

            floor_argv = [sys.executable, "-c", "import argparse, msgspec"]
            zic, runc, tool, verbs, floor, calls = [], [], [], {}, [], []
            for i in range(options.warmup + runs):
                node.tool_seconds()
                take_calls(runphi_log)
                zic_time = ctr_run(f"bench-e2e-zic-{i}", str(runphi), zic_rootfs, "/boot/boot.bin")
                tool_time = node.tool_seconds()
                shim_calls = take_calls(runphi_log)
                by_verb = _verb_seconds(shim_calls)
                runc_time = ctr_run(f"bench-e2e-runc-{i}", "runc", busybox, "echo", "hello from runc")
                floor_time = timed(lambda: subprocess.run(floor_argv, env=node.env, check=True))
                if i < options.warmup:
                    continue
                zic.append(zic_time)
                tool.append(tool_time)
                floor.append(floor_time)
                calls.append(len(shim_calls))
                for verb, seconds in by_verb.items():
                    verbs.setdefault(verb, []).append(seconds)
                runc.append(runc_time)
            leftovers = daemon.ctr("containers", "list", "--quiet").stdout.split()
            result.checks.append(Check("nothing left in containerd after --rm", not leftovers,
                                       f"{len(leftovers)} containers left"))
            cells = [p.name for p in node.sim.sysfs_path("cells").iterdir() if p.name != "0"]
            result.checks.append(Check("no cell left on the board", not cells, f"cells {cells}"))
        finally:
            try:
                daemon.remove_leftovers()
            finally:
                daemon.stop()
    zic_series = result.add(Series("ctr run --rm ZIC (runphi, script guest)", tuple(zic)))
    result.add(Series("  of which in the simulator's jailhouse tool", tuple(tool)))
    own = result.add(Series("  runphi's own share (ZIC minus tool)", tuple(z - t for z, t in zip(zic, tool))))
    for verb, samples in verbs.items():
        result.add(Series(f"  shim ran runphi {verb} (incl. tool)", tuple(samples)))
    runc_series = result.add(Series("ctr run --rm busybox echo (runc)", tuple(runc)))
    floor_series = result.add(Series('python -c "import argparse, msgspec" (floor)', tuple(floor)))
    least = statistics.median(calls) * floor_series.median
    result.info["runphi calls per ctr run (by the shim)"] = f"{statistics.median(calls):g}"
    result.info["least possible own share: calls x floor"] = (
        f"{least * 1e3:.0f} ms = {least / runc_series.median:.2f}x the whole runc run")
    result.budgets += [
        Budget("ZIC / runc, overall", zic_series.median / runc_series.median, OVERALL_BUDGET, "<=", "x"),
        Budget("runphi's own share / runc", own.median / runc_series.median, OWN_SHARE_BUDGET, "<=", "x",
               "simulator tool time excluded"),
    ]
    return result


def _verb_seconds(calls) -> dict[str, float]:
    """Seconds per runphi verb (several calls of one verb add up) from the wrapper's log."""
    totals: dict[str, float] = {}
    for call in calls:
        verb = next((a for a in call.args if a in RUNPHI_VERBS), "other")
        totals[verb] = totals.get(verb, 0.0) + call.seconds
    return totals


RUNPHI_VERBS = ("create", "start", "state", "kill", "delete", "features", "list", "ps", "events", "--version")


if __name__ == "__main__":
    sys.exit(standalone("e2e", run))
