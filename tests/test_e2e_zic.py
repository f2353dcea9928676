"""ZICs end to end: the real containerd and its runc shim drive runphi, runphi drives a
simulated Jailhouse board whose cells run real aarch64 inmates under QEMU.

Nothing here talks to runphi directly: every action is a ``ctr`` command, every
observation is what ``ctr`` prints, what ``ctr events`` reports, the board's
sysfs or runphi's node ledger. The node (board + containerd) is shared by the
module; each test uses its own container ids and removes what it starts.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.fdread import read_until
from tools.testbed.containerd import ZIC_IMAGE_PLATFORM, ZicNode

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

#: A QEMU guest on a busy 2-core machine: generous, never the expected duration.
GUEST_TIMEOUT = 120.0


# ---- building ZICs -----------------------------------------------------------------------------

def zic_rootfs(base: Path, inmate: Path, *, vcpus: int = 1) -> Path:
    """A ZIC rootfs made by mkzic: ``/boot/config.json`` + ``/boot/<inmate name>``."""
    from tools.mkzic import BootDescription, Description, assemble, runtime_spec, write_bundle

    zic = assemble(Description(known=BootDescription(os_var="baremetal", starting_vaddress="0x70000000",
                                                     memory=16, vcpus=vcpus)), {"inmate": inmate})
    bundle = write_bundle(base / f"bundle-{inmate.stem}-{vcpus}", zic, runtime_spec(zic, hostname=inmate.stem))
    return bundle / "rootfs"


def script_guest(base: Path, marker: str) -> Path:
    """A simulator script guest that announces ``marker`` and then ticks with it, forever."""
    path = base / f"{marker}.bin"
    path.write_text(f"#!jailhouse-sim-inmate\nprint I am {marker}\\n\ntick 100 {marker} tick\n")
    return path


def ctr_run_zic(node: ZicNode, rootfs: Path, cid: str, *flags: str, timeout: float = GUEST_TIMEOUT):
    """``ctr run [flags] --rootfs ROOTFS CID /boot/<inmate>`` with runphi as the runtime."""
    inmate = next(p for p in (rootfs / "boot").iterdir() if p.name != "config.json")
    return node.containerd.ctr("run", *flags, *node.zic_flags(), "--rootfs", str(rootfs), cid,
                               f"/boot/{inmate.name}", timeout=timeout)


def log_text(path: Path) -> str:
    """A task log's content, bytes as written (no newline translation); "" before it exists."""
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


def wait_for_text(path: Path, text: str, timeout: float = GUEST_TIMEOUT) -> str:
    """Poll a task's log file (the shim writes it) until it contains ``text``."""
    deadline = time.monotonic() + timeout
    while True:
        content = log_text(path)
        if text in content:
            return content
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never showed {text!r}; it holds {content[-500:]!r}")
        time.sleep(0.05)


def assert_nothing_left(node: ZicNode, *cids: str) -> None:
    """No cell, no ledger entry, no runphi record and no containerd container for ``cids``."""
    cells = node.cells()
    ledger = node.ledger()
    containers = node.containerd.ctr("containers", "list", "--quiet").stdout.decode().split()
    for cid in cids:
        assert cid not in cells, cells
        assert cid not in ledger, ledger
        assert cid not in containers, containers
        assert not node.record_dir(cid).exists()


def remove_task_and_container(node: ZicNode, cid: str) -> subprocess.CompletedProcess:
    """``ctr task rm`` then ``ctr container rm``; returns the task rm result."""
    removed = node.containerd.ctr("task", "rm", cid)
    node.containerd.ctr("containers", "rm", cid, check=True)
    return removed


# ---- ctr run --rm ------------------------------------------------------------------------------

def test_hello_prints_its_console_and_exits_0(zic_node, zic_events, built_inmates, tmp_path):
    result = ctr_run_zic(zic_node, zic_rootfs(tmp_path, built_inmates / "hello.bin"), "e2e-hello", "--rm")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Hello from runphi inmate hello\r\n"), result.stdout
    assert result.stdout.endswith(b"hello: done, powering off\r\n"), result.stdout
    assert result.stderr == b""
    assert zic_events.exit_status("e2e-hello") == 0
    assert_nothing_left(zic_node, "e2e-hello")


def test_crashing_guest_exits_139(zic_node, zic_events, built_inmates, tmp_path):
    result = ctr_run_zic(zic_node, zic_rootfs(tmp_path, built_inmates / "crash.bin"), "e2e-crash", "--rm")
    assert result.returncode == 139, result.stderr
    assert b"crash: storing to 0x0c000000 (unassigned)" in result.stdout
    assert zic_events.exit_status("e2e-crash") == 139
    assert_nothing_left(zic_node, "e2e-crash")


# ---- ctr run -d, ctr task kill -----------------------------------------------------------------

@pytest.mark.parametrize(("kill_flags", "expected"), [((), 143), (("--signal", "SIGKILL"), 137)],
                         ids=["default-TERM", "KILL"])
