"""The Linux guest as a ZIC: ``python -m tools.linux_guest zic`` builds it, ``runphi run``
boots it in a cell of the simulated board (script engine: the boot banner; QEMU engine:
the real kernel, a shell on the ZIC's stdio, exit codes of DESIGN §4).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.test_lifecycle_harness import RUNPHI, Board, Zic, subreaper  # noqa: F401
from tools.linux_guest import BANNER, POWER_KEY_MESSAGE, PROMPT, SHUTDOWN_MESSAGE, LinuxGuest
from tools.linux_guest.testing import Transcript, guest_or_skip

pytestmark = pytest.mark.qemu
REPO_ROOT = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return guest_or_skip()


@pytest.fixture(scope="module")
def linux_bundle(linux_guest, tmp_path_factory) -> Path:
    """One Linux ZIC bundle for the module (the 32 MiB kernel is copied once)."""
    bundle = tmp_path_factory.mktemp("linux-zic") / "bundle"
    done = subprocess.run([sys.executable, "-m", "tools.linux_guest", "zic", "--bundle", str(bundle),
                           "--annotation", "org.runphi.runtime=runphi"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"bundle {bundle}\n"
    return bundle


def _board(engine: str, subreaper) -> Iterator[Board]:
    base = Path(tempfile.mkdtemp(prefix=f"rphi-linux-{engine}-"))
    board = Board(base / "sim", engine=engine)
    board.up()
    try:
        yield board
    finally:
        board.down()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def script_board(subreaper) -> Iterator[Board]:
    yield from _board("script", subreaper)


@pytest.fixture(scope="module")
def qemu_board(subreaper) -> Iterator[Board]:
    yield from _board("qemu", subreaper)


class RunningZic:
    """``runphi run`` in the foreground with its stdio on pipes, as a shim without a tty would."""

    def __init__(self, zic: Zic, process: trio.Process, console: Transcript) -> None:
        self.zic = zic
        self.process = process
        self.console = console

    async def type(self, keys: str) -> int:
        mark = self.console.mark()
        await self.process.stdin.send_all(keys.encode())
        return mark

    async def runphi(self, *args: str) -> subprocess.CompletedProcess:
        return await trio.run_process([str(RUNPHI), "--root", str(self.zic.root), *args], env=self.zic.env,
                                      capture_stdout=True, capture_stderr=True, check=False)

    async def exit_status(self, timeout: float = 60.0) -> int:
        with trio.move_on_after(timeout):
            return await self.process.wait()
        raise AssertionError(f"runphi run still running after {timeout:g} s; output tail:\n"
                             f"{self.console.text[-3000:]}")


@asynccontextmanager
async def runphi_run(board: Board, tmp_path: Path, bundle: Path, cid: str) -> AsyncIterator[RunningZic]:
    zic = Zic(board, tmp_path)
    process = await trio.lowlevel.open_process(
        [str(RUNPHI), "--root", str(zic.root), "run", "--bundle", str(bundle), cid],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=zic.env)
    console = Transcript()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(console.pump, process.stdout)
        try:
            yield RunningZic(zic, process, console)
        finally:
            if process.returncode is None:
                await trio.run_process([str(RUNPHI), "--root", str(zic.root), "kill", cid, "KILL"], env=zic.env,
                                       capture_stdout=True, capture_stderr=True, check=False)
                with trio.move_on_after(30):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    assert board.cells() == {}, "runphi run left a cell behind"


def test_zic_bundle_describes_a_linux_guest(linux_bundle: Path, linux_guest: LinuxGuest):
    description = json.loads((linux_bundle / "rootfs/boot/config.json").read_text())
    kernel = Path(linux_guest.kernel).name
    assert description == {"os_var": "linux", "inmate": f"/boot/{kernel}", "initrd": "/boot/initrd.cpio.gz",
                           "dtb": "/boot/inmate-qemu-arm64.dtb", "memory": 128, "vcpus": 1}
    assert (linux_bundle / "rootfs/boot" / kernel).read_bytes() == Path(linux_guest.kernel).read_bytes()
    config = json.loads((linux_bundle / "config.json").read_text())
    assert config["annotations"]["org.runphi.runtime"] == "runphi"


async def test_runphi_run_on_the_script_engine_shows_the_linux_boot(script_board, linux_bundle, linux_guest,
                                                                    tmp_path):
    async with runphi_run(script_board, tmp_path, linux_bundle, "linux-banner") as zic:
        at = await zic.console.expect("[jailhouse-sim] linux guest: kernel ", timeout=60)
        line = zic.console.text[at:].split("\r\n", 1)[0]
        size = Path(linux_guest.kernel).stat().st_size
        assert line.startswith(f"{size} bytes") and f"initrd {Path(linux_guest.initrd).stat().st_size} bytes" in line
        assert script_board.cells() == {"linux-banner": "running"}
        assert (await zic.runphi("kill", "linux-banner", "TERM")).returncode == 0
        assert await zic.exit_status() == 143


async def test_runphi_run_boots_to_a_shell_and_poweroff_f_exits_0(qemu_board, linux_bundle, tmp_path):
    async with runphi_run(qemu_board, tmp_path, linux_bundle, "linux-shell") as zic:
        await zic.console.expect(PROMPT, await zic.console.expect(BANNER, timeout=BOOT_TIMEOUT))
        mark = await zic.type("uname -m\n")
        await zic.console.expect("\naarch64\r\n", mark, timeout=30)
        await zic.console.expect(PROMPT, mark, timeout=30)
        # runphi put the console of the ZIC's UART slot on the kernel command line.
        mark = await zic.type("cat /proc/cmdline\n")
        await zic.console.expect("\nconsole=ttyAMA0\r\n", mark, timeout=30)
        await zic.type("poweroff -f\n")
        assert await zic.exit_status() == 0


async def test_kill_term_is_an_orderly_guest_poweroff_and_exit_143(qemu_board, linux_bundle, tmp_path):
    async with runphi_run(qemu_board, tmp_path, linux_bundle, "linux-term") as zic:
        await zic.console.expect(PROMPT, await zic.console.expect(BANNER, timeout=BOOT_TIMEOUT))
        mark = zic.console.mark()
        killed = await zic.runphi("kill", "linux-term", "TERM")
        assert killed.returncode == 0, killed.stderr
        assert await zic.exit_status() == 143
        at = mark
        for line in (POWER_KEY_MESSAGE, SHUTDOWN_MESSAGE, "The system is going down NOW!",
                     "Requesting system poweroff", "reboot: Power down"):
            at = await zic.console.expect(line, at, timeout=5)
