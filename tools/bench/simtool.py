"""simtool: the simulator's ``jailhouse`` command, compiled client against the Python client, same run.

    python -m tools.bench.simtool [--quick]      (or: python -m tools.bench simtool)

On a board ``jailhouse`` is a small C program. The simulator's ``bin/jailhouse`` is a
small C client too (``tools/jailhouse_sim/jailhouse_client.c``): the daemon runs the
tool's Python logic for it, so a call costs a process start and a round trip instead of
an interpreter start. The Python client (what ``up`` installs without a C compiler) is
timed in its place on the same board, interleaved call by call with the C client, on
read-only commands: ``cell list`` (root cell + one created cell, the sysfs reads) and
``console`` (a daemon request). ``true`` is timed next to them: the cost of starting
any process from here.

Checks: both clients print the same bytes. Budget: the C client's median wall time per
call <= 0.25x the Python client's (``cell list``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tools.jailhouse_sim.testing import SimBoard

from .harness import Budget, Check, Options, Series, Skip, SuiteResult, interleaved, ratio, standalone
from .zic import scratch_dir

RATIO_BUDGET = 0.25
COMMANDS = {"cell list": ("cell", "list"), "console": ("console",)}


def cell_file(directory: Path) -> Path:
    """A small cell config for the board (CPU 1, UART 1), written with runphi's own writer."""
    from runphi.backends.jailhouse.allocator import Allocation, Segment
    from runphi.backends.jailhouse.cellconfig import write_cell
    from runphi.backends.jailhouse.plan import plan_cell
    from runphi.backends.jailhouse.platform import MiB, load_platform

    from .cellgen import TEMPLATES

    platform = load_platform("sim-qemu-arm64", TEMPLATES)
    allocation = Allocation(container_id="bench-simtool", cpus=frozenset({1}),
                            ram=Segment(0x50000000, 16 * MiB + 0x10000), main_ram_size=16 * MiB, uart_slot=0)
    path = directory / "bench-simtool.cell"
    path.write_bytes(write_cell(plan_cell(platform, allocation, None, allocation.container_id), platform.profile))
    return path


def caller(argv: list[str], env: dict[str, str] | None) -> Callable[[], bytes]:
    """A callable running ``argv`` to completion and returning its stdout (failing on a non-zero exit)."""

    def call() -> bytes:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, check=True,
                              timeout=60).stdout

    return call


def clients(sim: SimBoard, args: tuple[str, ...]) -> tuple[Callable[[], bytes], Callable[[], bytes]]:
    """``bin/jailhouse ARGS`` (the C client) and the Python client run in its place."""
    return (caller([str(sim.jailhouse_path), *args], None),
            caller([str(sim.python_client_path), *args], sim.python_client_env()))


def candidates(sim: SimBoard) -> dict[str, Callable[[], object]]:
    """Every (client, command) pair, plus the ``true`` process floor."""
    found: dict[str, Callable[[], object]] = {"true (process floor)": caller([shutil.which("true") or "true"], None)}
    for label, args in COMMANDS.items():
        found[f"C client: {label}"], found[f"Python client: {label}"] = clients(sim, args)
    return found


def run(options: Options) -> SuiteResult:
    result = SuiteResult("simtool")
    with tempfile.TemporaryDirectory(prefix="rphi-bench-", dir=scratch_dir()) as tmp, \
            SimBoard.running(Path(tmp) / "sim") as sim:
        if sim.jailhouse_path.read_bytes()[:4] != b"\x7fELF":
            raise Skip("no C compiler (cc): bin/jailhouse is the Python client")
        sim.jailhouse("cell", "create", cell_file(Path(tmp))).check()
        for label, args in COMMANDS.items():
            compiled, python = (call() for call in clients(sim, args))
            result.checks.append(Check(f"same output from both clients: {label}", compiled == python and bool(compiled),
                                       f"{len(compiled)} vs {len(python)} bytes"))
        series = interleaved(candidates(sim), options.count(100, 5), warmup=options.warmup)
    for s in series.values():
        result.add(s)
    for label in COMMANDS:
        result.info[f"C / Python: {label}"] = (
            f"{ratio(series[f'C client: {label}'], series[f'Python client: {label}']):.3f}x")
    result.budgets.append(Budget("C client / Python client: cell list (wall)",
                                 ratio(series["C client: cell list"], series["Python client: cell list"]),
                                 RATIO_BUDGET, "<=", "x"))
    return result


if __name__ == "__main__":
    sys.exit(standalone("simtool", run))
