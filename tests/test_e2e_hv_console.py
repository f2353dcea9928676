"""The hypervisor console as a ZIC's console on the real boards, end to end (#22).

Every real platform template (qemu-arm64, zcu102, zcu104, kria-kv260) has no UART the
root can read: its ZICs stream through the Jailhouse debug console, leased to one ZIC at
a time. Here each runs on the simulator's model of that board under a private containerd
(``ctr run``): a script guest prints with the debug-console hypercall, and its lines — not
the hypervisor's — are the container's output. On the qemu-arm64 model the guests are
real aarch64 inmates under QEMU, printing through ``hvc #0x4a48`` into the simulator's
EL2 layer: a second such ZIC is refused with the ledger's line while the first holds the
lease, and a flood past the 2 KiB ring is counted as dropped bytes without blocking anyone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_e2e_zic import assert_nothing_left, ctr_run_zic, log_text, wait_for_text
from tools.testbed.containerd import MODES

pytestmark = pytest.mark.containerd

REAL_BOARDS = ("qemu-arm64", "zcu102", "zcu104", "kria-kv260")
#: What the hypervisor prints around a cell's life (jailhouse.md §4.7): never in a ZIC's output.
#: Where the inmates are linked (QEMU virt RAM, runPHI's QEMU cells).
AT_0X7 = {"starting_vaddress": "0x70000000"}
HYPERVISOR_WORDS = ("Created cell", "Started cell", "Page pool usage", "Closing cell", "can be loaded")


def boot_rootfs(base: Path, name: str, inmate: bytes, description: dict) -> Path:
    """A ZIC rootfs: ``/boot/config.json`` (bare-metal; loaded at the board's reset address
    unless ``description`` says) and ``/boot/<name>.bin``."""
    rootfs = base / name / "rootfs"
    (rootfs / "boot").mkdir(parents=True)
    (rootfs / "boot" / f"{name}.bin").write_bytes(inmate)
    boot = {"os_var": "baremetal", "inmate": f"/boot/{name}.bin", "memory": 16}
    (rootfs / "boot" / "config.json").write_text(json.dumps({**boot, **description}))
    return rootfs


def force_remove(node, cid: str) -> None:
    """``ctr task rm --force`` (kills it) then ``ctr containers rm``."""
    node.containerd.ctr("task", "rm", "--force", cid, timeout=60)
    node.containerd.ctr("containers", "rm", cid)


@pytest.fixture(scope="module", params=REAL_BOARDS)
def board_node(request, runphi_bin: Path):
    """A private containerd whose runphi uses a real board's template, on the simulator's
    model of that board (script guests)."""
    from tools.testbed.containerd import missing_requirements, running_zic_node

    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with running_zic_node(runphi_bin, mode="runc-cli", prefix="rphi-hvc-", engine="script",
                          platform=request.param) as node:
        yield node


def test_each_real_board_streams_a_zic_through_the_hypervisor_console(board_node, tmp_path):
    guest = b"#!jailhouse-sim-inmate\nconsole Hello through the hypervisor console\\n\nconsole second line\\n\nshutdown\n"
    rootfs = boot_rootfs(tmp_path, "hvhello", guest, {})
    done = ctr_run_zic(board_node, rootfs, "hvhello", "--rm")
    assert done.returncode == 0, done.stderr
    output = done.stdout.decode()
    assert "Hello through the hypervisor console\r\nsecond line\r\n" in output
    assert not any(word in output for word in HYPERVISOR_WORDS), output
    assert_nothing_left(board_node, "hvhello")


# ---- real inmates printing through hvc #0x4a48 on the qemu-arm64 model -------------------------------


@pytest.fixture(scope="module", params=MODES)
def qemu_board_node(request, runphi_bin: Path):
    from tools.inmates.build import missing_tools
    from tools.testbed.containerd import missing_requirements, running_zic_node

    reason = missing_requirements() or missing_tools()
    if reason:
        pytest.skip(reason)
    with running_zic_node(runphi_bin, mode=request.param, prefix="rphi-hvq-", engine="qemu",
                          platform="qemu-arm64") as node:
        yield node


@pytest.fixture(scope="module")
def hvc_inmates() -> Path:
    from tools.inmates.build import ensure_built

    return ensure_built(console="hvc")


@pytest.mark.qemu
def test_a_hypercall_printing_inmate_shows_its_lines_and_a_second_one_is_refused(qemu_board_node, hvc_inmates,
                                                                                tmp_path):
    node = qemu_board_node
    ticker = boot_rootfs(tmp_path, "hvticker", (hvc_inmates / "ticker.bin").read_bytes(), AT_0X7)
    log = tmp_path / "hvticker.log"
    started = ctr_run_zic(node, ticker, "hvticker", "-d", "--log-uri", f"file://{log}")
    assert started.returncode == 0, started.stderr
    try:
        text = wait_for_text(log, "tick")
        assert not any(word in text for word in HYPERVISOR_WORDS), text
        second = ctr_run_zic(node, boot_rootfs(tmp_path, "hvsecond", (hvc_inmates / "hello.bin").read_bytes(), AT_0X7),
                             "hvsecond", "--rm")
        assert second.returncode != 0
        assert "the hypervisor console is leased to container hvticker" in second.stderr.decode()
    finally:
        force_remove(node, "hvticker")
    assert_nothing_left(node, "hvticker", "hvsecond")


@pytest.mark.qemu
def test_a_flood_past_the_ring_is_counted_as_dropped_and_blocks_nothing(qemu_board_node, hvc_inmates, tmp_path):
    from runphi.console.stats import read_console_stats
    from tools.inmates.build import FLOOD_BYTES

    node = qemu_board_node
    rootfs = boot_rootfs(tmp_path, "hvflood", (hvc_inmates / "flood.bin").read_bytes(), AT_0X7)
    log = tmp_path / "hvflood.log"
    started = ctr_run_zic(node, rootfs, "hvflood", "-d", "--log-uri", f"file://{log}")
    assert started.returncode == 0, started.stderr
    try:
        stats_dir = node.record_dir("hvflood")
        wait_for_text(log, "flood: done")
        stats = read_console_stats(stats_dir)
        assert stats is not None and stats.dropped_bytes > 0, stats
        assert len(log_text(log)) < FLOOD_BYTES  # the ring kept only the newest 2 KiB at each read
    finally:
        force_remove(node, "hvflood")
    assert_nothing_left(node, "hvflood")
