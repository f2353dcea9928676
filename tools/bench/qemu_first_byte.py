"""Launch-to-first-byte of the ``hello`` inmate under the simulator's QEMU engine.

    python -m tools.bench.qemu_first_byte [--runs N]

Measures, in one run on this machine:

* engine: from calling ``QemuEngine.run`` (memfds, fork+exec of QEMU, QMP
  handshake, ``cont``) to the guest's first UART byte reaching the host, and to
  the cell being reported ``shut down``;
* floor: the same guest under a bare ``qemu-system-aarch64 -serial stdio``
  launched with subprocess, to its first byte on stdout (what QEMU alone costs).

Prints min / median / max in milliseconds. No budget is asserted here.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import trio

from tools.inmates import build as inmates
from tools.jailhouse_sim.engine import GuestSpec, LoadedImage, RamRegion
from tools.jailhouse_sim.engines.qemu import DEFAULT_BINARY, QemuEngine

RUN_TIMEOUT = 30  # seconds; a hello that takes longer is broken, not slow


class TimingHost:
    """Records when the first UART byte and the final state arrive."""

    def __init__(self) -> None:
        self.first_byte: float | None = None
        self.shut_down: float | None = None

    async def uart_write(self, data: bytes) -> None:
        if self.first_byte is None and data:
            self.first_byte = time.perf_counter()

    async def uart_read(self) -> bytes:
        await trio.sleep_forever()
        return b""

    def set_state(self, state: str) -> None:
        if state == "shut down":
            self.shut_down = time.perf_counter()

    def park_cpu(self, cpu: int, reason: str) -> None:
        raise SystemExit(f"qemu_first_byte: hello crashed: {reason}")

    def hv_print(self, line: str) -> None:
        pass

    def count_vmexits(self, cpu: int, kind: str, n: int = 1) -> None:
        pass


def hello_spec(image: bytes) -> GuestSpec:
    return GuestSpec(
        cell_name="bench-hello",
        cell_id=1,
        cpus=(1,),
        reset_address=inmates.LOAD_ADDRESS,
        images=(LoadedImage(inmates.LOAD_ADDRESS, image),),
        ram=(RamRegion(inmates.LOAD_ADDRESS, 0x800_0000, 0x4F),),
        uart_guest_address=0x0900_0000,
    )


async def engine_run(image: bytes) -> tuple[float, float]:
    """(launch → first byte, launch → shut down) in seconds, through the engine."""
    host = TimingHost()
    start = time.perf_counter()
    with trio.fail_after(RUN_TIMEOUT):
        await QemuEngine().run(hello_spec(image), host)
    if host.first_byte is None or host.shut_down is None:
        raise SystemExit("qemu_first_byte: hello printed nothing or did not power off")
    return host.first_byte - start, host.shut_down - start


def bare_qemu_first_byte(image_path: str) -> float:
    """Launch → first stdout byte for QEMU started directly (no QMP, no engine)."""
    argv = [
        DEFAULT_BINARY, "-M", "virt,gic-version=3", "-cpu", "cortex-a53", "-m", "1G",
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-device", f"loader,file={image_path},addr={inmates.LOAD_ADDRESS:#x},force-raw=on",
        "-device", f"loader,addr={inmates.LOAD_ADDRESS:#x},cpu-num=0",
    ]  # fmt: skip
    start = time.perf_counter()
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as qemu:
        assert qemu.stdout is not None
        first = qemu.stdout.read(1)
        elapsed = time.perf_counter() - start
        qemu.communicate(timeout=RUN_TIMEOUT)
    if not first or qemu.returncode != 0:
        raise SystemExit(f"qemu_first_byte: bare QEMU failed (status {qemu.returncode})")
    return elapsed


def summary(label: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"{label:<34} min {ms[0]:7.1f}  median {statistics.median(ms):7.1f}  max {ms[-1]:7.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.qemu_first_byte", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measurements per series (default %(default)s)")
    args = parser.parse_args(argv)
    reason = inmates.missing_tools()
    if reason:
        print(f"qemu_first_byte: cannot build the inmates: {reason}", file=sys.stderr)
        return 1
    image_path = inmates.image_path("hello")
    image = image_path.read_bytes()

    engine_first, engine_off, bare = [], [], []
    for _ in range(args.runs):
        first, off = trio.run(engine_run, image)
        engine_first.append(first)
        engine_off.append(off)
        bare.append(bare_qemu_first_byte(str(image_path)))
    print(f"hello inmate, {args.runs} runs each, QEMU {DEFAULT_BINARY}")
    print(summary("engine: launch -> first UART byte", engine_first))
    print(summary("engine: launch -> shut down", engine_off))
    print(summary("bare QEMU: launch -> first byte", bare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
