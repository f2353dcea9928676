"""The Linux ZIC under the real containerd: ``ctr run -t`` gives a shell in the cell, ``ctr
task kill`` is an orderly guest poweroff (143), and a Linux ZIC runs beside an inmate ZIC on
CPUs and UARTs of its own. The board is the simulator with the QEMU engine; the image is
``python -m tools.linux_guest zic`` imported into containerd.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tools.testbed.containerd import ZIC_IMAGE_PLATFORM
from tests.fdread import read_until
from tests.test_e2e_zic import GUEST_TIMEOUT, assert_nothing_left, ctr_run_zic, log_text, wait_for_text, zic_rootfs
from tools.linux_guest import BANNER, POWER_KEY_MESSAGE, PROMPT, SHUTDOWN_MESSAGE
from tools.linux_guest.testing import guest_or_skip

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE = "docker.io/library/runphi-linux-guest:test"
ORDERLY_POWEROFF = (POWER_KEY_MESSAGE, SHUTDOWN_MESSAGE, "The system is going down NOW!",
                    "Requesting system poweroff", "reboot: Power down")


@contextmanager
def imported_linux_image(node, directory: Path, name: str, *zic_flags: str) -> Iterator[str]:
    """``python -m tools.linux_guest zic [ZIC_FLAGS]`` built into ``directory`` and imported into
    the node's containerd as ``name`` (removed afterwards); skips without the guest's parts."""
    guest_or_skip()
    archive = directory / "linux.tar"
    built = subprocess.run([sys.executable, "-m", "tools.linux_guest", "zic", "--archive", str(archive),
                            "--name", name, *zic_flags], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    ctr = node.containerd.ctr
    imported = ctr("images", "import", "--platform", ZIC_IMAGE_PLATFORM, str(archive), timeout=300)
    assert imported.returncode == 0, imported.stderr
    try:
        yield name
    finally:
        ctr("images", "rm", "--sync", name)


@pytest.fixture(scope="module")
def linux_image(zic_node, tmp_path_factory) -> Iterator[str]:
    """The Linux ZIC imported into the node's containerd (removed after the module)."""
    with imported_linux_image(zic_node, tmp_path_factory.mktemp("linux-image"), IMAGE) as image:
        yield image


def in_order(text: str, lines: tuple[str, ...]) -> bool:
    positions = [text.find(line) for line in lines]
    return -1 not in positions and positions == sorted(positions)


def uname_on_a_terminal_then_poweroff(node, image: str, cid: str, while_running=lambda: None) -> bytes:
    """``ctr run --rm -t`` of the Linux ZIC from a real terminal: wait for its shell, check
    ``uname -m`` says aarch64, call ``while_running``, ``poweroff -f``; what the terminal showed,
    once ctr exited 0."""
    master, slave = os.openpty()
    argv = node.containerd.ctr_argv("run", "--rm", "-t", *node.zic_flags(), image, cid)
    ctr = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=node.containerd.env,
                           start_new_session=True)
    os.close(slave)
    seen = bytearray()
    try:
        read_until(master, BANNER.encode(), seen, timeout=GUEST_TIMEOUT)
        read_until(master, PROMPT.encode(), seen, timeout=GUEST_TIMEOUT)
        mark = len(seen)
        os.write(master, b"uname -m\r")
        read_until(master, PROMPT.encode(), seen, start=mark, timeout=GUEST_TIMEOUT)
        assert b"\naarch64\r" in seen[mark:], bytes(seen[mark:])
        while_running()
        os.write(master, b"poweroff -f\r")
        read_until(master, b"reboot: Power down", seen, start=mark, timeout=GUEST_TIMEOUT)
        assert ctr.wait(GUEST_TIMEOUT) == 0, bytes(seen[-2000:])
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
        os.close(master)
    return bytes(seen)


def test_ctr_run_t_gives_a_shell_in_the_cell(zic_node, zic_events, linux_image):
    def one_running_cell() -> None:
        assert zic_node.cells() == {"linux-tty": "running"}

    seen = uname_on_a_terminal_then_poweroff(zic_node, linux_image, "linux-tty", one_running_cell)
    assert b"uname -m\r\r\naarch64\r\r\n" in seen  # the guest's echo and answer, through ctr's tty
    assert zic_events.exit_status("linux-tty") == 0
    assert_nothing_left(zic_node, "linux-tty")


def kill_is_an_orderly_poweroff(node, events, image: str, cid: str, log: Path) -> None:
    """``ctr run -d`` the Linux ZIC, ``ctr task kill`` it once its shell is up: the power button
    reaches the guest, which shuts down in order, and the task exits 143 leaving nothing."""
    ctr = node.containerd.ctr
    started = ctr("run", "-d", "--log-uri", f"file://{log}", *node.zic_flags(), image, cid)
    assert started.returncode == 0, started.stderr
    try:
        wait_for_text(log, PROMPT)
        killed = ctr("task", "kill", cid)
        assert killed.returncode == 0, killed.stderr
        assert events.exit_status(cid, timeout=GUEST_TIMEOUT) == 143
        text = log_text(log)
        assert in_order(text[text.find(PROMPT):], ORDERLY_POWEROFF), text[-2000:]
    finally:
        ctr("task", "rm", "--force", cid)
        ctr("containers", "rm", cid)
    assert_nothing_left(node, cid)


def test_ctr_task_kill_is_an_orderly_poweroff_and_exit_143(zic_node, zic_events, linux_image, tmp_path):
    kill_is_an_orderly_poweroff(zic_node, zic_events, linux_image, "linux-kill", tmp_path / "linux-kill.log")


def test_linux_and_an_inmate_zic_side_by_side(zic_node, zic_events, linux_image, built_inmates, tmp_path):
    logs = {cid: tmp_path / f"{cid}.log" for cid in ("side-linux", "side-ticker")}
    ctr = zic_node.containerd.ctr
    try:
        started = ctr("run", "-d", "--log-uri", f"file://{logs['side-linux']}", *zic_node.zic_flags(),
                      linux_image, "side-linux")
        assert started.returncode == 0, started.stderr
        started = ctr_run_zic(zic_node, zic_rootfs(tmp_path, built_inmates / "ticker.bin"), "side-ticker", "-d",
                              "--log-uri", f"file://{logs['side-ticker']}")
        assert started.returncode == 0, started.stderr
        wait_for_text(logs["side-linux"], PROMPT)
        wait_for_text(logs["side-ticker"], "tick 3\r\n")

        cells = zic_node.cells()
        assert {cid: cells.get(cid) for cid in logs} == dict.fromkeys(logs, "running")
        cpus = {cid: zic_node.cell_cpus(cid) for cid in logs}
        assert cpus["side-linux"] != cpus["side-ticker"] and "0" not in cpus.values(), cpus
        ledger = zic_node.ledger()
        assert ledger["side-linux"]["uart_slot"] != ledger["side-ticker"]["uart_slot"], ledger
        assert "tick" not in log_text(logs["side-linux"])
        assert BANNER not in log_text(logs["side-ticker"]) and "Linux" not in log_text(logs["side-ticker"])

        for cid in logs:
            killed = ctr("task", "kill", cid)
            assert killed.returncode == 0, killed.stderr
        assert {cid: zic_events.exit_status(cid, timeout=GUEST_TIMEOUT) for cid in logs} == dict.fromkeys(logs, 143)
        assert in_order(log_text(logs["side-linux"]), ORDERLY_POWEROFF)
    finally:
        for cid in logs:
            ctr("task", "rm", "--force", cid)
            ctr("containers", "rm", cid)
    assert_nothing_left(zic_node, *logs)