def test_detached_ticker_killed_reports_128_plus_signal(zic_node, zic_events, built_inmates, tmp_path,
                                                        kill_flags, expected):
    cid = f"e2e-ticker-{expected}"
    log = tmp_path / "ticker.log"
    rootfs = zic_rootfs(tmp_path, built_inmates / "ticker.bin")
    started = ctr_run_zic(zic_node, rootfs, cid, "-d", "--log-uri", f"file://{log}")
    assert started.returncode == 0, started.stderr
    wait_for_text(log, "tick 2\r\n")
    assert zic_node.cells()[cid] == "running"

    killed = zic_node.containerd.ctr("task", "kill", *kill_flags, cid)
    assert killed.returncode == 0, killed.stderr
    assert zic_events.exit_status(cid) == expected
    if expected == 143:
        assert zic_node.cells()[cid] == "shut down"  # graceful: the cell stays until delete
    tasks = [row.split() for row in zic_node.containerd.ctr("task", "ls").stdout.decode().splitlines()[1:]]
    assert [row[2] for row in tasks if row[0] == cid] == ["STOPPED"], tasks

    removed = remove_task_and_container(zic_node, cid)
    assert f"exit code {expected}".encode() in removed.stderr, removed.stderr
    assert_nothing_left(zic_node, cid)
    assert log_text(log).startswith("Hello from runphi inmate ticker\r\ntick 1\r\n")


# ---- ctr run -t --------------------------------------------------------------------------------

def as_guest_sent(terminal_bytes: bytes) -> bytes:
    """Undo the one change ctr's own terminal makes: ``ctr run -t`` leaves OPOST|ONLCR on
    (for runc containers as well), so a guest's ``\r\n`` shows as ``\r\r\n``."""
    return terminal_bytes.replace(b"\r\r\n", b"\r\n")


def echo_session_on_a_terminal(node: ZicNode, rootfs: Path, cid: str, line: bytes) -> bytes:
    """``ctr run --rm -t`` of the echo inmate from a real terminal: type ``line``, then ``exit``;
    what the terminal showed, once ctr exited 0 (AssertionError otherwise)."""
    master, slave = os.openpty()
    argv = node.containerd.ctr_argv("run", "--rm", "-t", *node.zic_flags(), "--rootfs", str(rootfs), cid,
                                    "/boot/echo.bin")
    ctr = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=node.containerd.env,
                           start_new_session=True)
    os.close(slave)
    seen = bytearray()
    try:
        read_until(master, b"> ", seen, timeout=GUEST_TIMEOUT)
        os.write(master, line + b"\r")
        read_until(master, line + b"\r\r\n> ", seen, timeout=GUEST_TIMEOUT)
        os.write(master, b"exit\r")
        read_until(master, b"echo: bye\r\r\n", seen, timeout=GUEST_TIMEOUT)
        assert ctr.wait(GUEST_TIMEOUT) == 0, bytes(seen)
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
        os.close(master)
    return bytes(seen)


def test_interactive_echo_session_on_a_terminal(zic_node, zic_events, built_inmates, tmp_path):
    rootfs = zic_rootfs(tmp_path, built_inmates / "echo.bin")
    seen = echo_session_on_a_terminal(zic_node, rootfs, "e2e-echo-tty", b"typed through containerd")
    # The terminal does not echo (ctr made it raw): the typed line appears once, sent back by
    # the guest; `exit` is not echoed, the guest says bye and powers off.
    assert as_guest_sent(seen) == (b"Hello from runphi inmate echo\r\n"
                                   b"echo: type a line, 'exit' powers off\r\n"
                                   b"> typed through containerd\r\n"
                                   b"> echo: bye\r\n")
    assert zic_events.exit_status("e2e-echo-tty") == 0
    assert_nothing_left(zic_node, "e2e-echo-tty")


# ---- stdin without a terminal ------------------------------------------------------------------

def test_piped_stdin_reaches_the_guest_and_its_end_does_not_stop_it(zic_node, zic_events, built_inmates,
                                                                     tmp_path):
    # Without -t, ctr copies its stdin into the task's stdin FIFO; at its EOF it sends CloseIO.
    cid = "e2e-echo-pipe"
    rootfs = zic_rootfs(tmp_path, built_inmates / "echo.bin")
    argv = zic_node.containerd.ctr_argv("run", "--rm", *zic_node.zic_flags(), "--rootfs", str(rootfs), cid,
                                        "/boot/echo.bin")
    ctr = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=zic_node.containerd.env)
    seen = bytearray()
    try:
        read_until(ctr.stdout.fileno(), b"> ", seen, timeout=GUEST_TIMEOUT)
        ctr.stdin.write(b"piped line\r")
        ctr.stdin.flush()
        read_until(ctr.stdout.fileno(), b"> piped line\r\n> ", seen, timeout=GUEST_TIMEOUT)
        ctr.stdin.close()  # the end of the input is not the end of the guest
        tasks = zic_node.containerd.ctr("task", "ls").stdout.decode().splitlines()[1:]
        assert [row.split()[2] for row in tasks if row.split()[0] == cid] == ["RUNNING"], tasks
        killed = zic_node.containerd.ctr("task", "kill", cid)
        assert killed.returncode == 0, killed.stderr
        assert ctr.wait(GUEST_TIMEOUT) == 143
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
    assert b"bye" not in seen
    assert zic_events.exit_status(cid) == 143
    assert_nothing_left(zic_node, cid)


