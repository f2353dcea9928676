"""The simulator's hypervisor console as runphi reads it (issue #22): ``<sim root>/dev/jailhouse``.

The simulator cannot make a character device, so ``dev/jailhouse`` is a unix stream
socket; each connection is one open file of ``/dev/jailhouse`` with its own read
position. The reader here does what runphi does: connect, then non-blocking reads
(``os.read`` raising ``BlockingIOError`` while nothing is new). What it gets must be
exactly what ``jailhouse console -f`` prints: the ring so far, then new bytes as they
come, ``<missed N bytes of console log>`` after falling a ring behind.

Guests write with the debug-console hypercall (the script engine's ``console``
instruction): raw bytes, ``\\n`` sent as ``\\r\\n`` like Jailhouse's inmate library,
and nothing at all from a cell without the virtual-console flags.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.allocator import Allocator, ResourceRequest
from runphi.backends.jailhouse.plan import plan_cell
from runphi.backends.jailhouse.platform import load_platform
from tools.jailhouse_sim.cellfile import PROFILES, minimal_system_config
from tools.jailhouse_sim.hvconsole import RING_SIZE
from tools.jailhouse_sim.testing import SimBoard
from tools.jailhouse_sim.tests import cells

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
SCRIPT = "#!jailhouse-sim-inmate\n"
LOAD_ADDRESS = "0x70000000"
# The simulator's models of the boards runphi ships templates for (same names).
REAL_BOARDS = ("qemu-arm64", "zcu102", "zcu104", "kria-kv260")


class DeviceReader:
    """One open file of the simulated ``/dev/jailhouse``, read without blocking."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.fd = self.sock.fileno()
        os.set_blocking(self.fd, False)
        self.data = bytearray()
        self.eof = False

    def read_now(self) -> bytes:
        """Everything readable right now (no waiting)."""
        got = bytearray()
        while not self.eof:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
            got += chunk
        self.data += got
        return bytes(got)

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        """Read until ``marker`` has arrived; returns everything read so far."""
        deadline = time.monotonic() + timeout
        while marker not in self.data:
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise AssertionError(f"{marker!r} not on the device (eof={self.eof}); got {bytes(self.data)[-400:]!r}")
            select.select([self.fd], [], [], left)
            self.read_now()
        return bytes(self.data)

    def wait_eof(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof:
            assert time.monotonic() < deadline, "the device connection did not end"
            select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
            self.read_now()

    def settle(self, quiet: float = 0.3) -> bytes:
        """Read until nothing new has come for ``quiet`` seconds."""
        while select.select([self.fd], [], [], quiet)[0] and not self.eof:
            self.read_now()
        return bytes(self.data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sim(tmp_path):
    with SimBoard.running(tmp_path / "sim") as board:
        yield board


@pytest.fixture
def readers():
    opened: list[DeviceReader] = []

    def open_reader(sim: SimBoard) -> DeviceReader:
        reader = DeviceReader(sim.console_device)
        opened.append(reader)
        return reader

    yield open_reader
    for reader in opened:
        reader.close()


def run_script(sim: SimBoard, tmp_path: Path, name: str, body: str, *, cpu: int = 1,
               flags: int = cells.PASSIVE_COMMREG | cells.VCONSOLE_PERMITTED) -> int:
    """Create a cell, load the script guest ``body`` and start it; returns the cell id."""
    image = tmp_path / f"{name}.img"
    image.write_text(SCRIPT + body)
    config = cells.write(tmp_path, cells.runphi_cell(name, {cpu}, uart=cpu, flags=flags))
    sim.jailhouse("cell", "create", config).check()
    sim.jailhouse("cell", "load", name, image, "-a", LOAD_ADDRESS).check()
    sim.jailhouse("cell", "start", name).check()
    return cell_id(sim, name)


def cell_id(sim: SimBoard, name: str) -> int:
    for entry in sim.sysfs_path("cells").iterdir():
        if (entry / "name").read_text() == f"{name}\n":
            return int(entry.name)
    raise AssertionError(f"no cell {name!r}")


def ring(sim: SimBoard) -> bytes:
    """The ring as the sysfs ``console`` attribute holds it (bytes, no newline translation)."""
    return sim.sysfs_path("console").read_bytes()


def hypercalls(sim: SimBoard, cell: int, expected: int) -> None:
    sim.wait_sysfs(f"cells/{cell}/statistics/vmexits_hypercall", lambda v: int(v) == expected)


# ---- the device ------------------------------------------------------------------------------


def test_a_reader_from_before_the_start_sees_hv_lines_and_guest_text_as_console_f_prints(sim, tmp_path, readers):
    reader = readers(sim)
    follow = subprocess.Popen([str(sim.jailhouse_path), "console", "-f"], cwd=sim.root, stdout=subprocess.PIPE)
    try:
        banner = reader.read_until(b"Activating hypervisor\n")
        assert banner.startswith(b"\nInitializing Jailhouse hypervisor ")
        cell = run_script(sim, tmp_path, "talker", "console hello from talker\\n\nconsole \\tsecond\\n\nshutdown\n")
        seen = reader.read_until(b"\tsecond\r\n")
        sim.wait_state(cell, "shut down")
        assert seen.index(b'Created cell "talker"\n') < seen.index(b'Started cell "talker"\n') < seen.index(
            b"hello from talker\r\n\tsecond\r\n")
        assert seen.endswith(b'Started cell "talker"\nhello from talker\r\n\tsecond\r\n')
        # exactly the bytes of `jailhouse console -f` (and of the ring: nothing overflowed yet)
        tool = bytearray()
        deadline = time.monotonic() + 10
        while not tool.endswith(b"\tsecond\r\n") and time.monotonic() < deadline:
            if select.select([follow.stdout], [], [], 1)[0]:
                tool += os.read(follow.stdout.fileno(), 65536)
        assert bytes(tool) == seen == ring(sim)
    finally:
        follow.kill()
        follow.wait()
    hypercalls(sim, cell, len(b"hello from talker\r\n\tsecond\r\n"))  # one putc exit per byte


def test_a_reader_connecting_later_first_gets_the_current_ring(sim, tmp_path, readers):
    cell = run_script(sim, tmp_path, "early", "console early bird\\n\nshutdown\n")
    sim.wait_state(cell, "shut down")
    late = readers(sim)
    assert late.settle() == ring(sim) == sim.jailhouse("console").check().stdout.encode()
    assert late.data.endswith(b"early bird\r\n")
    sim.jailhouse("cell", "destroy", "early").check()
    late.read_until(b"Page pool usage after cell destruction")
    assert late.settle() == ring(sim) and b'early bird\r\nClosing cell "early"\n' in late.data
    # a second open file has its own position: it starts from the ring again
    assert readers(sim).settle() == ring(sim)


def test_a_slow_reader_gets_missed_bytes_then_the_newest_and_never_slows_the_guest(sim, tmp_path, readers):
    reader = readers(sim)
    caught_up = reader.settle()  # has the enable banner, then stops reading
    line = "0123456789abcdef" * 3
    lines = 100  # 100 lines of 52 bytes: more than two rings
    guest = b"".join(f"{n:02d}{line}\r\n".encode() for n in range(lines))
    body = "".join(f"console {n:02d}{line}\\n\n" for n in range(lines)) + "shutdown\n"
    start = time.monotonic()
    cell = run_script(sim, tmp_path, "flood", body)
    sim.wait_state(cell, "shut down", timeout=5)
    assert time.monotonic() - start < 5  # the guest ran to its end while nobody read
    hypercalls(sim, cell, len(guest))
    final = ring(sim)
    stream = reader.settle()[len(caught_up):]
    in_flight, missed_line, rest = stream.partition(b"<missed ")
    missed_text, _, rest = rest.partition(b" bytes of console log>\n")
    assert missed_line and b"<missed " not in rest
    # in flight when the reader stalled: the create's hypervisor lines, no guest text
    assert in_flight.startswith(b'Created cell "flood"\n') and line.encode() not in in_flight
    assert rest == final and len(final) == RING_SIZE and final.endswith(guest[-200:])
    # in flight + missed + the ring: exactly everything the console got after the stall
    pool = next(x for x in in_flight.split(b"\n") if x.startswith(b"Page pool usage after cell creation"))
    everything = (b'Created cell "flood"\n' + pool + b'\nCell "flood" can be loaded\nStarted cell "flood"\n'
                  + guest)
    assert everything.startswith(in_flight) and everything.endswith(rest)
    assert len(in_flight) + int(missed_text) + len(rest) == len(everything)


def test_a_cell_without_the_virtual_console_flags_writes_nothing(sim, tmp_path, readers):
    reader = readers(sim)
    cell = run_script(sim, tmp_path, "mute", "console secret\\n\nshutdown\n", flags=cells.PASSIVE_COMMREG)
    sim.wait_state(cell, "shut down")
    hypercalls(sim, cell, len(b"secret\r\n"))  # the guest tried (and got EPERM)
    seen = reader.settle()
    assert b'Started cell "mute"\n' in seen and b"secret" not in seen and b"secret" not in ring(sim)


def test_reading_waits_for_enable_and_follows_disable_and_reenable(tmp_path, readers):
    with SimBoard.running(tmp_path / "sim", enabled=False) as sim:
        reader = readers(sim)
        time.sleep(0.2)
        assert reader.read_now() == b"" and not reader.eof  # EAGAIN for the device: nothing yet
        config = sim.layout.system_config("sim-qemu-arm64")
        sim.jailhouse("enable", config).check()
        first = reader.read_until(b"Activating hypervisor\n")
        assert first.startswith(b"\nInitializing Jailhouse hypervisor")
        sim.jailhouse("disable").check()
        shutdown = b"Shutting down hypervisor\n" + b"".join(b" Releasing CPU %d\n" % c for c in range(8))
        reader.read_until(first + shutdown)  # the last of the final log
        sim.jailhouse("enable", config).check()
        # the disable put the reader's position back to 0: the new ring from its start
        reader.read_until(first + shutdown + first)
        assert reader.settle() == first + shutdown + first and ring(sim) == first
    reader.wait_eof()  # the daemon stopped: the open file ends


def test_without_the_virtual_debug_console_flag_reads_fail(tmp_path, readers):
    with SimBoard.running(tmp_path / "sim", enabled=False) as sim:
        reader = readers(sim)
        plain = tmp_path / "no-vconsole.cell"
        plain.write_bytes(minimal_system_config(PROFILES["runphi-fork-rev13"], 2)[:-4] + b"\0\0\0\0")
        sim.jailhouse("enable", plain).check()
        reader.wait_eof()  # the device's read fails with EPERM: the open file is done
        assert reader.data == b""
        result = sim.jailhouse("console")
        assert (result.returncode, result.stdout, result.stderr) == (1, "", "read(console): Operation not permitted\n")
        cell = run_script(sim, tmp_path, "quiet", "console unseen\\n\nshutdown\n")
        sim.wait_state(cell, "shut down")
        assert ring(sim) == b""
        assert readers(sim).settle() == b""  # a new open file fails at once as well
        sim.jailhouse("disable").check()
        sim.jailhouse("enable", sim.layout.system_config("sim-qemu-arm64")).check()
        assert readers(sim).read_until(b"Activating hypervisor\n").startswith(b"\nInitializing")


# ---- the models of runphi's real platforms ---------------------------------------------------


@pytest.mark.parametrize("board", REAL_BOARDS)
def test_a_cell_runphi_plans_for_the_board_prints_on_the_hypervisor_console(tmp_path, readers, board):
    platform = load_platform(board, TEMPLATES)
    with SimBoard.running(tmp_path / "sim", board=board) as sim:
        reader = readers(sim)
        alloc = Allocator(platform, tmp_path / "state", sim.layout.sysfs)
        allocation = alloc.allocate("hvc-guest", ResourceRequest(memory=16 << 20, console="hypervisor"))
        planned = plan_cell(platform, allocation, None, "hvc-guest")
        assert planned.flags & cc.CELL_VIRTUAL_CONSOLE_PERMITTED
        config = tmp_path / "hvc-guest.cell"
        config.write_bytes(cc.write_cell(planned, platform.profile))
        image = tmp_path / "guest.img"
        image.write_text(SCRIPT + f"console hello from {board}\\n\nshutdown\n")
        sim.jailhouse("cell", "create", config).check()
        sim.jailhouse("cell", "load", planned.name, image, "-a", hex(planned.cpu_reset_address)).check()
        sim.jailhouse("cell", "start", planned.name).check()
        seen = reader.read_until(f"hello from {board}\r\n".encode())
        assert seen.startswith(b"\nInitializing Jailhouse hypervisor")
        assert f'Started cell "{planned.name}"\nhello from {board}\r\n'.encode() in seen
        sim.wait_state(cell_id(sim, planned.name), "shut down")
        sim.jailhouse("cell", "destroy", planned.name).check()
