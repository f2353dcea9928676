"""qemu: launch-to-first-byte of the ``hello`` inmate under the simulator's QEMU engine.

    python -m tools.bench.qemu_first_byte [--quick]      (or: python -m tools.bench qemu)

Measures, in one run on this machine:

* engine: from calling ``QemuEngine.run`` (memfds, fork+exec of QEMU, QMP
  handshake, ``cont``) to the guest's first UART byte reaching the host, and to
  the cell being reported ``shut down``;
* floor: the same guest under a bare ``qemu-system-aarch64 -serial stdio``
  launched with subprocess, to its first byte on stdout (what QEMU alone costs).

The two alternate run by run. No budget: the engine's overhead over QEMU
itself is reported as a ratio.
"""

from __future__ import annotations

import subprocess
import sys
import time

import trio

from tools.inmates import build as inmates
from tools.jailhouse_sim.engine import GuestSpec, LoadedImage, RamRegion
from tools.jailhouse_sim.engines.qemu import DEFAULT_BINARY, QemuEngine

from .harness import Options, Series, Skip, SuiteResult, ratio, standalone

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
        raise RuntimeError(f"hello crashed: {reason}")

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
        raise RuntimeError("hello printed nothing or did not power off")
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
        raise RuntimeError(f"bare QEMU failed (status {qemu.returncode})")
    return elapsed


def run(options: Options) -> SuiteResult:
    import shutil

    if shutil.which(DEFAULT_BINARY) is None:
        raise Skip(f"{DEFAULT_BINARY} is not installed")
    reason = inmates.missing_tools()
    if reason:
        raise Skip(f"cannot build the inmates: {reason}")
    image_path = inmates.image_path("hello")
    image = image_path.read_bytes()
    engine_first, engine_off, bare = [], [], []
    runs = options.count(10, 1)
    for i in range(options.warmup + runs):
        first, off = trio.run(engine_run, image)
        bare_first = bare_qemu_first_byte(str(image_path))
        if i < options.warmup:
            continue
        engine_first.append(first)
        engine_off.append(off)
        bare.append(bare_first)
    result = SuiteResult("qemu")
    result.info["guest"] = f"hello inmate under {DEFAULT_BINARY}"
    engine = result.add(Series("engine: launch -> first UART byte", tuple(engine_first)))
    result.add(Series("engine: launch -> shut down", tuple(engine_off)))
    reference = result.add(Series("bare QEMU: launch -> first byte", tuple(bare)))
    result.info["engine / bare QEMU (first byte)"] = f"{ratio(engine, reference):.2f}x"
    return result


if __name__ == "__main__":
    sys.exit(standalone("qemu", run))
