"""Console pump throughput and guest-byte -> sink latency, through real file descriptors.

    python -m tools.bench.console [--megabytes 50] [--samples 2000]

The "board UART" is a real pty (the guest writes the master, runphi's
``open_uart`` opens the slave, exactly like the simulator's UARTs); the sink is
a real pipe read by a stand-in for the shim. Reported:

* throughput: MB/s moved guest -> pipe while the reader keeps up, with the
  pty line discipline in the path (a 115200-baud UART carries 0.0115 MB/s);
* latency: time from the guest's ``write()`` of one byte to the shim's
  ``read()`` returning it, p50/p99/max over ``--samples`` round trips, the
  pump otherwise idle (the interactive case: a keystroke echo, a log line);
* CPU of the idle pump: process CPU seconds consumed while the pump waits
  one second with nothing to do.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import trio

from runphi.console.pump import ConsolePump, FdSource
from runphi.console.uart import UartSettings, open_uart


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def throughput(pump_source_fd: int, guest, sink_fd: int, reader, total: int) -> float:
    """MB/s for ``total`` bytes from guest write to shim read."""
    block = os.urandom(1 << 16)
    received = 0

    async def shim() -> None:
        nonlocal received
        while received < total:
            received += len(await reader.receive_some(1 << 16))

    async def guest_prints() -> None:
        left = total
        while left:
            chunk = block[: min(left, len(block))]
            await guest.send_all(chunk)
            left -= len(chunk)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shim)
        nursery.start_soon(guest_prints)
    return total / (time.perf_counter() - start) / 1e6


async def latency_samples(guest, reader, samples: int) -> list[float]:
    """One-byte round trips guest write -> pump -> pipe -> shim read, pump otherwise idle.

    The "shim" reads in the same trio loop as the pump, so each sample also
    includes one extra wake-up: the numbers are an upper bound for the pump.
    """
    result = []
    for i in range(samples):
        byte = bytes([i & 0xFF])
        start = time.perf_counter()
        await guest.send_all(byte)
        assert await reader.receive_some(1) == byte
        result.append(time.perf_counter() - start)
    return result


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def bench(megabytes: int, samples: int) -> None:
    master, slave = os.openpty()
    device = open_uart(os.ttyname(slave), UartSettings(), container_id="bench")
    sink_r, sink_w = os.pipe()
    guest = trio.lowlevel.FdStream(os.dup(master))
    reader = trio.lowlevel.FdStream(os.dup(sink_r))
    pump = ConsolePump(FdSource(device.fd), sink_w)
    async with trio.open_nursery() as nursery:
        await nursery.start(pump.run)
        mbps = await throughput(device.fd, guest, sink_w, reader, megabytes * 1_000_000)
        print(f"throughput: {mbps:.1f} MB/s over {megabytes} MB "
              f"({mbps / 0.0115:.0f}x a 115200-baud UART)")

        waits = await latency_samples(guest, reader, samples)
        ms = [w * 1e3 for w in waits]
        print(f"latency guest write -> shim read: p50 {percentile(ms, 0.5):.3f} ms, "
              f"p99 {percentile(ms, 0.99):.3f} ms, max {max(ms):.3f} ms over {samples} bytes")

        before = cpu_seconds()
        await trio.sleep(1.0)
        print(f"idle pump CPU: {(cpu_seconds() - before) * 1e3:.2f} ms per second")
        print(f"dropped bytes: {pump.stats.dropped_bytes}")
        await pump.finish(quiet=0.05)
    await guest.aclose()
    await reader.aclose()
    for fd in (master, slave, sink_r, sink_w):
        os.close(fd)
    device.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    trio.run(bench, args.megabytes, args.samples)


if __name__ == "__main__":
    main()
