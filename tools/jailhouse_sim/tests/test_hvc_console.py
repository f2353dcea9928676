"""Guests that print through Jailhouse's debug-console hypercall, under the QEMU engine.

The inmates' ``CONSOLE=hvc`` build (``tools/inmates/out/hvc``) sends every byte as
``hvc #0x4a48`` with x0 = 8; the simulator's EL2 layer (``tools/jailhouse_sim/el2``)
answers it and hands the byte to the hypervisor console ring, or refuses it with
EPERM for a cell without ``JAILHOUSE_CELL_VIRTUAL_CONSOLE_PERMITTED``. Everything
here runs real guests under qemu-system-aarch64 on a simulated board, observed
through ``bin/jailhouse``, sysfs and the UART ptys."""

from __future__ import annotations

import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from tools.inmates import build as inmates
from tools.jailhouse_sim import el2
from tools.jailhouse_sim.engine import GuestSpec, LoadedImage, RamRegion
from tools.jailhouse_sim.engines.qemu import El2Boot, el2_address, el2_machine, qemu_argv, ram_mib
from tools.jailhouse_sim.testing import SimBoard

from . import cells

pytestmark = pytest.mark.qemu

QEMU = "qemu-system-aarch64"
STEP_TIMEOUT = 20.0  # seconds: generous for a loaded 2-core CI machine
RING_SIZE = 2048

_missing = inmates.missing_tools() or (None if shutil.which(QEMU) else f"{QEMU} not found (Debian: qemu-system-arm)")
if _missing:
    pytest.skip(f"hypercall console tests need the real tools: {_missing}", allow_module_level=True)

HELLO = (
    b"Hello from runphi inmate hello\r\n"
    b"hello: running at EL1 on the cell's first CPU\r\n"
    b"hello: timer frequency \\d+ Hz\r\n"
    b"hello: done, powering off\r\n"
)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    inmates.ensure_built()
    inmates.ensure_built("hvc")


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimBoard]:
    with SimBoard.running(tmp_path / "sim", engine="qemu") as board:
        yield board


def create(sim: SimBoard, tmp: Path, name: str, *, permitted: bool, cpus: set[int] | None = None,
           uart: int = 1) -> int:
    """A runphi-shaped cell on board UART ``uart``, with or without the virtual-console flag."""
    flags = cells.PASSIVE_COMMREG | (cells.VCONSOLE_PERMITTED if permitted else 0)
    config = cells.write(tmp, cells.runphi_cell(name, cpus or {uart}, uart=uart, flags=flags))
    sim.jailhouse("cell", "create", config).check()
    listing = sim.jailhouse("cell", "list").check().stdout.splitlines()
    return int(next(line.split()[0] for line in listing if line.split()[1:2] == [name]))


def load_and_start(sim: SimBoard, name: str, image: Path) -> None:
    sim.jailhouse("cell", "load", name, image, "-a", f"{inmates.LOAD_ADDRESS:#x}").check()
    sim.jailhouse("cell", "start", name).check()


def hv_lines(name: str) -> bytes:
    """What the hypervisor itself prints for load_and_start."""
    return f'Cell "{name}" can be loaded\nStarted cell "{name}"\n'.encode()


def open_uart(sim: SimBoard, index: int) -> serial.Serial:
    return serial.Serial(str(sim.uart(index)), baudrate=115200, timeout=STEP_TIMEOUT)


def ring(sim: SimBoard) -> bytes:
    """``jailhouse console``: the ring as a fresh reader gets it."""
    return sim.jailhouse("console").check().stdout.encode(errors="surrogateescape")


def silent(port: serial.Serial, seconds: float = 0.3) -> bytes:
    """What arrives on a UART within ``seconds`` (nothing, for a guest on the hypercall)."""
    port.timeout = seconds
    return port.read(4096)


def stat(sim: SimBoard, cell: int, name: str) -> int:
    return int(sim.read_sysfs(f"cells/{cell}/statistics/{name}") or 0)


# ---- the hypercall console on a board ---------------------------------------------------------


