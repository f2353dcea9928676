"""The monitor's console pumps against real ptys (the "board UART") and real pipes.

The test plays the guest on the master side of a pty, exactly how the simulator
exposes a cell UART; runphi opens the slave path with pyserial (open_uart).
The sink is a real pipe, as containerd's shim gives the monitor.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import trio
import trio.testing

from runphi.console.pump import ConsolePump, FdSource, PolledSource, pump_input
from runphi.console.uart import UartSettings, open_uart

# Generous upper bounds so a loaded 2-core CI machine never flakes; the pumps
# themselves are expected to take a small fraction of these.
TEST_TIMEOUT = 30


class BoardUart:
    """A real pty: the test is the guest on the master; runphi opens the slave path."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        self.path = os.ttyname(self._slave)
        self.guest = trio.lowlevel.FdStream(os.dup(self.master))
        self.device = open_uart(self.path, UartSettings(), container_id="zic-test")

    async def hang_up(self) -> None:
        """The board UART disappears (simulator down): close every master copy."""
        await self.guest.aclose()
        os.close(self.master)
        self.master = -1

    async def aclose(self) -> None:
        if self.master >= 0:
            await self.guest.aclose()
            os.close(self.master)
        os.close(self._slave)
        self.device.close()


@pytest.fixture
async def uart():
    board = BoardUart()
    yield board
    await board.aclose()


@pytest.fixture
async def other_uart():
    board = BoardUart()
    yield board
    await board.aclose()


class PipeSink:
    """A real pipe: the pump writes ``fd``; the test (the shim) reads ``reader``."""

    def __init__(self) -> None:
        read_end, self.fd = os.pipe()
        self.reader = trio.lowlevel.FdStream(read_end)

    async def read_exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = await self.reader.receive_some(count - len(data))
            assert chunk, f"sink closed after {len(data)} of {count} bytes"
            data += chunk
        return bytes(data)

    async def read_to_eof(self) -> bytes:
        data = bytearray()
        while chunk := await self.reader.receive_some(1 << 16):
            data += chunk
        return bytes(data)

    def close_writer(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def aclose(self) -> None:
        self.close_writer()
        await self.reader.aclose()


@pytest.fixture
async def sink():
    pipe = PipeSink()
    yield pipe
    await pipe.aclose()


def binary_payload() -> bytes:
    """Every byte value, including NUL, CR, LF, XON/XOFF, ESC and the high half."""
    everything = bytes(range(256))
    return b"\x00\r\n\r\r\x00" + everything * 8 + bytes(reversed(everything)) + b"\xff\x00\r"


async def test_binary_stream_arrives_unchanged(uart, sink):
    payload = binary_payload()
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            await uart.guest.send_all(payload)
            assert await sink.read_exactly(len(payload)) == payload
            stats = await pump.finish(quiet=0.05, deadline=5)
    assert (stats.read_bytes, stats.written_bytes, stats.dropped_bytes, stats.lost_bytes) == (
        len(payload), len(payload), 0, 0)


async def test_first_byte_printed_before_the_pump_runs_is_kept(uart, sink):
    # The UART was opened (by create) before the guest started: its first byte
    # waits in the line until the monitor's pump exists.
    await uart.guest.send_all(b"!first line\r\n")
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            assert await sink.read_exactly(13) == b"!first line\r\n"
            await pump.finish(quiet=0.05)


async def test_ten_megabytes_with_a_reader_that_keeps_up(uart, sink):
    payload = random.Random(7).randbytes(10 * 1024 * 1024)
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd)
    received = hashlib.sha256()
    count = 0

    async def shim_reads() -> None:
        nonlocal count
        while count < len(payload):
            chunk = await sink.reader.receive_some(1 << 16)
            assert chunk
            received.update(chunk)
            count += len(chunk)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            async with trio.open_nursery() as traffic:
                traffic.start_soon(shim_reads)
                await uart.guest.send_all(payload)
            await pump.finish(quiet=0.05)
    assert count == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert pump.stats.dropped_bytes == 0


