"""A failed `create` at each step leaves nothing: no cell, no ledger entry, no monitor,
no state directory — and says why in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_lifecycle_harness import board, guest_script, live_children, subreaper, zic  # noqa: F401


def live_runphi_descendants() -> list[int]:
    """Non-zombie processes adopted by (or children of) this test process running runphi."""
    found = []
    for pid in live_children(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # exited while we looked
            continue
        if b"runphi" in cmdline and b"jailhouse-sim" not in cmdline:
            found.append(pid)
    return found


def assert_nothing_left(zic, cid: str) -> None:
    assert zic.board.cells() == {}, "a cell was left behind"
    ledger = zic.node / "jailhouse-ledger.json"
    if ledger.exists():
        assert json.loads(ledger.read_text()).get("allocations", {}) == {}, "ledger entry left behind"
    assert not (zic.root / cid).exists(), "state directory left behind"
    assert live_runphi_descendants() == [], "a monitor was left running"


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("op", "errno_name", "words"),
    [("create", "EBUSY", "owned by another cell"), ("create", "EEXIST", "already exists"),
     ("create", "ENOMEM", "memory pool"), ("load", "EINVAL", "does not fit")],
)
def test_hypervisor_failure_at_each_step_is_undone(zic, op, errno_name, words):
    bundle = zic.bundle("b", guest_script("tick 50 x"))
    zic.board.inject("--op", op, "--errno", errno_name)
    result = zic.run("create", "--bundle", str(bundle), "--pid-file", str(zic.base / "p"), "failz")
    assert result.returncode == 1
    line = one_error_line(result)
    assert words in line and "failz" in line
    assert not (zic.base / "p").exists()
    assert_nothing_left(zic, "failz")


def test_failing_create_runtime_hook_undoes_everything(zic, tmp_path):
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\necho nope >&2\nexit 7\n")
    hook.chmod(0o755)
    bundle = zic.bundle("b", guest_script("tick 50 x"), hooks={"createRuntime": [{"path": str(hook)}]})
    result = zic.run("create", "--bundle", str(bundle), "--pid-file", str(zic.base / "p"), "hookz")
    assert result.returncode == 1
    assert "createRuntime hook #0" in one_error_line(result)
    assert_nothing_left(zic, "hookz")


def test_unreachable_console_socket_undoes_everything(zic):
    bundle = zic.bundle("b", guest_script("tick 50 x"), terminal=True)
    result = zic.run("create", "--bundle", str(bundle), "--console-socket", str(zic.base / "nobody.sock"),
                     "--pid-file", str(zic.base / "p"), "sockz")
    assert result.returncode == 1
    one_error_line(result)
    assert_nothing_left(zic, "sockz")


def test_missing_inmate_is_refused_before_anything_is_made(zic):
    bundle = zic.bundle("b", guest_script("tick 50 x"), boot={"inmate": "/boot/missing.bin"})
    result = zic.run("create", "--bundle", str(bundle), "--pid-file", str(zic.base / "p"), "noimg")
    assert result.returncode == 1
    assert "missing.bin" in one_error_line(result)
    assert_nothing_left(zic, "noimg")


def test_too_much_memory_names_what_is_free(zic):
    bundle = zic.bundle("b", guest_script("tick 50 x"), boot={"memory": 64 * 1024})
    result = zic.run("create", "--bundle", str(bundle), "--pid-file", str(zic.base / "p"), "bigz")
    assert result.returncode == 1
    one_error_line(result)
    assert_nothing_left(zic, "bigz")


def test_a_second_create_with_the_same_id_fails_and_keeps_the_first(zic):
    bundle = zic.bundle("b", guest_script("tick 50 x"))
    zic.create("dupz", bundle)
    result = zic.run("create", "--bundle", str(bundle), "--pid-file", str(zic.base / "p2"), "dupz")
    assert result.returncode == 1
    assert "exists" in one_error_line(result)
    assert zic.status("dupz") == "created"
    assert zic.board.cell_state("dupz") == "shut down"


@pytest.mark.parametrize(("boot", "words"), [({"rpu_req": True, "os_var": "linux"}, "cannot run on an RPU"),
                                             ({"rpu_req": True}, "has none")])
def test_guests_this_board_cannot_run_are_refused(zic, boot, words):
    bundle = zic.bundle("b", guest_script("tick 50 x"), boot=boot)
    result = zic.run("create", "--bundle", str(bundle), "--pid-file", str(zic.base / "p"), "unsup")
    assert result.returncode == 1
    assert words in one_error_line(result)
    assert_nothing_left(zic, "unsup")
