"""Our inmates under the QEMU engine, driven only through the simulator's CLI:
``jailhouse-sim up --engine qemu``, ``<root>/bin/jailhouse cell ...``, the UART
ptys under ``<root>/dev`` read with pyserial, and the sysfs files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from tools.inmates import build as inmates

from . import cells

pytestmark = pytest.mark.qemu

QEMU = "qemu-system-aarch64"
STEP_TIMEOUT = 20.0  # seconds: generous for a loaded 2-core CI machine

_missing = inmates.missing_tools() or (None if shutil.which(QEMU) else f"{QEMU} not found (Debian: qemu-system-arm)")
if _missing:
    pytest.skip(f"QEMU simulator tests need the real tools: {_missing}", allow_module_level=True)


# ---- processes and ptys, read from /proc -------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    state = proc_status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))


def qemu_children(parent: int) -> list[int]:
    """Live qemu-system-aarch64 processes whose parent is ``parent``."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [
        pid
        for pid in pids
        if (fields := proc_status(pid)).get("Name", "").startswith("qemu-system-aar")
        and fields.get("PPid") == str(parent)
        and alive(pid)
    ]


def open_targets(pid: int) -> set[str]:
    """What a process's descriptors point at."""
    targets = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return targets
    for fd in fds:
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


def wait_until(condition, what: str, timeout: float = STEP_TIMEOUT) -> None:
    """Poll a /proc or sysfs observation with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting until {what}"
        time.sleep(0.005)


# ---- the simulator, through its CLI ------------------------------------------------------------


class QemuSim:
    """A simulator brought up with ``jailhouse-sim up --engine qemu`` in a private root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root.parent

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tools.jailhouse_sim.cli", *args, "--root", str(self.root)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def up(self) -> None:
        done = self.cli("up", "--engine", "qemu")
        assert done.returncode == 0, done.stderr
        self.daemon = json.loads(self.cli("status", "--json").stdout)["pid"]

    def down(self) -> None:
        done = self.cli("down")
        assert done.returncode == 0, done.stderr

    def jailhouse(self, *args: str | Path) -> str:
        done = subprocess.run([str(self.root / "bin" / "jailhouse"), *map(str, args)],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, f"jailhouse {' '.join(map(str, args))}: {done.stderr}"
        return done.stdout

    def uart(self, index: int) -> Path:
        return self.root / "dev" / f"ttyAMA{index}"

    def open_uart(self, index: int) -> serial.Serial:
        return serial.Serial(str(self.uart(index)), baudrate=115200, timeout=STEP_TIMEOUT)

    def sysfs(self, relpath: str) -> str | None:
        try:
            return (self.root / "sys" / "devices" / "jailhouse" / relpath).read_text()
        except FileNotFoundError:
            return None

    def state(self, cell_id: int) -> str | None:
        value = self.sysfs(f"cells/{cell_id}/state")
        return value.rstrip("\n") if value is not None else None

    def wait_state(self, cell_id: int, state: str) -> None:
        wait_until(lambda: self.state(cell_id) == state, f"cell {cell_id} is {state!r} (now {self.state(cell_id)!r})")

    def create(self, name: str, cpus: set[int], uart: int) -> int:
        """Create a cell on UART ``uart``; returns its id."""
        self.jailhouse("cell", "create", cells.write(self.tmp, cells.runphi_cell(name, cpus, uart=uart)))
        return self.cell_id(name)

    def cell_id(self, name: str) -> int:
        listing = self.jailhouse("cell", "list").splitlines()
        return int(next(line.split()[0] for line in listing if line.split()[1:2] == [name]))

    def load_and_start(self, name: str, program: str) -> None:
        self.jailhouse("cell", "load", name, inmates.image_path(program), "-a", f"{inmates.LOAD_ADDRESS:#x}")
        self.jailhouse("cell", "start", name)

    def boot(self, name: str, program: str, cpus: set[int] | None = None, uart: int = 1) -> int:
        cell = self.create(name, cpus or {uart}, uart)
        self.load_and_start(name, program)
        return cell

    def qemus(self) -> list[int]:
        return qemu_children(self.daemon)


@pytest.fixture(scope="module", autouse=True)
def nothing_outlives_the_module() -> Iterator[list[str]]:
    """Tests append the pty devices they saw; afterwards none is held open by a
    simulator or QEMU process, and no simulator started here left a QEMU behind."""
    inmates.ensure_built()
    ptys: list[str] = []
    yield ptys
    ours = [pid for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()) if alive(pid)]
    for pid in ours:
        name = proc_status(pid).get("Name", "")
        if name.startswith("qemu-system-aar"):
            assert not open_targets(pid) & set(ptys), f"QEMU {pid} still holds one of our UART ptys"
    for pty in ptys:
        holders = [pid for pid in ours if pty in open_targets(pid) and pid != os.getpid()]
        holders = [pid for pid in holders if "jailhouse_sim" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
        assert not holders, f"{pty} is still open in simulator processes {holders}"


@pytest.fixture
def sim(tmp_path: Path, nothing_outlives_the_module: list[str]) -> Iterator[QemuSim]:
    sim = QemuSim(tmp_path / "sim")
    sim.up()
    nothing_outlives_the_module.extend(os.path.realpath(sim.uart(i)) for i in range(1, 5))
    try:
        yield sim
    finally:
        daemon = sim.daemon
        sim.down()
        assert not alive(daemon)
        assert qemu_children(daemon) == []


def test_hello_prints_and_cell_shuts_down(sim):
    with sim.open_uart(1) as port:
        cell = sim.boot("hello", "hello")
        assert port.read_until(b"\r\n") == b"Hello from runphi inmate hello\r\n"
        assert port.read_until(b"powering off\r\n").endswith(b"hello: done, powering off\r\n")
    sim.wait_state(cell, "shut down")
    wait_until(lambda: sim.qemus() == [], "QEMU has exited")
    # Statistics reach sysfs on the simulator's periodic flush.
    wait_until(lambda: sim.sysfs(f"cells/{cell}/statistics/vmexits_psci") == "1\n", "the power-off is counted")
    assert int(sim.sysfs(f"cells/{cell}/statistics/vmexits_mmio")) > 0


def test_echo_round_trip_through_the_pty(sim):
    with sim.open_uart(2) as port:
        cell = sim.boot("echo", "echo", uart=2)
        assert port.read_until(b"> ").endswith(b"'exit' powers off\r\n> ")
        assert sim.state(cell) == "running"
        line = bytes(range(0x20, 0x7F)) + b"\x01\x1b\xff"
        port.write(line + b"\r")
        assert port.read_until(b"> ") == line + b"\r\n> "
        port.write(b"exit\r")
        assert port.read_until(b"bye\r\n") == b"echo: bye\r\n"
    sim.wait_state(cell, "shut down")


def test_ticker_stopped_by_cell_shutdown(sim):
    with sim.open_uart(1) as port:
        cell = sim.boot("ticker", "ticker")
        port.read_until(b"tick 2\r\n")
        [qemu] = sim.qemus()
        # The UART pty belongs to the simulator, never to QEMU.
        assert not any("/dev/pts/" in target or "ptmx" in target for target in open_targets(qemu))
        sim.jailhouse("cell", "shutdown", "ticker")
        # `cell shutdown` returns only after QEMU was killed and reaped.
        assert not Path(f"/proc/{qemu}").exists()
    assert sim.state(cell) == "shut down"
    assert sim.qemus() == []


def test_crash_fails_the_cell_with_jailhouse_console_lines(sim):
    with sim.open_uart(1) as port:
        cell = sim.boot("crasher", "crash", cpus={1, 2})
        assert port.read_until(b"(unassigned)\r\n").endswith(b"crash: storing to 0x0c000000 (unassigned)\r\n")
    sim.wait_state(cell, "failed")
    assert sim.sysfs(f"cells/{cell}/cpus_failed_list") == "1-2\n"
    assert (
        'Unhandled data write at 0xc000000(4)\nParking CPU 1 (Cell: "crasher")\n'
        'Unhandled data write at 0xc000000(4)\nParking CPU 2 (Cell: "crasher")\n'
    ) in sim.sysfs("console")
    wait_until(lambda: sim.qemus() == [], "the crashed guest's QEMU is gone")


def test_restart_reuses_the_same_uart_device(sim):
    path_before = os.path.realpath(sim.uart(1))
    with sim.open_uart(1) as port:
        cell = sim.boot("again", "ticker")
        port.read_until(b"tick 1\r\n")
        sim.jailhouse("cell", "shutdown", "again")
        assert sim.state(cell) == "shut down"
        sim.load_and_start("again", "hello")
        # The port opened before the first boot carries the second guest too.
        port.read_until(b"Hello from runphi inmate hello\r\n")
        port.read_until(b"powering off\r\n")
    sim.wait_state(cell, "shut down")
    assert os.path.realpath(sim.uart(1)) == path_before


def test_flood_through_the_pty(sim):
    header = f"Hello from runphi inmate flood\r\nflood: sending {inmates.FLOOD_BYTES} bytes\r\n".encode()
    trailer = f"\r\nflood: done {inmates.FLOOD_BYTES} bytes\r\n".encode()
    pattern = (inmates.FLOOD_PATTERN * (inmates.FLOOD_BYTES // len(inmates.FLOOD_PATTERN) + 1))[: inmates.FLOOD_BYTES]
    with sim.open_uart(3) as port:
        cell = sim.boot("flood", "flood", uart=3)
        data = port.read(len(header) + len(pattern) + len(trailer))
    assert data == header + pattern + trailer
    sim.wait_state(cell, "shut down")


def test_four_cells_at_once_on_distinct_cpus_and_uarts(sim):
    programs = {1: "hello", 2: "echo", 3: "ticker", 4: "flood"}
    ports = {uart: sim.open_uart(uart) for uart in programs}
    try:
        ids = {uart: sim.create(f"cell{uart}", {uart}, uart) for uart in programs}
        for uart, program in programs.items():
            sim.load_and_start(f"cell{uart}", program)
        seen = {}
        for uart, program in programs.items():
            seen[uart] = ports[uart].read_until(b"\r\n")
            assert seen[uart] == f"Hello from runphi inmate {program}\r\n".encode()
        ports[2].read_until(b"> ")
        ports[2].write(b"cell two only\r")
        assert ports[2].read_until(b"> ") == b"cell two only\r\n> "
        ports[3].read_until(b"tick 3\r\n")
        # Whoever holds a UART open must read it: the flood waits for its reader.
        seen[4] += ports[4].read_until(b"bytes\r\n") + ports[4].read_until(b"bytes\r\n")
        sim.wait_state(ids[1], "shut down")
        sim.wait_state(ids[4], "shut down")
        assert sorted(sim.state(ids[u]) for u in (2, 3)) == ["running", "running"]
        assert len(sim.qemus()) == 2
        sim.jailhouse("cell", "shutdown", "cell3")
        ports[2].write(b"exit\r")
        sim.wait_state(ids[2], "shut down")
        # Nobody else's banner or input on any port.
        for uart, port in ports.items():
            port.timeout = 0.2
            rest = port.read(1 << 20)
            assert b"Hello from runphi inmate" not in rest
            if uart != 2:
                assert b"cell two only" not in seen[uart] + rest
    finally:
        for port in ports.values():
            port.close()


def test_destroy_and_down_leave_no_qemu(sim):
    with sim.open_uart(1) as port1, sim.open_uart(2) as port2:
        sim.boot("first", "ticker", uart=1)
        port1.read_until(b"tick 1\r\n")
        [first] = sim.qemus()
        sim.boot("second", "ticker", uart=2)
        port2.read_until(b"tick 1\r\n")
        [second] = set(sim.qemus()) - {first}
        sim.jailhouse("cell", "destroy", "first")
        assert len(sim.qemus()) == 1
    sim.down()
    assert not Path(f"/proc/{first}").exists()
    assert not alive(second)


def test_a_killed_daemon_takes_its_qemus_along(sim):
    with sim.open_uart(1) as port:
        sim.boot("orphan", "ticker")
        port.read_until(b"tick 1\r\n")
        [qemu] = sim.qemus()
        done = sim.cli("kill")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: not alive(qemu), f"QEMU {qemu} died with its daemon")


def test_runphi_zephyr_demo_cell_runs_an_opaque_image(sim, zephyr_demo):
    """runPHI's shipped Zephyr demo config with a raw image at 0x70000000 (our hello standing
    in for zephyr.bin): its console region is the board's UART0, shared with the root."""
    with sim.open_uart(0) as port:
        sim.jailhouse("cell", "create", zephyr_demo)
        cell = sim.cell_id("qemu-arm64-zephyr-demo")
        sim.load_and_start("qemu-arm64-zephyr-demo", "hello")
        # The hypervisor's own lines share this UART: the guest's come after them.
        output = port.read_until(b"powering off\r\n")
        guest = output[output.index(b"Hello from runphi inmate hello\r\n") :].split(b"\r\n")
        assert guest[1] == b"hello: running at EL1 on the cell's first CPU"
        assert guest[2].startswith(b"hello: timer frequency ") and guest[3] == b"hello: done, powering off"
    sim.wait_state(cell, "shut down")