async def test_stalled_reader_never_stalls_the_uart(uart, sink):
    limit = 256 * 1024
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd, buffer_limit=limit)
    sent = bytearray()
    peak_buffered = 0
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            # Nobody reads the sink for a few seconds while the guest floods its UART.
            # The guest's writes only complete because the pump keeps draining.
            with trio.move_on_after(3):
                block = 0
                while True:
                    chunk = block.to_bytes(8, "big") * 512
                    await uart.guest.send_all(chunk)
                    sent += chunk
                    block += 1
                    peak_buffered = max(peak_buffered, pump.buffered_bytes)
            assert len(sent) > 4 * limit
            # The cell stops while the sink is still stalled: finish must not hang.
            started = trio.current_time()
            stats = await pump.finish(quiet=0.1, deadline=1.0)
            finish_took = trio.current_time() - started
    assert finish_took < 1.0 + 2.0  # the deadline plus scheduling slack on a busy machine
    assert peak_buffered <= limit
    assert stats.read_bytes == len(sent)
    assert stats.dropped_bytes > 0
    assert stats.read_bytes == stats.written_bytes + stats.dropped_bytes + stats.lost_bytes
    sink.close_writer()
    delivered = await sink.read_to_eof()
    assert len(delivered) == stats.written_bytes
    # What the stalled pipe took is the start of the stream, unchanged.
    assert delivered == bytes(sent[: len(delivered)])


async def test_after_a_stall_the_newest_output_is_delivered(uart, sink):
    limit = 64 * 1024
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd, buffer_limit=limit)
    stream = random.Random(3).randbytes(2 * 1024 * 1024)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            tail = b"\r\nlast words\r\n"
            # Completes although nobody reads the sink: the pump drains the UART.
            await uart.guest.send_all(stream + tail)
            delivered = bytearray()
            while not delivered.endswith(tail):  # the shim finally catches up
                delivered += await sink.reader.receive_some(1 << 16)
            stats = await pump.finish(quiet=0.05)
    assert stats.dropped_bytes > 0
    assert bytes(delivered).endswith(stream[-limit // 2:] + tail)
    assert len(delivered) == stats.written_bytes


async def test_cancellation_stops_a_stalled_pump_at_once(uart, sink):
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd, buffer_limit=4096)
    with trio.fail_after(TEST_TIMEOUT):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await uart.guest.send_all(bytes(1024 * 1024))
                scope.cancel()
    assert scope.cancelled_caught


async def test_sink_gone_keeps_draining_the_uart(uart, sink):
    await sink.reader.aclose()  # the shim went away: writes get EPIPE
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            await uart.guest.send_all(bytes(512 * 1024))  # only completes if drained
            stats = await pump.finish(quiet=0.05)
    assert stats.sink_closed is not None and "Broken pipe" in stats.sink_closed
    assert stats.read_bytes == 512 * 1024
    assert stats.lost_bytes == 512 * 1024
    assert stats.written_bytes == 0


async def test_uart_that_disappears_ends_the_stream_cleanly(uart, sink):
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            await uart.guest.send_all(b"goodbye\r\n")
            assert await sink.read_exactly(9) == b"goodbye\r\n"
            await uart.hang_up()
        # run() returned by itself: the source ended and the buffer was flushed.
    assert pump.stats.source_ended is not None
    assert pump.stats.written_bytes == 9


async def test_finish_drains_output_printed_just_before_the_cell_stopped(uart, sink):
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            await uart.guest.send_all(b"Shutting down...\r\n")
            stats = await pump.finish(quiet=0.2, deadline=5)
    sink.close_writer()
    assert await sink.read_to_eof() == b"Shutting down...\r\n"
    assert stats.lost_bytes == 0


async def test_sink_that_epoll_cannot_watch(uart):
    # --null-io gives the monitor /dev/null as stdout: it is written, never waited on.
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        pump = ConsolePump(FdSource(uart.device.fd), devnull)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await uart.guest.send_all(bytes(300 * 1024))
                stats = await pump.finish(quiet=0.1, deadline=10)
        assert stats.written_bytes == 300 * 1024 and stats.dropped_bytes == 0
    finally:
        os.close(devnull)


async def test_two_zics_never_see_each_others_bytes(uart, other_uart):
    sinks = [PipeSink(), PipeSink()]
    boards = [uart, other_uart]
    payloads = [b"A" * 200_000 + b"end of cell A\r\n", b"B" * 200_000 + b"end of cell B\r\n"]
    pumps = [ConsolePump(FdSource(b.device.fd), s.fd) for b, s in zip(boards, sinks)]
    results: list[bytes] = [b"", b""]

    async def shim(i: int) -> None:
        results[i] = await sinks[i].read_exactly(len(payloads[i]))

    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for pump in pumps:
                    await nursery.start(pump.run)
                async with trio.open_nursery() as readers:
                    for i in range(2):
                        readers.start_soon(shim, i)
                        readers.start_soon(boards[i].guest.send_all, payloads[i])
                for pump in pumps:
                    await pump.finish(quiet=0.05)
        assert results == payloads
        for sink_ in sinks:
            sink_.close_writer()
            assert await sink_.read_to_eof() == b""
    finally:
        for sink_ in sinks:
            await sink_.aclose()


async def test_stdin_reaches_the_uart_unchanged_and_its_eof_ends_nothing(uart, sink):
    stdin_read, stdin_write = os.pipe()
    typed = b"help\r\x03\x00\xff\x1b[A\n"
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd)
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                input_done = trio.Event()
                input_result = []

                async def input_pump() -> None:
                    input_result.append(await pump_input(stdin_read, uart.device.fd))
                    input_done.set()

                nursery.start_soon(input_pump)
                os.write(stdin_write, typed)
                os.close(stdin_write)
                stdin_write = -1
                got = bytearray()
                while len(got) < len(typed):
                    got += await uart.guest.receive_some(1024)
                assert bytes(got) == typed
                await input_done.wait()
                assert input_result[0].ended == "end of stdin"
                assert input_result[0].bytes == len(typed)
                # Output still flows after stdin's EOF.
                await uart.guest.send_all(b"still here\r\n")
                assert await sink.read_exactly(12) == b"still here\r\n"
                await pump.finish(quiet=0.05)
    finally:
        os.close(stdin_read)
        if stdin_write >= 0:
            os.close(stdin_write)


