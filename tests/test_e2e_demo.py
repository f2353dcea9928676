"""The README demo (``bash setup.sh demo`` runs ``python -m tools.demo``), run as users run it.

Each run must show the real guests' console, exit 0, and leave nothing behind:
no process and no mount that refers to its work directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tools.testbed.containerd import missing_requirements, short_tempdir

pytestmark = pytest.mark.qemu

DEMO_TIMEOUT_S = 600

HELLO_CONSOLE = ["  guest | Hello from runphi inmate hello",
                 "  guest | hello: running at EL1 on the cell's first CPU",
                 "  guest | hello: timer frequency 62500000 Hz",
                 "  guest | hello: done, powering off"]
ECHO_CONSOLE = ["  guest | Hello from runphi inmate echo",
                "  guest | echo: type a line, 'exit' powers off",
                "  guest | > hello from the demo",
                "  guest | > echo: bye"]


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tools.demo ARGS`` from the checkout, as ``bash setup.sh demo`` runs it."""
    return subprocess.run([sys.executable, "-m", "tools.demo", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=DEMO_TIMEOUT_S, stdin=subprocess.DEVNULL)


def guest_lines(stdout: str) -> list[str]:
    """The lines the demo shows as the guest's console."""
    return [line for line in stdout.splitlines() if line.startswith("  guest | ")]


def processes_mentioning(path: Path) -> list[str]:
    """Command lines of live processes that name ``path`` (a leftover daemon, shim, QEMU...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        if str(path) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def mounts_under(path: Path) -> list[str]:
    """Mount table lines that name ``path`` (a snapshot left mounted)."""
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line]


def assert_nothing_left(path: Path) -> None:
    """No process and no mount refers to ``path`` any more."""
    assert processes_mentioning(path) == []
    assert mounts_under(path) == []


@pytest.mark.containerd
def test_demo_streams_the_guests_through_containerd_and_cleans_up(built_inmates):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    result = run_demo()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert guest_lines(result.stdout) == HELLO_CONSOLE + ECHO_CONSOLE
    assert "demo: ctr run --rm docker.io/library/hello:demo demo-hello   (runtime: io.containerd.runphi.v2)" in result.stdout
    assert "demo: ctr run --rm docker.io/library/echo:demo demo-echo   (runtime: io.containerd.runphi.v2)" in result.stdout
    shown_in_readme = [line[4:] for line in (REPO_ROOT / "README.md").read_text().splitlines()
                       if line.startswith(("    demo: ", "      guest | "))]
    assert len(shown_in_readme) >= 10
    assert [line for line in shown_in_readme if line not in result.stdout.splitlines()] == []
    [workdir] = re.findall(r"a private containerd in (/\S+)/zic-node", result.stdout)
    assert not Path(workdir).exists()  # the temporary directory is removed
    assert_nothing_left(Path(workdir))


def test_demo_without_containerd_runs_the_guests_with_runphi_run(built_inmates):
    workdir = short_tempdir("rphi-demo-")
    try:
        result = run_demo("--no-containerd", "--workdir", str(workdir))
        assert result.returncode == 0, result.stdout + result.stderr
        assert guest_lines(result.stdout) == HELLO_CONSOLE + ECHO_CONSOLE
        assert f"demo: runphi run --bundle {workdir}/bundles/hello demo-hello" in result.stdout
        assert (workdir / "sim").is_dir()  # --workdir is kept for inspection...
        assert_nothing_left(workdir)  # ...with nothing running in it
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def test_demo_refuses_a_workdir_that_is_not_empty(tmp_path):
    (tmp_path / "something").write_text("mine")
    result = run_demo("--workdir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == f"demo: error: --workdir {tmp_path} is not empty; give an empty or new directory\n"
    assert (tmp_path / "something").read_text() == "mine"
