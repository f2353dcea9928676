"""console: guest -> containerd-pipe latency and throughput, idle monitor CPU and RSS.

    python -m tools.bench.console [--quick]      (or: python -m tools.bench console)

Two layers, both over real file descriptors:

* **monitor** (budgets): a real ZIC on the simulator, its monitor's stdin and
  stdout are pipes this process holds, like the shim's fifos.
  - latency: an ``echo`` guest; one byte written to the monitor's stdin comes
    back on its stdout (stdin -> UART -> guest -> UART -> stdout). The round
    trip crosses the console path twice plus the simulator's relay, so its p99
    is an upper bound of the guest -> pipe latency. Budget p99 <= 5 ms.
  - throughput: a ``flood`` guest, MB/s from the first to the last byte read
    from the monitor's stdout. Budget >= 20 MB/s (a 115200-baud UART carries
    0.0115 MB/s). Reference: the same flood read straight from the board
    UART's pty with no runphi in the path (what the simulator itself delivers).
  - idle: a guest that prints once and waits; the monitor's own CPU time over
    a window (budget <= 0.5 %), the CPU of the tools it runs (its 2 s
    hypervisor probe; on a board that tool is a small C program) reported
    apart, and its resident memory (budget <= 24 MiB).
* **pump** (reference): ``ConsolePump`` alone in this process, a real pty as
  the board UART and a real pipe as the sink: what the console code costs
  without the simulator in the path.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from .harness import Budget, Options, Series, SuiteResult, standalone
from .zic import ExitWatch, Node, guest_script, sim_node

LATENCY_P99_BUDGET_S = 0.005
THROUGHPUT_BUDGET_MBPS = 20.0
IDLE_CPU_BUDGET = 0.005
RSS_BUDGET_MIB = 24.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- pump alone (reference) -----------------------------------------------------------------


async def _pump_bench(megabytes: int, samples: int) -> tuple[float, list[float], float]:
    """(MB/s, one-byte latencies in s, idle CPU share) of ConsolePump between a pty and a pipe."""
    import trio

    from runphi.console.pump import ConsolePump, FdSource
    from runphi.console.uart import UartSettings, open_uart

    master, slave = os.openpty()
    device = open_uart(os.ttyname(slave), UartSettings(), container_id="bench")
    sink_r, sink_w = os.pipe()
    guest = trio.lowlevel.FdStream(os.dup(master))
    reader = trio.lowlevel.FdStream(os.dup(sink_r))
    pump = ConsolePump(FdSource(device.fd), sink_w)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            total, block, received = megabytes * 1_000_000, os.urandom(1 << 16), 0

            async def shim() -> None:
                nonlocal received
                while received < total:
                    received += len(await reader.receive_some(1 << 16))

            start = time.perf_counter()
            async with trio.open_nursery() as flow:
                flow.start_soon(shim)
                left = total
                while left:
                    chunk = block[: min(left, len(block))]
                    await guest.send_all(chunk)
                    left -= len(chunk)
            mbps = total / (time.perf_counter() - start) / 1e6

            latencies = []
            for i in range(samples):
                byte = bytes([i & 0xFF])
                start = time.perf_counter()
                await guest.send_all(byte)
                if await reader.receive_some(1) != byte:
                    raise RuntimeError("pump delivered a different byte")
                latencies.append(time.perf_counter() - start)

            usage = resource.getrusage(resource.RUSAGE_SELF)
            before, wall = usage.ru_utime + usage.ru_stime, time.perf_counter()
            await trio.sleep(0.5)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            idle = (usage.ru_utime + usage.ru_stime - before) / (time.perf_counter() - wall)
            await pump.finish(quiet=0.05)
    finally:
        await guest.aclose()
        await reader.aclose()
        for fd in (master, slave, sink_r, sink_w):
            os.close(fd)
        device.close()
    return mbps, latencies, idle


# ---- through the real monitor ---------------------------------------------------------------


class MonitorConsole:
    """A started ZIC whose monitor's stdin/stdout are pipes held here."""

    def __init__(self, node: Node, cid: str, guest: bytes) -> None:
        self.node, self.cid = node, cid
        stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, stdout_w = os.pipe()
        try:
            self.pid = node.create(cid, node.bundle(cid, guest), stdin=stdin_r, stdout=stdout_w)
        finally:
            os.close(stdin_r)
            os.close(stdout_w)
        self.watch = ExitWatch(self.pid)
        node.run("start", cid)

    def read_exactly(self, size: int, timeout: float = 30.0) -> bytes:
        """Read ``size`` bytes of guest output (fails after ``timeout``)."""
        import select

        data, deadline = bytearray(), time.monotonic() + timeout
        while len(data) < size:
            ready, _, _ = select.select([self.stdout_r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{self.cid}: {len(data)} of {size} console bytes after {timeout} s")
            chunk = os.read(self.stdout_r, min(1 << 20, size - len(data)))
            if not chunk:
                raise EOFError(f"{self.cid}: console closed after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        """Delete the container (force) and reap its monitor."""
        self.node.run("delete", "--force", self.cid, check=False)
        try:
            self.watch.wait(15.0)
        finally:
            self.node.monitors.pop(self.cid, None)
            os.close(self.stdin_w)
            os.close(self.stdout_r)


def echo_latencies(node: Node, samples: int) -> list[float]:
    """Round trips of one byte stdin -> guest echo -> stdout through the monitor."""
    zic = MonitorConsole(node, "bench-echo", guest_script("print ready\\n", "echo"))
    try:
        zic.read_exactly(len(b"ready\r\n"))
        result = []
        for i in range(samples + 5):
            byte = b"abcdefghijklmnopqrstuvwxyz"[i % 26:i % 26 + 1]
            start = time.perf_counter()
            os.write(zic.stdin_w, byte)
            if zic.read_exactly(1, timeout=10.0) != byte:
                raise RuntimeError("the echo guest returned a different byte")
            if i >= 5:  # warm-up
                result.append(time.perf_counter() - start)
        return result
    finally:
        zic.close()


END_OF_FLOOD = b"END-OF-FLOOD"


def flood_mbps(node: Node, total: int) -> tuple[float, int]:
    """(MB/s, bytes dropped) of a flooding guest through the monitor, first byte to the end marker.

    The monitor never blocks the guest's UART: if this reader falls behind by
    more than the pump's buffer, the oldest bytes are dropped (and counted),
    so the guest ends with a marker and the bytes that did arrive are counted.
    """
    import select

    zic = MonitorConsole(node, "bench-flood", guest_script(f"flood {total}", f"print {END_OF_FLOOD.decode()}", "halt"))
    try:
        zic.read_exactly(1)
        start, received, tail, deadline = time.perf_counter(), 1, b"", time.monotonic() + 120
        while not tail.endswith(END_OF_FLOOD):
            ready, _, _ = select.select([zic.stdout_r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"bench-flood: {received} bytes and no end marker after 120 s")
            chunk = os.read(zic.stdout_r, 1 << 20)
            if not chunk:
                raise EOFError(f"bench-flood: console closed after {received} bytes")
            received += len(chunk)
            tail = (tail + chunk)[-64:]
        elapsed = time.perf_counter() - start
        return received / elapsed / 1e6, total + len(END_OF_FLOOD) - received
    finally:
        zic.close()


def simulator_ceiling_mbps(node: Node, total: int) -> float:
    """MB/s of the same flood read straight from the board UART's pty: no runphi in the path.

    The cell is made by hand with the simulator's ``jailhouse`` tool (config
    from runphi's own planner), so this is what the simulator itself delivers;
    the monitor's figure cannot exceed it.
    """
    import select

    from runphi.backends.jailhouse.allocator import Allocation, Segment
    from runphi.backends.jailhouse.cellconfig import write_cell
    from runphi.backends.jailhouse.plan import plan_cell
    from runphi.backends.jailhouse.platform import MiB, load_platform
    from runphi.console.uart import UartSettings, open_uart

    from .cellgen import TEMPLATES

    platform = load_platform("sim-qemu-arm64", TEMPLATES)
    allocation = Allocation(container_id="bench-raw", cpus=frozenset({1}), ram=Segment(0x50000000, 16 * MiB + 0x10000),
                            main_ram_size=16 * MiB, uart_slot=0)
    config = plan_cell(platform, allocation, None, allocation.container_id)
    cell, image = node.base / "raw.cell", node.base / "raw.bin"
    cell.write_bytes(write_cell(config, platform.profile))
    image.write_bytes(guest_script(f"flood {total}", "halt"))
    sim = node.sim
    sim.jailhouse("cell", "create", cell).check()
    try:
        sim.jailhouse("cell", "load", "bench-raw", image, "-a", "0x70000000").check()
        device = open_uart(str(sim.uart(1)), UartSettings(), container_id="bench-raw")
        try:
            sim.jailhouse("cell", "start", "bench-raw").check()
            received, first, deadline = 0, 0.0, time.monotonic() + 120
            while received < total:
                ready, _, _ = select.select([device.fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"the simulator delivered {received} of {total} bytes")
                received += len(os.read(device.fd, 1 << 20))
                first = first or time.perf_counter()
            return total / (time.perf_counter() - first) / 1e6
        finally:
            device.close()
    finally:
        sim.jailhouse("cell", "destroy", "bench-raw")


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    children = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    return own, children


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def trio_floor_rss_mib() -> float:
    """VmRSS of a bare interpreter that has imported trio: what any trio monitor starts from."""
    import subprocess

    code = ("import trio\nfor line in open('/proc/self/status'):\n"
            "    if line.startswith('VmRSS:'): print(int(line.split()[1]) / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def idle_monitor(node: Node, window: float) -> tuple[float, float, float]:
    """(own CPU share, children's CPU share, RSS MiB) of the monitor of an idle ZIC over ``window`` s."""
    zic = MonitorConsole(node, "bench-idle", guest_script("print ready\\n", "halt"))
    try:
        zic.read_exactly(len(b"ready\r\n"))
        own0, children0 = _cpu_seconds(zic.pid)
        start = time.perf_counter()
        time.sleep(window)  # the measurement window itself, not a synchronisation
        own1, children1 = _cpu_seconds(zic.pid)
        elapsed = time.perf_counter() - start
        return (own1 - own0) / elapsed, (children1 - children0) / elapsed, _rss_mib(zic.pid)
    finally:
        zic.close()


def run(options: Options) -> SuiteResult:
    import trio

    result = SuiteResult("console")
    mbps, latencies, idle = trio.run(_pump_bench, options.count(50, 2), options.count(2000, 50))
    result.add(Series("pump only: byte latency", tuple(latencies)))
    result.info["pump only"] = (f"{mbps:.1f} MB/s, latency p99 {Series('', tuple(latencies)).percentile(0.99) * 1e3:.3f} ms, "
                                f"idle CPU {idle * 100:.2f} %")

    with sim_node() as node:
        round_trips = result.add(Series("monitor: echo round trip", tuple(echo_latencies(node, options.count(500, 20)))))
        total = options.count(50, 2) * 1_000_000
        floods = [flood_mbps(node, total) for _ in range(options.count(3, 1))]
        flows = [mbps for mbps, _ in floods]
        result.add(Series("monitor: flood throughput", tuple(flows), unit="MB/s"))
        result.info["flood bytes dropped by the monitor (reader behind)"] = ", ".join(str(d) for _, d in floods)
        ceiling = [simulator_ceiling_mbps(node, total) for _ in range(options.count(3, 1))]
        result.add(Series("simulator alone: flood from the pty", tuple(ceiling), unit="MB/s"))
        own, children, rss = idle_monitor(node, options.count(10, 1))
    floor_rss = trio_floor_rss_mib()
    p99 = round_trips.percentile(0.99)
    result.info["monitor echo round trip"] = (f"p50 {round_trips.percentile(0.5) * 1e3:.3f} ms, "
                                              f"p99 {p99 * 1e3:.3f} ms")
    result.info["idle monitor"] = (f"own CPU {own * 100:.3f} %, its tools' CPU {children * 100:.3f} % "
                                   f"(hypervisor probe; the simulator's tool is Python), RSS {rss:.1f} MiB "
                                   f"(python -c 'import trio': {floor_rss:.1f} MiB)")
    result.budgets += [
        Budget("guest->pipe p99 (echo round trip, upper bound)", p99 * 1e3, LATENCY_P99_BUDGET_S * 1e3, "<=", "ms"),
        Budget("throughput through the monitor", Series("", tuple(flows)).median, THROUGHPUT_BUDGET_MBPS, ">=",
               "MB/s"),
        Budget("idle monitor CPU (own)", own * 100, IDLE_CPU_BUDGET * 100, "<=", "%",
               f"over {options.count(10, 1)} s"),
        Budget("monitor RSS", rss, RSS_BUDGET_MIB, "<=", "MiB"),
    ]
    return result


if __name__ == "__main__":
    sys.exit(standalone("console", run))