async def test_polled_source_pumps_what_the_ring_gains(tmp_path, sink):
    ring = tmp_path / "hv-console"
    ring.write_bytes(b"")
    ring_fd = os.open(ring, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pump = ConsolePump(PolledSource(ring_fd, interval=0.01), sink.fd)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                printed = b'Started cell "zic-test"\nhello\r\n'
                with ring.open("ab") as out:
                    out.write(printed)
                assert await sink.read_exactly(len(printed)) == printed
                await pump.finish(quiet=0.05)
    finally:
        os.close(ring_fd)


async def test_cancelling_and_restarting_the_pump_loses_no_byte(uart, sink):
    # The monitor may cancel run() at any point and call finish() later: every
    # byte must still arrive once, in order.
    payload = random.Random(11).randbytes(1024 * 1024)
    pump = ConsolePump(FdSource(uart.device.fd), sink.fd, buffer_limit=2 * len(payload))
    received = bytearray()

    async def shim_reads() -> None:
        while chunk := await sink.reader.receive_some(1 << 16):
            received.extend(chunk)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uart.guest.send_all, payload)
            nursery.start_soon(shim_reads)
            for attempt in range(40):
                with trio.move_on_after(0.001 * (attempt % 5)):
                    await pump.run()
            stats = await pump.finish(quiet=0.3, deadline=30)
            sink.close_writer()  # the monitor exits: the shim sees EOF
    assert bytes(received) == payload
    assert (stats.read_bytes, stats.written_bytes, stats.lost_bytes) == (len(payload),) * 2 + (0,)


async def test_input_waits_for_a_slow_guest_and_drops_nothing(uart):
    # A paste much larger than the UART's buffer while the guest is not reading:
    # the input pump waits (back-pressure to the shim) instead of dropping.
    stdin_read, stdin_write = os.pipe()
    pasted = random.Random(5).randbytes(512 * 1024)
    shim_stdin = trio.lowlevel.FdStream(stdin_write)
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                result = []

                async def input_pump() -> None:
                    result.append(await pump_input(stdin_read, uart.device.fd))

                nursery.start_soon(input_pump)

                async def shim_pastes() -> None:
                    await shim_stdin.send_all(pasted)
                    await shim_stdin.aclose()

                nursery.start_soon(shim_pastes)
                # The guest is busy: nothing reads the UART until every task is blocked.
                await trio.testing.wait_all_tasks_blocked()
                got = bytearray()
                while len(got) < len(pasted):
                    got += await uart.guest.receive_some(1 << 16)
        assert bytes(got) == pasted
        assert result[0].bytes == len(pasted) and result[0].ended == "end of stdin"
    finally:
        os.close(stdin_read)
