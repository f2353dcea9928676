"""``bash setup.sh demo --linux`` (``python -m tools.demo --linux``) without a terminal: after
the inmates, the Linux ZIC boots, the demo types into its shell, and it powers off in order."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tools.linux_guest import BANNER, SHUTDOWN_MESSAGE
from tools.linux_guest.testing import guest_or_skip

pytestmark = pytest.mark.qemu


def test_demo_linux_types_into_the_guest_shell_and_it_powers_off(built_inmates):
    guest_or_skip()
    result = subprocess.run([sys.executable, "-m", "tools.demo", "--linux"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert result.stderr == ""
    guest = [line[len("  guest | "):] for line in result.stdout.splitlines() if line.startswith("  guest | ")]
    linux = guest[next(i for i, line in enumerate(guest) if line.startswith(BANNER)):]
    assert "runphi-guest:/# uname -m" in linux and "aarch64" in linux
    shown = "\n".join(linux[linux.index("runphi-guest:/# poweroff"):])
    assert SHUTDOWN_MESSAGE in shown and "Requesting system poweroff" in shown
    assert "\x1b" not in "\n".join(linux)  # the shell's terminal query is not shown
    assert "demo: the Linux guest answered and powered off in order: exit status 0" in result.stdout
    assert result.stdout.rstrip().endswith("nothing is left running")
