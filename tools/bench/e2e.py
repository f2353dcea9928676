"""e2e: ``ctr run --rm`` of a ZIC vs ``ctr run --rm`` of busybox ``echo`` under runc, one containerd.

    python -m tools.bench.e2e [--quick]      (or: python -m tools.bench e2e)

A private containerd (the test suite's fixture class) whose runc shim runs
``runphi`` for the ZIC (a script guest on the simulator that prints a line and
powers off) and plain ``runc`` for busybox. The two runs alternate. The ZIC's
time inside the simulator's ``jailhouse`` tool is measured by the timing
wrapper runphi is pointed at and reported apart: on a board that tool is a
small C program, here a Python script. Budgets (DESIGN §12): ZIC <= 3x runc
overall, runphi's own share (ZIC minus tool time) <= 1.5x runc.
"""

from __future__ import annotations

import sys
import time

from .harness import Budget, Check, Options, Series, SuiteResult, Skip, standalone
from .zic import guest_script, runphi_binary, sim_node

OVERALL_BUDGET = 3.0
OWN_SHARE_BUDGET = 1.5


def _containerd_fixture():
    """The test suite's private-containerd helpers, or Skip with the reason they cannot run."""
    try:
        from tests import containerd
    except ImportError as error:
        raise Skip(f"the private-containerd helper (tests/containerd.py) is not importable: {error}") from None
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
        daemon.start()
        try:
            zic_rootfs = node.bundle("e2e-zic", guest_script("print hello from a ZIC\\n", "shutdown")) / "rootfs"
            busybox = helpers.make_busybox_rootfs(node.base / "busybox")

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

            zic, runc, tool = [], [], []
            for i in range(options.warmup + runs):
                node.tool_seconds()
                zic_time = ctr_run(f"bench-e2e-zic-{i}", str(node.runphi), zic_rootfs, "/boot/boot.bin")
                tool_time = node.tool_seconds()
                runc_time = ctr_run(f"bench-e2e-runc-{i}", "runc", busybox, "echo", "hello from runc")
                if i < options.warmup:
                    continue
                zic.append(zic_time)
                tool.append(tool_time)
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
    runc_series = result.add(Series("ctr run --rm busybox echo (runc)", tuple(runc)))
    result.budgets += [
        Budget("ZIC / runc, overall", zic_series.median / runc_series.median, OVERALL_BUDGET, "<=", "x"),
        Budget("runphi's own share / runc", own.median / runc_series.median, OWN_SHARE_BUDGET, "<=", "x",
               "simulator tool time excluded"),
    ]
    return result


if __name__ == "__main__":
    sys.exit(standalone("e2e", run))
