"""``jailhouse cell linux`` under the QEMU engine: Debian's arm64 kernel with the busybox
initramfs of ``tools/linux_guest`` boots in a cell, answers on the cell's UART, and
``cell shutdown`` presses the power button before anything is forced.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import serial

from tools.jailhouse_sim.cell_linux import INMATE_DTB_PATH
from tools.jailhouse_sim.testing import SimBoard
from tools.linux_guest import BANNER, POWER_KEY_MESSAGE, PROMPT, SHUTDOWN_MESSAGE
from tools.linux_guest.testing import guest_or_skip

from . import cells

pytestmark = pytest.mark.qemu

MIB = 1 << 20
BOOT_TIMEOUT = 90.0  # seconds: a 2-core CI machine running other QEMUs too
ORDERLY = [POWER_KEY_MESSAGE, SHUTDOWN_MESSAGE, "The system is going down NOW!", "Requesting system poweroff",
           "reboot: Power down"]


@pytest.fixture(scope="module")
def linux_guest():
    return guest_or_skip()


@pytest.fixture
def sim(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("JAILHOUSE_SIM_LINUX_POWERDOWN_S", "20")
    with SimBoard.running(tmp_path / "sim", engine="qemu") as board:
        yield board


def read_until(port: serial.Serial, text: str, timeout: float = BOOT_TIMEOUT) -> str:
    """Read the UART until ``text`` arrives; everything read so far."""
    port.timeout = timeout
    data = port.read_until(text.encode())
    assert data.endswith(text.encode()), f"{text!r} not seen within {timeout:g} s; UART tail:\n" \
                                          f"{data[-3000:].decode(errors='replace')}"
    return data.decode(errors="replace")


def boot(sim: SimBoard, tmp_path: Path, guest, name: str = "linux-demo", cpus=frozenset({2, 3}), uart: int = 1):
    cell = cells.write(tmp_path, cells.runphi_cell(name, set(cpus), uart=uart, ram_size=128 * MIB, reset=0))
    result = sim.jailhouse("cell", "linux", cell, guest.kernel, "-d", sim.layout.root / INMATE_DTB_PATH,
                           "-i", guest.initrd, "-c", "console=ttyAMA0", timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


def open_raw(sim: SimBoard, uart: int) -> serial.Serial:
    port = serial.Serial(str(sim.uart(uart)), baudrate=115200)
    # Raw: no local echo or line editing on our side of the pty; the guest echoes.
    import termios
    import tty

    tty.setraw(port.fileno(), termios.TCSANOW)
    return port


def test_linux_cell_boots_to_a_shell_and_shutdown_is_an_orderly_poweroff(sim, tmp_path, linux_guest):
    with open_raw(sim, 1) as port:
        boot(sim, tmp_path, linux_guest)
        read_until(port, BANNER)
        read_until(port, PROMPT)
        port.write(b"uname -m; cat /proc/cmdline\n")
        read_until(port, "\naarch64\r\n")
        read_until(port, "console=ttyAMA0")
        read_until(port, PROMPT)
        assert sim.state(1) == "running"

        started = time.monotonic()
        result = sim.jailhouse("cell", "shutdown", "linux-demo", timeout=60)
        assert (result.returncode, result.stderr) == (0, "")
        assert time.monotonic() - started < 20, "the guest powered off by itself well before the deadline"
        transcript = read_until(port, "reboot: Power down", timeout=5)
        positions = [transcript.find(line) for line in ORDERLY]
        assert -1 not in positions and positions == sorted(positions), transcript[-1500:]
    assert sim.state(1) == "shut down"
    assert sim.read_sysfs("cells/1/cpus_failed_list") == "\n"


def test_guest_poweroff_shuts_the_cell_down_by_itself(sim, tmp_path, linux_guest):
    with open_raw(sim, 1) as port:
        boot(sim, tmp_path, linux_guest)
        read_until(port, PROMPT)
        port.write(b"poweroff -f\n")
        read_until(port, "reboot: Power down")
    sim.wait_state(1, "shut down", timeout=20)


def test_a_guest_that_ignores_the_power_button_is_stopped_at_the_deadline(tmp_path, monkeypatch, linux_guest):
    monkeypatch.setenv("JAILHOUSE_SIM_LINUX_POWERDOWN_S", "2")
    with SimBoard.running(tmp_path / "sim", engine="qemu") as sim, open_raw(sim, 1) as port:
        boot(sim, tmp_path, linux_guest)
        read_until(port, PROMPT)
        port.write(b"killall acpid; echo acpid-$?-gone\n")
        read_until(port, "acpid-0-gone")
        started = time.monotonic()
        assert sim.jailhouse("cell", "shutdown", "linux-demo", timeout=60).returncode == 0
        assert 2 <= time.monotonic() - started < 15
        assert sim.state(1) == "shut down"
        port.timeout = 1
        assert SHUTDOWN_MESSAGE.encode() not in port.read(65536)


def test_qemu_engine_names_the_cause_when_qemu_cannot_run(tmp_path, monkeypatch, linux_guest):
    monkeypatch.setenv("JAILHOUSE_SIM_QEMU", str(tmp_path / "no-qemu-here"))
    with SimBoard.running(tmp_path / "sim", engine="qemu") as sim:
        boot(sim, tmp_path, linux_guest)
        sim.wait_state(1, "failed", timeout=20)
        assert (f'qemu engine failed for cell "linux-demo": QemuEngineError: cell "linux-demo": '
                f"cannot run {tmp_path}/no-qemu-here: No such file or directory") in sim.console()
    assert not os.path.exists(tmp_path / "sim" / "run" / "jailhouse-sim.sock")


def test_destroy_pulls_the_plug_without_asking_the_guest(sim, tmp_path, linux_guest):
    with open_raw(sim, 1) as port:
        boot(sim, tmp_path, linux_guest)
        read_until(port, PROMPT)
        started = time.monotonic()
        result = sim.jailhouse("cell", "destroy", "linux-demo", timeout=60)
        assert (result.returncode, result.stderr) == (0, "")
        assert time.monotonic() - started < 5  # not the 20 s power-button deadline of this fixture
        port.timeout = 1
        assert POWER_KEY_MESSAGE.encode() not in port.read(65536)
    assert "linux-demo" not in sim.jailhouse("cell", "list").stdout
