"""The README's shell blocks do what the README says.

Each ``sh`` block is taken from README.md as written and run; the only edits
are the ones that keep a test private: its ``/tmp/rphi-*`` paths go to a fresh
temporary directory, and the containerd commands talk to the test's private
containerd (``ctr`` gains ``--address`` and the tests' namespace, runphi's installed
path and ``/run/runphi`` become the test's). The extraction and these edits are
shared with the other docs' tests (tests/docblocks.py, tests/test_docs_blocks.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT
from tests.docblocks import clean_env, ctr_prelude, import_platform, private_paths, sh_block
from tools.testbed.containerd import short_tempdir

pytestmark = pytest.mark.qemu

README = REPO_ROOT / "README.md"
HELLO_CONSOLE = ("Hello from runphi inmate hello\n"
                 "hello: running at EL1 on the cell's first CPU\n"
                 "hello: timer frequency 62500000 Hz\n"
                 "hello: done, powering off\n")


def run_by_hand_block(section: str, private) -> subprocess.CompletedProcess[str]:
    """The README's block under ``section``, run from the checkout with ``mktemp -t`` in
    ``private``; it must exit 0 after printing the hello guest's four lines."""
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", sh_block(README, section)], cwd=REPO_ROOT,
                            env={**clean_env(), "TMPDIR": str(private)}, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert HELLO_CONSOLE in result.stdout.replace("\r\n", "\n")
    return result


def test_by_hand_block_runs_hello_on_the_simulator(built_inmates):
    private = short_tempdir("rphi-readme-")  # the block's `mktemp -t` honours TMPDIR
    try:
        result = run_by_hand_block("Try it by hand on the simulator", private)
        assert "jailhouse-sim: stopped" in result.stdout
        [board] = private.glob("rphi-*/board")
        assert not (board / "run" / "jailhouse-sim.pid").exists()
    finally:
        for board in private.glob("rphi-*/board"):  # after a failure half-way
            subprocess.run([str(REPO_ROOT / ".venv/bin/jailhouse-sim"), "down", "--root", str(board)],
                           capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        shutil.rmtree(private, ignore_errors=True)


def test_by_hand_block_runs_hello_on_kvm(built_inmates):
    private = short_tempdir("rphi-readme-")
    try:
        run_by_hand_block("Try it by hand on KVM (no simulator)", private)
        [node] = private.glob("rphi-*/node")
        assert list((node / "kvm-cells").iterdir()) == []  # `run` deleted the VM's cell
        assert json.loads((node / "jailhouse-ledger.json").read_text())["allocations"] == {}
    finally:
        shutil.rmtree(private, ignore_errors=True)


@pytest.mark.containerd
def test_containerd_blocks_build_import_run_kill_and_remove(zic_node, zic_events, built_inmates, tmp_path):
    build = sh_block(README, "Using runphi with containerd", 0)
    usage = sh_block(README, "Using runphi with containerd", 1)
    if zic_node.mode == "runc-cli":  # the README's other runtime flags, same commands
        [runc_cli] = sh_block(README, "Using runphi with containerd", 2).strip().splitlines()
        usage = "\n".join([runc_cli, *usage.strip().splitlines()[1:]])
    # The build block runs "from a checkout" and writes the archives where it runs.
    (tmp_path / ".venv").symlink_to(REPO_ROOT / ".venv")
    (tmp_path / "tools").symlink_to(REPO_ROOT / "tools")
    built = subprocess.run(["bash", "-euo", "pipefail", "-c", build], cwd=tmp_path, env=clean_env(),
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert built.returncode == 0, built.stderr
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["echo.tar", "hello.tar", "ticker.tar"]

    ctd = zic_node.containerd
    prelude = ctr_prelude(ctd)
    usage = private_paths(import_platform(usage), ctd, zic_node.runphi)
    [assignment, *commands] = [line for line in usage.splitlines() if line.strip()]
    outputs = {}
    try:
        for command in commands:
            if " -t " in command:
                continue  # needs a terminal: tests/test_e2e_zic.py drives `ctr run -t` through a pty
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{prelude}{assignment}\n{command}"],
                                  cwd=tmp_path, env=ctd.env, capture_output=True, text=True, timeout=180,
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            outputs[command.split("#")[0].strip()] = done.stdout
            if command.startswith("ctr task kill t1"):
                # What a person at the keyboard waits for before the next line.
                assert zic_events.exit_status("t1") == 143
    finally:
        ctd.ctr("task", "rm", "--force", "t1")
        ctd.ctr("containers", "rm", "t1")
        for guest in ("hello", "ticker", "echo"):
            ctd.ctr("images", "rm", "--sync", f"docker.io/library/{guest}:latest")
    [hello_out] = [out for command, out in outputs.items() if command.endswith("hello1")]
    assert hello_out.replace("\r\n", "\n") == HELLO_CONSOLE
    [listing] = [out for command, out in outputs.items() if command == "ctr task ls"]
    assert [row.split()[2] for row in listing.splitlines()[1:] if row.split()[0] == "t1"] == ["STOPPED"]
    assert zic_events.exit_status("hello1") == 0
    assert "t1" not in zic_node.cells() and zic_node.ledger() == {}


def test_every_relative_link_names_a_file_of_the_checkout():
    links = set(re.findall(r"\]\(([^)#:]+)\)", README.read_text()))
    assert len(links) >= 10
    assert sorted(link for link in links if not (REPO_ROOT / link).exists()) == []
