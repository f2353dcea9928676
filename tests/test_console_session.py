"""A monitor's whole console, the way the monitor drives it: real pty UART, real pipes."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from runphi.console.ringlog import read_console_log, writer_alive
from runphi.console.session import ConsoleSession
from runphi.console.stats import read_console_stats
from runphi.console.uart import UartSettings, open_uart

TEST_TIMEOUT = 30


@pytest.fixture
async def board():
    master, slave = os.openpty()
    device = open_uart(os.ttyname(slave), UartSettings(), container_id="zic1")
    guest = trio.lowlevel.FdStream(os.dup(master))
    yield guest, device
    await guest.aclose()
    device.close()
    os.close(master)
    os.close(slave)


@pytest.fixture
async def stdio():
    """The shim's pipes: (monitor's stdin fd, shim's stdin writer, monitor's stdout fd, shim's reader)."""
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    shim_out = trio.lowlevel.FdStream(stdout_r)
    shim_in = trio.lowlevel.FdStream(stdin_w)
    yield stdin_r, shim_in, stdout_w, shim_out
    await shim_out.aclose()
    await shim_in.aclose()
    os.close(stdin_r)
    os.close(stdout_w)


async def read_exactly(stream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, f"stream ended after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


async def test_monitor_lifecycle_streams_logs_and_drains_after_cancel(board, stdio, tmp_path):
    guest, device = board
    stdin_fd, shim_in, stdout_fd, shim_out = stdio
    session = ConsoleSession(console_fd=device.fd, output_fd=stdout_fd, input_fd=stdin_fd,
                             log_dir=str(tmp_path))
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as monitor:
            await monitor.start(session.run)
            banner, typed, answer = b"*** Booting Zephyr OS ***\r\n", b"uptime\r", b"uptime\r\n42 s\r\n"
            await guest.send_all(banner)
            assert await read_exactly(shim_out, len(banner)) == banner
            await shim_in.send_all(typed)
            assert await read_exactly(guest, len(typed)) == typed
            await guest.send_all(answer)
            assert await read_exactly(shim_out, len(answer)) == answer
            # The cell watcher saw the cell stop: the monitor cancels its nursery ...
            monitor.cancel_scope.cancel()
        # ... while the guest's last words are still on the line.
        await guest.send_all(b"system off\r\n")
        stats = await session.drain(quiet=0.1, deadline=5)
    assert await read_exactly(shim_out, 12) == b"system off\r\n"
    total = len(banner) + len(answer) + 12
    assert (stats.read_bytes, stats.written_bytes, stats.dropped_bytes, stats.lost_bytes) == (
        total, total, 0, 0)
    assert read_console_log(tmp_path) == (
        b"*** Booting Zephyr OS ***\r\nuptime\r\n42 s\r\nsystem off\r\n")
    assert not writer_alive(tmp_path)  # `logs -f` followers end now
    assert session.log_error is None


async def test_output_queued_during_a_stall_is_flushed_by_drain(board, stdio, tmp_path):
    guest, device = board
    _, _, stdout_fd, shim_out = stdio
    session = ConsoleSession(console_fd=device.fd, output_fd=stdout_fd, input_fd=None)
    payload = bytes(range(256)) * 1024  # 256 KiB: more than the pipe holds
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as monitor:
            await monitor.start(session.run)
            await guest.send_all(payload)
            monitor.cancel_scope.cancel()
        async with trio.open_nursery() as after:
            # The shim reads again only now; drain must deliver the backlog.
            received = []
            after.start_soon(lambda: _collect(shim_out, len(payload), received))
            stats = await session.drain(quiet=0.1, deadline=10)
    assert received == [payload]
    assert stats.dropped_bytes == stats.lost_bytes == 0


async def _collect(stream, count: int, into: list) -> None:
    into.append(await read_exactly(stream, count))


async def test_log_that_cannot_be_kept_does_not_fail_the_container(board, stdio, tmp_path):
    guest, device = board
    _, _, stdout_fd, shim_out = stdio
    missing = tmp_path / "gone"
    session = ConsoleSession(console_fd=device.fd, output_fd=stdout_fd, input_fd=None,
                             log_dir=str(missing))
    assert session.log_error is not None and str(missing) in session.log_error
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as monitor:
            await monitor.start(session.run)
            await guest.send_all(b"ok\r\n")
            assert await read_exactly(shim_out, 4) == b"ok\r\n"
            await session.drain(quiet=0.05)


async def test_hypervisor_console_session_is_output_only_and_shows_only_its_cells_lines(stdio, tmp_path):
    """The ring's bytes before the cell's ``Created cell`` line and the hypervisor's own lines
    are filtered out; a missed-bytes line counts as dropped; stdin is never pumped."""
    ring = tmp_path / "hv"
    ring.write_bytes(b"Started cell \"older\"\nan older tenant's line\n")
    ring_fd = os.open(ring, os.O_RDONLY | os.O_NONBLOCK)
    stdin_fd, shim_in, stdout_fd, shim_out = stdio
    try:
        session = ConsoleSession(console_fd=ring_fd, output_fd=stdout_fd, input_fd=stdin_fd,
                                 source_kind="hypervisor", cell_name="zic1")
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as monitor:
                await monitor.start(session.run)
                with ring.open("ab") as out:
                    out.write(b'Created cell "zic1"\nPage pool usage after cell creation: mem 1/2, remap 0/1\n'
                              b'Cell "zic1" can be loaded\nStarted cell "zic1"\nHello from zic1\r\n'
                              b"<missed 100 bytes of console log>\nlast words\r\n")
                assert await read_exactly(shim_out, 29) == b"Hello from zic1\r\nlast words\r\n"
                stats = await session.drain(quiet=0.05, deadline=5)
        assert stats.dropped_bytes == 100
        assert session.input_stats is None  # nothing was ever pumped towards a read-only ring
    finally:
        os.close(ring_fd)


async def test_drops_are_reported_and_published_for_events(board, stdio, tmp_path):
    guest, device = board
    _, _, stdout_fd, shim_out = stdio
    reports = []
    session = ConsoleSession(console_fd=device.fd, output_fd=stdout_fd, input_fd=None,
                             log_dir=str(tmp_path), buffer_limit=16 * 1024,
                             on_drops=lambda stats: reports.append(stats.dropped_bytes))
    assert read_console_stats(tmp_path) is None
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as monitor:
            await monitor.start(session.run)
            # Nobody reads stdout: the pipe fills, then the buffer, then bytes drop.
            await guest.send_all(bytes(512 * 1024))
            # Wait on the real event: the pump reports its first drop.
            await session.wait_dropped(0)
            await trio.testing.wait_all_tasks_blocked()
            published = read_console_stats(tmp_path)
            final = await session.drain(quiet=0.1, deadline=1)
    assert reports and reports[0] > 0
    assert published is not None and published.dropped_bytes > 0
    assert read_console_stats(tmp_path) == final
    assert final.read_bytes == 512 * 1024
    assert final.read_bytes == final.written_bytes + final.dropped_bytes + final.lost_bytes
