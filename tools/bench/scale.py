"""scale: N ZICs created, started and deleted concurrently; time per ZIC, errors, ledger after.

    python -m tools.bench.scale [--quick]      (or: python -m tools.bench scale)

The shipped simulator board has 8 CPUs and 7 cell UARTs, so this suite runs on
a wider copy of it (same layout, ``max(N)+1`` CPUs and a UART per cell),
written next to a matching runphi platform file. For each N in 2, 4, 8, 16
(``--quick``: 2): N ``runphi create`` processes at once, then N ``start``,
then N ``delete --force``. Reported per phase: wall time of the whole batch
divided by N. Checks: no verb failed, the ledger held N disjoint CPU sets
while they ran, and after the deletes the ledger, the board and the state root
are empty.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import Check, Options, Series, SuiteResult, standalone
from .zic import Node, guest_script, scratch_dir, sim_node

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
SIM_BOARDS = Path(__file__).resolve().parents[1] / "jailhouse_sim" / "boards"
BASE_BOARD = "sim-qemu-arm64"


def _uart_block(index: int) -> tuple[str, str]:
    """The [[uarts]] table for UART ``index`` in the simulator board and in runphi's template."""
    address = 0x0900_0000 + index * 0x1000
    board = f"\n[[uarts]]\nindex = {index}\naddress = {address:#010x}\nirq = {33 + index}\n"
    template = (f'\n[[uarts]]\nphys = {address:#010x}\nguest = 0x09000000\nirq = 33\nphys_irq = {33 + index}\n'
                f'device = "{{sim_root}}/dev/ttyAMA{index}"\n')
    return board, template


def wide_board(directory: Path, cpus: int) -> tuple[Path, Path]:
    """(simulator board file, runphi platform file) for the shipped board widened to ``cpus`` CPUs."""
    board = (SIM_BOARDS / f"{BASE_BOARD}.toml").read_text()
    template = (TEMPLATES / f"{BASE_BOARD}.toml").read_text()
    board = re.sub(r"(?m)^cpus = 8$", f"cpus = {cpus}", board)
    board = re.sub(r"(?m)^cpus = \[[0-9, ]+\]$", f"cpus = {list(range(cpus))}", board)
    template = re.sub(r'(?m)^cell_cpus = "1-7"', f'cell_cpus = "1-{cpus - 1}"', template)
    extra = [_uart_block(i) for i in range(8, cpus)]
    board += "".join(b for b, _ in extra)
    template += "".join(t for _, t in extra)
    if f"cpus = {cpus}" not in board or f'cell_cpus = "1-{cpus - 1}"' not in template:
        raise RuntimeError(f"the shipped {BASE_BOARD} board or template changed shape; update tools/bench/scale.py")
    board_path, template_path = directory / f"bench-wide-{cpus}.toml", directory / f"bench-wide-{cpus}-platform.toml"
    board_path.write_text(board)
    template_path.write_text(template)
    return board_path, template_path


def batch(node: Node, argvs: list[list[str]]) -> tuple[float, int, str]:
    """Run every argv at once; (wall seconds, how many failed, the first failure's stderr)."""
    start = time.perf_counter()
    running = []
    for argv in argvs:
        err = tempfile.TemporaryFile()
        running.append((subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=node.env), err))
    failures, first = 0, ""
    for process, err in running:
        with err:
            if process.wait(timeout=300) != 0:
                failures += 1
                if not first:
                    err.seek(0)
                    first = err.read().decode(errors="replace").strip()
    return time.perf_counter() - start, failures, first


def ledger(node: Node) -> dict[str, dict]:
    path = node.base / "node" / "jailhouse-ledger.json"
    return json.loads(path.read_text())["allocations"] if path.exists() else {}


def one_size(node: Node, count: int, result: SuiteResult) -> dict[str, float]:
    """Create, start, delete ``count`` ZICs concurrently; per-ZIC seconds per phase."""
    bundle = node.bundle(f"scale-{count}", guest_script("print up\\n", "halt"))
    ids = [f"bench-scale-{count}-{i}" for i in range(count)]
    pid_files = {cid: node.base / f"{cid}.pid" for cid in ids}
    per_zic, errors = {}, []
    wall, failed, why = batch(node, [node.argv("create", "--bundle", str(bundle), "--pid-file", str(pid_files[cid]),
                                               cid) for cid in ids])
    per_zic["create"], errors = wall / count, errors + ([f"create: {failed} failed ({why})"] if failed else [])
    for cid, pid_file in pid_files.items():
        if pid_file.exists():
            node.monitors[cid] = int(pid_file.read_text())
    held = ledger(node)
    cpu_sets = [frozenset(a["cpus"]) for a in held.values()]
    disjoint = len(cpu_sets) == count and sum(map(len, cpu_sets)) == len(frozenset().union(*cpu_sets))
    wall, failed, why = batch(node, [node.argv("start", cid) for cid in ids])
    per_zic["start"], errors = wall / count, errors + ([f"start: {failed} failed ({why})"] if failed else [])
    wall, failed, why = batch(node, [node.argv("delete", "--force", cid) for cid in ids])
    per_zic["delete --force"], errors = wall / count, errors + ([f"delete: {failed} failed ({why})"] if failed else [])
    node.cleanup()  # reaps the monitors the deletes killed
    cells = [p for p in node.sim.sysfs_path("cells").iterdir() if p.name != "0"]
    records = [p for p in node.root.iterdir() if p.is_dir()] if node.root.is_dir() else []
    result.checks += [
        Check(f"{count} ZICs: no verb failed", not errors, "; ".join(errors)[:300]),
        Check(f"{count} ZICs: ledger held {count} disjoint CPU sets", disjoint, f"{len(cpu_sets)} allocations"),
        Check(f"{count} ZICs: ledger, board and state root empty after",
              not ledger(node) and not cells and not records,
              f"ledger {len(ledger(node))}, cells {len(cells)}, records {len(records)}"),
    ]
    return per_zic


def run(options: Options) -> SuiteResult:
    result = SuiteResult("scale")
    sizes = (2,) if options.quick else (2, 4, 8, 16)
    base = Path(tempfile.mkdtemp(prefix="rphi-bench-", dir=scratch_dir()))
    board, platform = wide_board(base, max(sizes) + 1)
    with sim_node(board=str(board), platform=str(platform), base=base) as node:
        for count in sizes:
            for phase, seconds in one_size(node, count, result).items():
                result.add(Series(f"{count:>2} ZICs: {phase}, per ZIC", (seconds,)))
    result.info["board"] = f"simulated, {max(sizes) + 1} CPUs, one UART per cell"
    return result


if __name__ == "__main__":
    sys.exit(standalone("scale", run))
