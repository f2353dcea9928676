"""cellgen: plan + write one `.cell` vs runPHI's gcc + objcopy build of the same cell.

    python -m tools.bench.cellgen [--quick]      (or: python -m tools.bench cellgen)

runphi plans a cell (``plan_cell``) and packs it (``write_cell``) in-process.
runPHI generated C for every create and ran ``gcc -c`` + ``objcopy -O binary``
on the board. The reference here emits the same cell as self-contained C
(``cell_to_c``: our own packed struct definitions, no Jailhouse headers) and
runs that toolchain; the bytes gcc produces must equal ``write_cell``'s, a free
cross-check of the binary format. Budget: plan + write >= 100x faster.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from runphi.backends.jailhouse.allocator import Allocation, Segment
from runphi.backends.jailhouse.cellconfig import read_cell, write_cell
from runphi.backends.jailhouse.cellrender import cell_to_c
from runphi.backends.jailhouse.plan import plan_cell
from runphi.backends.jailhouse.platform import MiB, load_platform

from .harness import Budget, Check, Options, Series, SuiteResult, per_call, standalone, timed

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
PLATFORM = "sim-qemu-arm64"
SPEEDUP_BUDGET = 100.0


def sample_allocation() -> Allocation:
    """A typical ZIC: one CPU, 64 MiB, a console slot and a network link."""
    return Allocation(
        container_id="bench-zic-0123456789abcdef",
        cpus=frozenset({1}),
        ram=Segment(0x50000000, 64 * MiB + 0x10000),
        main_ram_size=64 * MiB,
        uart_slot=0,
        ivshmem_slot=1,
    )


def gcc_objcopy(source: str, work: Path) -> bytes:
    """Build ``source`` the runPHI way (``gcc -c``, ``objcopy -O binary``) and return the `.cell` bytes."""
    c_file, obj, cell = work / "cell.c", work / "cell.o", work / "cell.cell"
    c_file.write_text(source)
    subprocess.run(["gcc", "-c", "-o", obj, c_file], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".data", obj, cell], check=True)
    return cell.read_bytes()


def run(options: Options) -> SuiteResult:
    """Measure plan + write, read, and (when gcc and objcopy exist) the toolchain build."""
    result = SuiteResult("cellgen")
    platform = load_platform(PLATFORM, TEMPLATES)
    allocation = sample_allocation()
    profile = platform.profile

    def generate() -> bytes:
        return write_cell(plan_cell(platform, allocation, None, allocation.container_id), profile)

    data = generate()
    count, rounds = options.count(2000, 50), options.count(7, 3)
    result.info["cell"] = f"platform {platform.name}, profile {profile.name}, {len(data)} bytes"
    generated = result.add(Series("plan + write_cell", per_call(generate, count, rounds).samples))
    result.add(Series("read_cell", per_call(lambda: read_cell(data), count, rounds).samples))

    missing = [tool for tool in ("gcc", "objcopy") if shutil.which(tool) is None]
    if missing:
        result.info["gcc + objcopy"] = f"not measured: {', '.join(missing)} not installed"
        return result
    source = cell_to_c(plan_cell(platform, allocation, None, allocation.container_id), profile)
    with tempfile.TemporaryDirectory(prefix="rphi-bench-") as tmp:
        built = gcc_objcopy(source, Path(tmp))
        result.checks.append(Check("gcc + objcopy bytes == write_cell bytes", built == data,
                                   f"{len(built)} vs {len(data)} bytes"))
        samples = [timed(lambda: gcc_objcopy(source, Path(tmp))) for _ in range(options.count(5, 1))]
    toolchain = result.add(Series("gcc -c + objcopy (runPHI)", tuple(samples)))
    result.budgets.append(Budget("speed-up over gcc + objcopy", toolchain.median / generated.median,
                                 SPEEDUP_BUDGET, ">=", "x"))
    return result


if __name__ == "__main__":
    sys.exit(standalone("cellgen", run))