# ---- an imported image -------------------------------------------------------------------------

def test_imported_zic_image_runs_from_containerds_snapshot(zic_node, zic_events, built_inmates, tmp_path):
    from tools.mkzic import (BootDescription, Description, assemble, build_image_archive, parse_image_name,
                             write_archive)

    zic = assemble(Description(known=BootDescription(os_var="baremetal", starting_vaddress="0x70000000",
                                                     memory=16, vcpus=1)),
                   {"inmate": built_inmates / "hello.bin"})
    archive = write_archive(tmp_path / "hello.tar", build_image_archive(zic, parse_image_name("e2e-hello:1")))
    image = "docker.io/library/e2e-hello:1"
    ctr = zic_node.containerd.ctr
    imported = ctr("images", "import", "--platform", ZIC_IMAGE_PLATFORM, str(archive))
    assert imported.returncode == 0, imported.stderr
    try:
        result = ctr("run", "--rm", *zic_node.zic_flags(), image, "e2e-image", timeout=GUEST_TIMEOUT)
    finally:
        ctr("images", "rm", "--sync", image)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Hello from runphi inmate hello\r\n"), result.stdout
    assert result.stdout.endswith(b"hello: done, powering off\r\n")
    [created] = [payload for topic, payload in zic_events.topics("e2e-image") if topic == "/tasks/create"]
    assert [mount["type"] for mount in created["rootfs"]] == ["overlay"]  # the snapshotter's rootfs
    assert zic_events.exit_status("e2e-image") == 0
    assert_nothing_left(zic_node, "e2e-image")


# ---- four at once ------------------------------------------------------------------------------

def test_four_zics_at_once_on_their_own_cpus_and_uarts(zic_node, zic_events, built_inmates, tmp_path):
    guests = {  # container id → (inmate, text only that guest prints)
        "e2e-four-ticker": (built_inmates / "ticker.bin", "Hello from runphi inmate ticker"),
        "e2e-four-echo": (built_inmates / "echo.bin", "Hello from runphi inmate echo"),
        "e2e-four-c": (script_guest(tmp_path, "guest-c"), "I am guest-c"),
        "e2e-four-d": (script_guest(tmp_path, "guest-d"), "I am guest-d"),
    }
    logs = {cid: tmp_path / f"{cid}.log" for cid in guests}
    try:
        for cid, (inmate, _) in guests.items():
            started = ctr_run_zic(zic_node, zic_rootfs(tmp_path, inmate), cid, "-d",
                                  "--log-uri", f"file://{logs[cid]}")
            assert started.returncode == 0, started.stderr
        for cid, (_, banner) in guests.items():
            wait_for_text(logs[cid], banner)
        wait_for_text(logs["e2e-four-ticker"], "tick 2\r\n")
        wait_for_text(logs["e2e-four-c"], "guest-c tick 2\r\n")
        wait_for_text(logs["e2e-four-d"], "guest-d tick 2\r\n")

        cells = zic_node.cells()
        assert {cid: cells.get(cid) for cid in guests} == dict.fromkeys(guests, "running")
        cpus = [zic_node.cell_cpus(cid) for cid in guests]
        assert len(set(cpus)) == 4 and "0" not in cpus, cpus
        ledger = zic_node.ledger()
        assert len({ledger[cid]["uart_slot"] for cid in guests}) == 4, ledger

        for cid in guests:
            others = [banner for other, (_, banner) in guests.items() if other != cid]
            text = log_text(logs[cid])
            assert not any(banner in text for banner in others), (cid, text[:300])
        assert "tick" not in log_text(logs["e2e-four-echo"])
        assert "guest-" not in log_text(logs["e2e-four-ticker"])

        for cid in guests:
            killed = zic_node.containerd.ctr("task", "kill", cid)
            assert killed.returncode == 0, killed.stderr
        assert {cid: zic_events.exit_status(cid) for cid in guests} == dict.fromkeys(guests, 143)
    finally:
        for cid in guests:
            zic_node.containerd.ctr("task", "rm", "--force", cid)
            zic_node.containerd.ctr("containers", "rm", cid)
    assert_nothing_left(zic_node, *guests)


# ---- a create that cannot succeed ----------------------------------------------------------------

def test_create_asking_more_cpus_than_the_board_has_fails_with_runphis_message(zic_node, built_inmates,
                                                                               tmp_path):
    rootfs = zic_rootfs(tmp_path, built_inmates / "hello.bin", vcpus=9)
    result = ctr_run_zic(zic_node, rootfs, "e2e-too-big", "--rm")
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    # runc's shim prefixes what its runtime said; runphi's own shim answers with the line itself.
    through = "OCI runtime create failed: " if zic_node.mode == "runc-cli" else ""
    assert line.startswith(f"ctr: failed to create shim task: {through}"
                           "cannot create container e2e-too-big on sim-qemu-arm64: 9 CPU(s) requested, "
                           "7 free for cells"), line
    assert_nothing_left(zic_node, "e2e-too-big")
