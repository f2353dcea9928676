"""Script guests (and opaque images) observed through the UART pty with pyserial,
and their state changes through sysfs."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import serial

from tools.jailhouse_sim.testing import SimBoard

from . import cells

MAGIC = "#!jailhouse-sim-inmate\n"


@pytest.fixture
def sim(jailhouse_sim: SimBoard) -> SimBoard:
    return jailhouse_sim


def open_uart(sim: SimBoard, index: int) -> serial.Serial:
    return serial.Serial(str(sim.uart(index)), baudrate=115200, timeout=5)


def boot(sim: SimBoard, tmp_path: Path, body: str | bytes, name: str = "guest", cpus=frozenset({1}), uart: int = 1,
         raw: bool = False) -> int:
    """Create a cell on UART ``uart``, load ``body`` at 0x70000000 and start it; returns its id."""
    image = tmp_path / f"{name}.img"
    image.write_bytes(body if isinstance(body, bytes) else ((body if raw else MAGIC + body).encode()))
    sim.jailhouse("cell", "create", cells.write(tmp_path, cells.runphi_cell(name, set(cpus), uart=uart))).check()
    sim.jailhouse("cell", "load", name, image, "-a", "0x70000000").check()
    sim.jailhouse("cell", "start", name).check()
    return int(next(line.split()[0] for line in sim.jailhouse("cell", "list").stdout.splitlines()
                    if line.split()[1:2] == [name]))


def test_print_translates_newlines_and_escapes(sim, tmp_path):
    with open_uart(sim, 1) as port:
        boot(sim, tmp_path, "print hello, world\\n\n" + "print \\x00\\xff\\t\\\\end\\n\n")
        assert port.read_until(b"end\r\n") == b"hello, world\r\n\x00\xff\t\\end\r\n"


def test_output_goes_to_the_uart_of_the_cells_physical_region(sim, tmp_path):
    with open_uart(sim, 3) as port3, open_uart(sim, 1) as port1:
        boot(sim, tmp_path, "print on three\\n\n", uart=3)
        assert port3.read_until(b"\r\n") == b"on three\r\n"
        port1.timeout = 0.2
        assert port1.read(1) == b""


def test_tick_prints_numbered_lines(sim, tmp_path):
    with open_uart(sim, 1) as port:
        boot(sim, tmp_path, "tick 10 beat\n")
        assert [port.read_until(b"\r\n") for _ in range(3)] == [b"beat 1\r\n", b"beat 2\r\n", b"beat 3\r\n"]


def test_echo_until_exit_then_shutdown(sim, tmp_path):
    with open_uart(sim, 1) as port:
        cell = boot(sim, tmp_path, "print ready\\n\necho until exit\nprint bye\\n\nshutdown\n")
        assert port.read_until(b"ready\r\n") == b"ready\r\n"
        port.write(b"abc\r")
        assert port.read_until(b"\r") == b"abc\r"
        port.write(b"exit\r")
        assert port.read_until(b"bye\r\n") == b"exit\rbye\r\n"
        sim.wait_state(cell, "shut down")


def test_self_shutdown_shows_in_sysfs_within_50ms(sim, tmp_path):
    with open_uart(sim, 1) as port:
        cell = boot(sim, tmp_path, "echo until go\nprint bye\\n\nshutdown\n")
        assert sim.state(cell) == "running"
        port.write(b"go\r")
        assert port.read_until(b"bye\r\n") == b"go\rbye\r\n"
        assert sim.wait_state(cell, "shut down", timeout=1.0) < 0.05


def test_fault_parks_every_cpu_and_fails_within_50ms(sim, tmp_path):
    with open_uart(sim, 1) as port:
        cell = boot(sim, tmp_path, "print crash\\n\nfault 0xc000000\n", name="crasher", cpus={1, 2})
        assert port.read_until(b"crash\r\n") == b"crash\r\n"
        assert sim.wait_state(cell, "failed", timeout=1.0) < 0.05
    assert sim.read_sysfs(f"cells/{cell}/cpus_failed_list") == "1-2\n"
    assert sim.read_sysfs(f"cells/{cell}/cpus_failed") == "06\n"
    console = sim.console()
    assert ('Unhandled data write at 0xc000000(4)\nParking CPU 1 (Cell: "crasher")\n'
            'Parking CPU 2 (Cell: "crasher")\n') in console
    row = next(line for line in sim.jailhouse("cell", "list").stdout.splitlines() if "crasher" in line)
    assert row.split()[2:] == ["failed", "1-2", "1-2"]


def test_lock_unlock_and_comm_abi_mismatch(sim, tmp_path):
    with open_uart(sim, 1) as port:
        cell = boot(sim, tmp_path, "lock\nprint locked\\n\necho until go\nunlock\nprint unlocked\\n\n"
                                   "echo until go\ncomm-abi-mismatch\n")
        port.read_until(b"locked\r\n")
        assert sim.state(cell) == "running/locked"
        port.write(b"go\n")
        port.read_until(b"unlocked\r\n")
        assert sim.state(cell) == "running"
        port.write(b"go\n")
        sim.wait_state(cell, "Comm ABI mismatch")


def test_flood_delivers_every_byte_in_order(sim, tmp_path):
    count = 1 << 20
    with open_uart(sim, 1) as port:
        boot(sim, tmp_path, f"flood {count} abcdefg\nprint END\n")
        data = port.read(count + 3)
    assert len(data) == count + 3 and data.endswith(b"END")
    assert data[:count] == (b"abcdefg" * (count // 7 + 1))[:count]


def test_flood_with_nobody_listening_is_dropped_and_does_not_stall(sim, tmp_path):
    cell = boot(sim, tmp_path, "flood 4000000\nshutdown\n")
    sim.wait_state(cell, "shut down", timeout=20)
    # Nothing of it is waiting for the next reader either.
    with open_uart(sim, 1) as port:
        sim.jailhouse("cell", "load", str(cell), "-s", MAGIC + "print fresh\\n\n", "-a", "0x70000000").check()
        sim.jailhouse("cell", "start", str(cell)).check()
        assert port.read_until(b"fresh\r\n") == b"fresh\r\n"


def test_uart_survives_close_and_reopen_across_restarts(sim, tmp_path):
    with open_uart(sim, 1) as port:
        cell = boot(sim, tmp_path, "print one\\n\necho\n")
        assert port.read_until(b"one\r\n") == b"one\r\n"
    with open_uart(sim, 1) as port:
        port.write(b"again\n")
        assert port.read_until(b"again\n") == b"again\n"
        sim.jailhouse("cell", "start", str(cell)).check()   # restart: same pty path
        assert port.read_until(b"one\r\n") == b"one\r\n"


def test_virtual_console_line_reaches_the_hypervisor_console(sim, tmp_path):
    cell = boot(sim, tmp_path, "console hello from the cell\\n\nshutdown\n")
    sim.wait_state(cell, "shut down")
    assert "hello from the cell\n" in sim.console()


def test_opaque_image_prints_size_and_sha256_then_idles(sim, tmp_path):
    blob = bytes(range(256)) * 4
    with open_uart(sim, 1) as port:
        cell = boot(sim, tmp_path, blob)
        line = port.read_until(b"\r\n")
    digest = hashlib.sha256(blob).hexdigest()[:12]
    assert line == f"[jailhouse-sim] opaque guest at 0x70000000: 1024 bytes, sha256 {digest}\r\n".encode()
    assert sim.state(cell) == "running"


def test_a_later_load_at_the_reset_address_replaces_the_script(sim, tmp_path):
    """Memory keeps earlier images, but the cell boots what was loaded last at its reset address."""
    blob = bytes(range(256)) * 2
    with open_uart(sim, 1) as port:
        cell = boot(sim, tmp_path, "print script ran\\n\n", name="reload")
        assert port.read_until(b"\r\n") == b"script ran\r\n"
        sim.jailhouse("cell", "shutdown", "reload").check()
        (tmp_path / "opaque.img").write_bytes(blob)
        sim.jailhouse("cell", "load", "reload", tmp_path / "opaque.img", "-a", "0x70000000").check()
        sim.jailhouse("cell", "start", "reload").check()
        line = port.read_until(b"\r\n")
    assert line.startswith(b"[jailhouse-sim] opaque guest at 0x70000000: 512 bytes")
    assert sim.state(cell) == "running"


def test_string_images_include_their_nul(sim, tmp_path):
    sim.jailhouse("cell", "create", cells.write(tmp_path, cells.runphi_cell("str", {1}))).check()
    with open_uart(sim, 1) as port:
        sim.jailhouse("cell", "load", "str", "-s", "abc", "-a", "0x70000000").check()
        sim.jailhouse("cell", "start", "str").check()
        line = port.read_until(b"\r\n")
    assert b": 4 bytes, sha256 " + hashlib.sha256(b"abc\0").hexdigest()[:12].encode() in line


def test_malformed_script_fails_the_cell_with_a_reason(sim, tmp_path):
    cell = boot(sim, tmp_path, "print ok\nfrobnicate\n")
    sim.wait_state(cell, "failed")
    assert "jailhouse-sim: script error, line 3: unknown or malformed instruction 'frobnicate'" in sim.console()


def test_shutdown_cancels_a_running_guest(sim, tmp_path):
    with open_uart(sim, 1) as port:
        cell = boot(sim, tmp_path, "tick 5 t\n")
        port.read_until(b"t 2\r\n")
        sim.jailhouse("cell", "shutdown", str(cell)).check()
        assert sim.state(cell) == "shut down"
        port.reset_input_buffer()
        port.timeout = 0.1
        assert port.read(100) == b""
