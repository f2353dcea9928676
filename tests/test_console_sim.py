"""Console building blocks against the Jailhouse simulator: real cells, real UART ptys.

Each test does what ``create`` and the monitor do: open the cell's UART with
``open_uart`` before ``cell start``, then pump it into a pipe (the shim's
stdout) or a pty whose master went over a console socket (``ctr run -t``).
Script-engine guests give exact, fast byte streams; the QEMU engine runs our
real aarch64 ``echo`` inmate.
"""

from __future__ import annotations

import array
import hashlib
import os
import shutil
import socket

import pytest
import trio

from runphi.console.pump import ConsolePump, FdSource
from runphi.console.session import ConsoleSession
from runphi.console.terminal import open_console_pty, send_console_master
from runphi.console.uart import UartSettings, open_uart
from tools.jailhouse_sim.testing import SimBoard
from tools.jailhouse_sim.tests import cells

SCRIPT = "#!jailhouse-sim-inmate\n"
LOAD_ADDRESS = "0x70000000"
TEST_TIMEOUT = 60


@pytest.fixture
def sim(tmp_path):
    with SimBoard.running(tmp_path / "sim") as board:
        yield board


@pytest.fixture
def qemu_sim(tmp_path):
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 not installed (Debian: qemu-system-arm)")
    from tools.inmates.build import missing_tools

    if (why := missing_tools()) is not None:
        pytest.skip(f"cannot build the aarch64 inmates: {why}")
    with SimBoard.running(tmp_path / "sim", engine="qemu") as board:
        yield board