def test_hvc_hello_prints_into_the_hypervisor_console_not_its_uart(sim, tmp_path):
    with open_uart(sim, 1) as port:
        cell = create(sim, tmp_path, "hello", permitted=True)
        before = ring(sim)
        load_and_start(sim, "hello", inmates.image_path("hello", console="hvc"))
        sim.wait_state(cell, "shut down", timeout=STEP_TIMEOUT)
        assert silent(port) == b""
    after = ring(sim)
    assert after.startswith(before)
    # The guest's bytes as it sent them (its own "\r\n"), right after the hypervisor's line.
    assert re.fullmatch(re.escape(hv_lines("hello")) + HELLO, after[len(before):]), after[len(before):]
    guest_bytes = len(after) - len(before) - len(hv_lines("hello"))
    # One hypercall exit per byte, one PSCI exit for the power-off; nothing went through the UART.
    sim.wait_sysfs(f"cells/{cell}/statistics/vmexits_psci", lambda v: v == "1\n", timeout=STEP_TIMEOUT)
    assert stat(sim, cell, "vmexits_hypercall") == guest_bytes
    assert stat(sim, cell, "vmexits_mmio") == 0
    # sysfs `console` is the same ring.
    assert sim.sysfs_path("console").read_bytes() == after


def test_without_the_flag_the_hypercall_is_refused_and_the_cell_still_shuts_down(sim, tmp_path):
    with open_uart(sim, 2) as port:
        cell = create(sim, tmp_path, "quiet", permitted=False, uart=2)
        before = ring(sim)
        load_and_start(sim, "quiet", inmates.image_path("hello", console="hvc"))
        sim.wait_state(cell, "shut down", timeout=STEP_TIMEOUT)
        assert silent(port) == b""
    # EPERM: not one byte of the guest reached the ring.
    assert ring(sim) == before + hv_lines("quiet")
    sim.wait_sysfs(f"cells/{cell}/statistics/vmexits_psci", lambda v: v == "1\n", timeout=STEP_TIMEOUT)


