"""The Linux guest booted directly under QEMU (no simulator, no runphi) on a real pty.

The first run fetches Debian's arm64 kernel and busybox-static with apt (needs root);
later runs use the cache (see ``python -m tools.linux_guest --help``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tools.jailhouse_sim.qmp import QmpClient
from tools.linux_guest import BANNER, POWER_KEY_MESSAGE, PROMPT, SHUTDOWN_MESSAGE, LinuxGuest
from tools.linux_guest.testing import boot_in_qemu, guest_or_skip

pytestmark = pytest.mark.qemu

ORDERLY_POWEROFF = ("The system is going down NOW!", "Requesting system poweroff", "reboot: Power down")


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return guest_or_skip()


async def test_shell_has_job_control_answers_uname_and_poweroff_f_ends_qemu(linux_guest, tmp_path: Path):
    async with boot_in_qemu(linux_guest, tmp_path) as vm:
        after_banner = await vm.console.expect(BANNER)
        await vm.console.expect(PROMPT, after_banner)
        assert await vm.run("uname -m") == "aarch64"
        # cttyhack gave the shell the real console as controlling tty: job control and ^C work.
        assert await vm.run("tty") == "/dev/ttyAMA0"
        await vm.run("sleep 300 &")
        assert "Running" in await vm.run("jobs")
        # ^C must find the job in the foreground: the job itself says when it is (a forked
        # foreground job takes the terminal before it runs), then becomes the sleep.
        mark = await vm.type('sh -c \'echo "st""arted"; exec sleep 300\'\n')
        started = await vm.console.expect("\r\nstarted", mark)
        await vm.type("\x03")
        await vm.console.expect(PROMPT, started, timeout=10)
        mark = await vm.type("poweroff -f\n")
        assert await vm.wait_exit() == 0
        # QEMU may exit before the transcript reader has taken the last lines off the pty.
        await vm.console.expect("reboot: Power down", mark, timeout=10)
        assert "The system is going down" not in vm.console.text  # -f skips init


async def test_power_button_gives_an_orderly_poweroff(linux_guest, tmp_path: Path):
    async with boot_in_qemu(linux_guest, tmp_path) as vm:
        await vm.console.expect(PROMPT, await vm.console.expect(BANNER))
        mark = vm.console.mark()
        stream = await trio.open_unix_socket(str(vm.qmp_path))
        async with stream, trio.open_nursery() as nursery:
            qmp = await QmpClient.connect(stream)
            nursery.start_soon(qmp.serve)
            await qmp.execute("system_powerdown")
            async for event in qmp.events:
                if event.name == "SHUTDOWN":
                    assert event.data == {"guest": True, "reason": "guest-shutdown"}
                    break
            nursery.cancel_scope.cancel()
        assert await vm.wait_exit() == 0
        at = await vm.console.expect(POWER_KEY_MESSAGE, mark, timeout=5)
        at = await vm.console.expect(SHUTDOWN_MESSAGE, at, timeout=5)
        for line in ORDERLY_POWEROFF:
            at = await vm.console.expect(line, at, timeout=5)


async def test_leaving_the_shell_powers_off_in_order(linux_guest, tmp_path: Path):
    async with boot_in_qemu(linux_guest, tmp_path) as vm:
        await vm.console.expect(PROMPT, await vm.console.expect(BANNER))
        mark = await vm.type("exit\n")
        assert await vm.wait_exit() == 0
        at = await vm.console.expect(SHUTDOWN_MESSAGE, mark, timeout=5)
        for line in ORDERLY_POWEROFF:
            at = await vm.console.expect(line, at, timeout=5)