async def jailhouse(sim: SimBoard, *args) -> None:
    """Run the simulator's ``jailhouse`` tool without blocking the pumps."""
    done = await trio.run_process([str(sim.jailhouse_path), *map(str, args)], cwd=sim.root,
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, f"jailhouse {' '.join(map(str, args))}: {done.stderr.decode()}"


async def create_and_load(sim: SimBoard, tmp_path, name: str, image: bytes | os.PathLike,
                          *, cpu: int = 1, uart: int = 1) -> None:
    cell = cells.write(tmp_path, cells.runphi_cell(name, {cpu}, uart=uart))
    if isinstance(image, bytes):
        path = tmp_path / f"{name}.img"
        path.write_bytes(image)
        image = path
    await jailhouse(sim, "cell", "create", cell)
    await jailhouse(sim, "cell", "load", name, image, "-a", LOAD_ADDRESS)


class Pipe:
    def __init__(self) -> None:
        read_end, self.write_fd = os.pipe()
        self.reader = trio.lowlevel.FdStream(read_end)

    async def read_exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = await self.reader.receive_some(count - len(data))
            assert chunk, f"pipe closed after {len(data)} of {count} bytes"
            data += chunk
        return bytes(data)

    async def aclose(self) -> None:
        os.close(self.write_fd)
        await self.reader.aclose()


@pytest.fixture
async def pipe():
    p = Pipe()
    yield p
    await p.aclose()


async def test_first_bytes_printed_at_start_are_kept_exactly(sim, tmp_path, pipe):
    script = SCRIPT + "print !\\x00\\r\\xff\\x80\\x1b[1mboot\\n\nshutdown\n"
    await create_and_load(sim, tmp_path, "early", script.encode())
    uart = open_uart(str(sim.uart(1)), UartSettings(), container_id="early")  # create does this
    try:
        await jailhouse(sim, "cell", "start", "early")
        # The guest printed and powered off before any pump existed.
        sim.wait_state(1, "shut down", timeout=TEST_TIMEOUT)
        pump = ConsolePump(FdSource(uart.fd), pipe.write_fd)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as monitor:
                await monitor.start(pump.run)
                expected = b"!\x00\r\xff\x80\x1b[1mboot\r\n"
                assert await pipe.read_exactly(len(expected)) == expected
                stats = await pump.finish(quiet=0.1)
        assert stats.read_bytes == len(expected)
    finally:
        uart.close()


async def test_ten_megabyte_flood_arrives_intact(sim, tmp_path, pipe):
    size = 10 * 1024 * 1024
    pattern = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    expected = hashlib.sha256((pattern * (size // len(pattern) + 1))[:size]).hexdigest()
    await create_and_load(sim, tmp_path, "flood", (SCRIPT + f"flood {size} {pattern.decode()}\n").encode())
    uart = open_uart(str(sim.uart(1)), UartSettings(), container_id="flood")
    received = hashlib.sha256()
    count = 0

    async def shim_reads() -> None:
        nonlocal count
        while count < size:
            chunk = await pipe.reader.receive_some(1 << 16)
            assert chunk
            received.update(chunk)
            count += len(chunk)

    try:
        pump = ConsolePump(FdSource(uart.fd), pipe.write_fd)
        with trio.fail_after(180):
            async with trio.open_nursery() as monitor:
                await monitor.start(pump.run)
                async with trio.open_nursery() as traffic:
                    traffic.start_soon(shim_reads)
                    await jailhouse(sim, "cell", "start", "flood")
                stats = await pump.finish(quiet=0.1)
    finally:
        uart.close()
    assert count == size
    assert received.hexdigest() == expected
    assert (stats.read_bytes, stats.dropped_bytes) == (size, 0)


async def test_stalled_reader_cannot_hold_up_the_end_of_the_cell(sim, tmp_path, pipe):
    # Nobody reads the container's stdout; the guest floods its UART for seconds;
    # the cell is shut down: the monitor's console still finishes by its deadline.
    await create_and_load(sim, tmp_path, "stall", (SCRIPT + "flood 1000000000\n").encode())
    uart = open_uart(str(sim.uart(1)), UartSettings(), container_id="stall")
    limit = 256 * 1024
    try:
        pump = ConsolePump(FdSource(uart.fd), pipe.write_fd, buffer_limit=limit)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as monitor:
                await monitor.start(pump.run)
                await jailhouse(sim, "cell", "start", "stall")
                peak = 0
                with trio.move_on_after(3):
                    while True:
                        await trio.sleep(0.05)  # sampling the buffer, not synchronising
                        peak = max(peak, pump.buffered_bytes)
                await jailhouse(sim, "cell", "shutdown", "stall")
                before = trio.current_time()
                stats = await pump.finish(quiet=0.1, deadline=1.0)
                took = trio.current_time() - before
    finally:
        uart.close()
    assert took < 1.0 + 2.0  # deadline plus scheduling slack
    assert peak <= limit
    assert stats.read_bytes > 4 * limit  # the UART kept being drained
    assert stats.dropped_bytes > 0
    assert stats.read_bytes == stats.written_bytes + stats.dropped_bytes + stats.lost_bytes


async def test_two_zics_never_see_each_others_bytes(sim, tmp_path):
    guests = {
        "alpha": (1, 1, b"alpha-" * 20000),
        "omega": (2, 3, b"OMEGA!" * 20000),
    }
    pipes = {name: Pipe() for name in guests}
    uarts = {}
    received = {}
    try:
        for name, (cpu, uart_index, text) in guests.items():
            await create_and_load(sim, tmp_path, name,
                                  (SCRIPT + f"flood {len(text)} {text[:6].decode()}\nprint <end>\\n\n").encode(),
                                  cpu=cpu, uart=uart_index)
            uarts[name] = open_uart(str(sim.uart(uart_index)), UartSettings(), container_id=name)
        pumps = {name: ConsolePump(FdSource(uarts[name].fd), pipes[name].write_fd) for name in guests}

        async def shim(name: str) -> None:
            expected = len(guests[name][2]) + len(b"<end>\r\n")
            received[name] = await pipes[name].read_exactly(expected)

        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as monitors:
                for pump in pumps.values():
                    await monitors.start(pump.run)
                async with trio.open_nursery() as traffic:
                    for name in guests:
                        traffic.start_soon(shim, name)
                        traffic.start_soon(jailhouse, sim, "cell", "start", name)
                for pump in pumps.values():
                    await pump.finish(quiet=0.1)
    finally:
        for device in uarts.values():
            device.close()
        for p in pipes.values():
            await p.aclose()
    for name, (_, _, text) in guests.items():
        assert received[name] == text + b"<end>\r\n"


def shim_accepts_master(listener: socket.socket) -> int:
    conn, _ = listener.accept()
    with conn:
        data, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    assert data and len(fds) == 1
    return fds[0]


@pytest.mark.qemu
async def test_tty_session_with_the_qemu_echo_inmate(qemu_sim, tmp_path):
    from tools.inmates.build import image_path

    image = image_path("echo")
    await create_and_load(qemu_sim, tmp_path, "echo", image)
    # --- create: UART first, then the pty; the master goes to the shim.
    uart = open_uart(str(qemu_sim.uart(1)), UartSettings(), container_id="echo")
    sock_path = str(tmp_path / "pty.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    pty = open_console_pty(height=40, width=100)
    send_console_master(sock_path, pty.master, container_id="echo")
    os.close(pty.master)
    shim_master = shim_accepts_master(listener)
    listener.close()
    assert os.isatty(shim_master)
    shim = trio.lowlevel.FdStream(shim_master)
    seen = bytearray()

    async def shim_waits_for(text: bytes) -> None:
        while text not in seen:
            chunk = await shim.receive_some(4096)
            assert chunk, f"terminal closed; saw {bytes(seen)!r}"
            seen.extend(chunk)

    try:
        session = ConsoleSession(console_fd=uart.fd, output_fd=pty.slave, input_fd=pty.slave,
                                 log_dir=str(tmp_path))
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as monitor:
                await monitor.start(session.run)
                await jailhouse(qemu_sim, "cell", "start", "echo")
                await shim_waits_for(b"echo: type a line, 'exit' powers off\r\n> ")
                assert seen.startswith(b"Hello from runphi inmate echo\r\n")
                seen.clear()
                await shim.send_all(b"hello from ctr run -t\r")
                await shim_waits_for(b"hello from ctr run -t\r\n> ")
                assert bytes(seen) == b"hello from ctr run -t\r\n> "  # no local echo, no \r\r\n
                await shim.send_all(b"exit\r")
                await shim_waits_for(b"echo: bye\r\n")
                qemu_sim.wait_state(1, "shut down", timeout=TEST_TIMEOUT)
                stats = await session.drain(quiet=0.1)
                monitor.cancel_scope.cancel()
        assert stats.dropped_bytes == stats.lost_bytes == 0
        log = (tmp_path / "console.log").read_bytes()
        assert log.startswith(b"Hello from runphi inmate echo\r\n")
        assert log.endswith(b"hello from ctr run -t\r\n> echo: bye\r\n")
    finally:
        await shim.aclose()
        os.close(pty.slave)
        uart.close()
