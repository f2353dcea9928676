"""Cell configuration generation time: plan + write one `.cell`, per config.

    python -m tools.bench.cellgen [--platform sim-qemu-arm64] [--count 4000]

Prints the time per generated config (best of several rounds) (plan_cell + write_cell) and, for
comparison, the time of one read_cell. runPHI ran gcc + objcopy for the same job.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from runphi.backends.jailhouse.allocator import Allocation, Segment
from runphi.backends.jailhouse.cellconfig import read_cell, write_cell
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", default="sim-qemu-arm64")
    parser.add_argument("--count", type=int, default=4000)
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


if __name__ == "__main__":
    main()
