"""Cell configuration generation time: plan + write one `.cell`, per config.

    python -m tools.bench.cellgen [--platform sim-qemu-arm64] [--count 4000] [--gcc]

Prints the time per generated config (best of several rounds) (plan_cell + write_cell) and, for
comparison, the time of one read_cell and (with --gcc) of the gcc + objcopy
build runPHI ran on the board for the same job.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from runphi.backends.jailhouse.allocator import Allocation, Segment
from runphi.backends.jailhouse.cellconfig import read_cell, write_cell
from runphi.backends.jailhouse.cellrender import cell_to_c
from runphi.backends.jailhouse.plan import plan_cell
from runphi.backends.jailhouse.platform import MiB, load_platform

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def sample_allocation(platform_name: str) -> Allocation:
    """A typical ZIC: one CPU, 64 MiB, a console slot and a network link."""
    return Allocation(
        container_id="bench-zic-0123456789abcdef",
        cpus=frozenset({1}),
        ram=Segment(0x50000000, 64 * MiB + 0x10000),
        main_ram_size=64 * MiB,
        uart_slot=0,
        ivshmem_slot=1,
    )


ROUNDS = 5


def per_call(fn, count: int) -> float:
    """Seconds per call of `fn`: the best of ROUNDS rounds of `count` calls (after one warm-up).

    The best round is the least disturbed by other load on the machine.
    """
    fn()
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(count):
            fn()
        best = min(best, (time.perf_counter() - start) / count)
    return best


def gcc_objcopy_seconds(source: str, expected: bytes, rounds: int = 3) -> float:
    """Best wall time of the gcc + objcopy path runPHI used; checks it yields the same bytes."""
    best = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        c_file, obj, cell = Path(tmp, "cell.c"), Path(tmp, "cell.o"), Path(tmp, "cell.cell")
        c_file.write_text(source)
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run(["gcc", "-c", "-o", obj, c_file], check=True)
            subprocess.run(["objcopy", "-O", "binary", "-j", ".data", obj, cell], check=True)
            best = min(best, time.perf_counter() - start)
        if cell.read_bytes() != expected:
            raise SystemExit("gcc + objcopy produced different bytes than write_cell")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", default="sim-qemu-arm64")
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--gcc", action="store_true", help="also time gcc + objcopy on the same config")
    args = parser.parse_args()
    platform = load_platform(args.platform, TEMPLATES)
    allocation = sample_allocation(args.platform)
    profile = platform.profile

    def generate() -> bytes:
        return write_cell(plan_cell(platform, allocation, None, allocation.container_id), profile)

    data = generate()
    gen = per_call(generate, args.count)
    read = per_call(lambda: read_cell(data), args.count)
    print(f"platform {platform.name} profile {profile.name}: {len(data)}-byte .cell")
    print(f"plan + write: {gen * 1e6:.1f} us per config (best of {ROUNDS} x {args.count})")
    print(f"read:         {read * 1e6:.1f} us per config")
    if args.gcc and shutil.which("gcc") and shutil.which("objcopy"):
        config = plan_cell(platform, allocation, None, allocation.container_id)
        seconds = gcc_objcopy_seconds(cell_to_c(config, profile), data)
        print(f"gcc+objcopy:  {seconds * 1e3:.1f} ms per config ({seconds / gen:.0f}x plan + write)")


if __name__ == "__main__":
    main()