def test_hvc_flood_keeps_the_last_2048_bytes_of_the_ring(sim, tmp_path):
    header = f"Hello from runphi inmate flood\r\nflood: sending {inmates.FLOOD_BYTES} bytes\r\n".encode()
    trailer = f"\r\nflood: done {inmates.FLOOD_BYTES} bytes\r\n".encode()
    pattern = (inmates.FLOOD_PATTERN * (inmates.FLOOD_BYTES // len(inmates.FLOOD_PATTERN) + 1))[: inmates.FLOOD_BYTES]
    cell = create(sim, tmp_path, "flood", permitted=True, uart=3)
    load_and_start(sim, "flood", inmates.image_path("flood", console="hvc"))
    sim.wait_state(cell, "shut down", timeout=STEP_TIMEOUT)
    sent = header + pattern + trailer
    sim.wait_sysfs(f"cells/{cell}/statistics/vmexits_hypercall", lambda v: int(v) == len(sent),
                   timeout=STEP_TIMEOUT)

    output = ring(sim)
    missed_line, data = output.split(b"\n", 1)
    missed = re.fullmatch(rb"<missed (\d+) bytes of console log>", missed_line)
    assert missed, output[:200]
    # A fresh reader starts at 0: it missed everything but the last 2048 bytes, which follow.
    assert len(data) == RING_SIZE
    assert data == sent[-RING_SIZE:]
    assert int(missed[1]) + RING_SIZE > len(sent)
    assert sim.sysfs_path("console").read_bytes() == data


def test_pl011_hello_still_prints_on_its_uart_and_not_in_the_ring(sim, tmp_path):
    with open_uart(sim, 1) as port:
        cell = create(sim, tmp_path, "plain", permitted=True)
        before = ring(sim)
        load_and_start(sim, "plain", inmates.image_path("hello"))
        assert port.read_until(b"powering off\r\n").startswith(b"Hello from runphi inmate hello\r\n")
        sim.wait_state(cell, "shut down", timeout=STEP_TIMEOUT)
    assert ring(sim) == before + hv_lines("plain")


# ---- the EL2 layer's contract, seen from the cell ---------------------------------------------


@pytest.mark.parametrize("permitted", [True, False])
def test_el2probe_sees_jailhouse_at_el2(sim, tmp_path, permitted):
    with open_uart(sim, 1) as port:
        cell = create(sim, tmp_path, "probe", permitted=permitted, cpus={1, 2})
        before = ring(sim)
        load_and_start(sim, "probe", inmates.image_path("el2probe"))
        output = port.read_until(b"x0 0x5ec0\r\n").decode()
        sim.wait_state(cell, "shut down", timeout=STEP_TIMEOUT)
    lines = output.splitlines()
    assert lines[:6] == [
        "Hello from runphi inmate el2probe",
        "el2probe: CurrentEL 1",
        f"el2probe: putc -> {0 if permitted else -1}",
        "el2probe: cell_create -> -1",
        "el2probe: code 99 -> -38",
        "el2probe: registers kept",
    ]
    assert re.fullmatch(r"el2probe: psci version hvc (0x[0-9a-f]+) smc \1", lines[6])
    # CPU_ON through the layer: the secondary CPU also starts at EL1, with its context id in x0.
    assert lines[7:] == ["el2probe: cpu_on -> 0", "el2probe: secondary at EL1 x0 0x5ec0"]
    assert ring(sim) == before + hv_lines("probe") + (b"." if permitted else b"")


def test_an_hvc_with_another_immediate_is_a_forbidden_access(sim, tmp_path):
    image = tmp_path / "hvc1.bin"
    image.write_bytes(struct.pack("<II", 0xD4000022, 0x14000000))  # hvc #1; b .
    cell = create(sim, tmp_path, "rogue", permitted=True, cpus={1, 2})
    load_and_start(sim, "rogue", image)
    sim.wait_state(cell, "failed", timeout=STEP_TIMEOUT)
    assert (
        'FATAL: forbidden access (exception class 0x16)\nParking CPU 1 (Cell: "rogue")\n'
        'FATAL: forbidden access (exception class 0x16)\nParking CPU 2 (Cell: "rogue")\n'
    ) in sim.console()


# ---- the command line -------------------------------------------------------------------------


def spec() -> GuestSpec:
    return GuestSpec(cell_name="c", cell_id=1, cpus=(1,), reset_address=0x7000_0000,
                     images=(LoadedImage(0x7000_0000, b"\0" * 16),),
                     ram=(RamRegion(0x7000_0000, 0x10_0000, 0x4F),), uart_guest_address=0x0900_0000)


def test_el2_command_line_adds_el2_ram_and_the_semihosting_channel():
    cell = spec()
    plain = qemu_argv(cell, binary=QEMU, machine="virt,gic-version=3", cpu="cortex-a53", image_fds=[7],
                      uart_fd=5, qmp_fd=6)
    argv = qemu_argv(cell, binary=QEMU, machine="virt,gic-version=3", cpu="cortex-a53", image_fds=[7],
                     uart_fd=5, qmp_fd=6, el2=El2Boot(image_fd=8, console_fd=9))
    assert argv[argv.index("-M") + 1] == "virt,gic-version=3,virtualization=on"
    assert argv[argv.index("-m") + 1] == f"{ram_mib(cell) + 1}M"
    layer = el2_address(cell)
    assert layer == 0x4000_0000 + (ram_mib(cell) << 20)
    assert argv[-4:] == ["-device", f"loader,file=/dev/fd/8,addr={layer:#x},force-raw=on",
                         "-device", f"loader,addr={layer:#x},cpu-num=0"]
    assert ["-chardev", "socket,id=hvcon,fd=9"] == argv[argv.index("-chardev", argv.index("-mon")):][:2]
    assert "enable=on,target=native,chardev=hvcon" in argv
    # Without the layer: the command line of before, the CPU starting at the cell's reset address.
    assert plain[-1] == "loader,addr=0x70000000,cpu-num=0" and "-semihosting-config" not in plain


def test_which_machines_get_the_layer():
    assert el2_machine("virt") == "virt,virtualization=on"
    assert el2_machine("virt-7.2,gic-version=3") == "virt-7.2,gic-version=3,virtualization=on"
    assert el2_machine("virt,virtualization=on") == "virt,virtualization=on"
    assert el2_machine("virt,virtualization=off") is None
    assert el2_machine("virt,secure=on") is None
    assert el2_machine("sbsa-ref") is None


def test_the_layer_image_is_patched_at_its_header():
    image = el2.ensure_built().read_bytes()
    patched = el2.patched(image, entry=0x7000_1234, console_permitted=True)
    assert len(patched) == len(image) < 0x10_0000  # fits the MiB the engine reserves
    assert struct.unpack_from("<QQ8s", patched, el2.ENTRY_OFFSET) == (0x7000_1234, 1, b"RPHI-EL2")
    assert struct.unpack_from("<Q", el2.patched(image, entry=0, console_permitted=False), el2.FLAGS_OFFSET) == (0,)
    with pytest.raises(ValueError, match="magic"):
        el2.patched(b"\0" * 64, entry=0, console_permitted=False)
    assert el2.trap_of_exit_status(0x80 | 0x40 | 0x16) == (0x16, True)
    assert el2.trap_of_exit_status(0x80 | 0x01) == (0x01, False)
    assert el2.trap_of_exit_status(1) is None
