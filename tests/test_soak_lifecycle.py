"""Soak: many create/start/kill/delete cycles must not grow anything.

Measured before (after a short warm-up) and after the cycles, for this process
(containerd's shim stand-in), the simulator daemon and one long-running ZIC's
monitor that streams its guest's output the whole time: open fds, pty fds, live
child processes, ledger entries and size, and the monitor's RSS.

Counts: CI runs reduced counts; full counts (500 script-engine cycles, 100 QEMU
cycles) with ``-m soak`` or ``RUNPHI_SOAK=1``. ``RUNPHI_SOAK_CYCLES`` overrides both.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.test_lifecycle_harness import (Zic, board, board_in_tempdir, guest_script,  # noqa: F401
                                          live_children, reap_all, subreaper, wait_exit, zic)

pytestmark = pytest.mark.soak

#: RSS a long-running monitor may gain over the whole soak (allocator noise, trio caches).
RSS_GROWTH_LIMIT = 8 << 20
#: Allowed growth per measure: a sample can catch short-lived fds (the monitor's probe
#: of the hypervisor, a tool call in flight); a leak over hundreds of cycles is far above.
SLACK = {"fds(test)": 4, "fds(daemon)": 4, "fds(monitor)": 4, "ptys": 2}
WARM_UP = 3


def cycles(request, reduced: int, full: int) -> int:
    if os.environ.get("RUNPHI_SOAK_CYCLES"):
        return int(os.environ["RUNPHI_SOAK_CYCLES"])
    selected = "soak" in (request.config.getoption("markexpr") or "")
    return full if selected or os.environ.get("RUNPHI_SOAK") == "1" else reduced


def fd_targets(pid: int) -> list[str]:
    base = Path(f"/proc/{pid}/fd")
    found = []
    for entry in base.iterdir():
        try:
            found.append(os.readlink(entry))
        except OSError:
            continue  # closed while we looked
    return found


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def measure(zic, monitor: int) -> dict[str, int]:
    daemon = zic.board.sim.pid
    me = os.getpid()
    ledger = zic.node / "jailhouse-ledger.json"
    fds = {pid: fd_targets(pid) for pid in (me, daemon, monitor)}
    return {
        "fds(test)": len(fds[me]), "fds(daemon)": len(fds[daemon]), "fds(monitor)": len(fds[monitor]),
        "ptys": sum(1 for targets in fds.values() for t in targets if t.startswith("/dev/pts/") or t == "/dev/ptmx"),
        "children": len(live_children(me)),
        "ledger entries": len(json.loads(ledger.read_text())["allocations"]),
        "ledger bytes": ledger.stat().st_size,
        "claims": len(list((zic.node / "jailhouse-claims").iterdir())),
        "state dirs": len(list(zic.root.iterdir())),
    }


def one_cycle(zic, cid: str, bundle: Path) -> None:
    pid = zic.create(cid, bundle)
    zic.run("start", cid, check=True)
    zic.run("kill", cid, "KILL", check=True)
    assert wait_exit(pid, timeout=60) == 137
    zic.monitors.remove(pid)
    zic.run("delete", cid, check=True)


def soak(zic, bundle: Path, count: int, long_guest: bytes) -> None:
    monitor = zic.create("soak-long", zic.bundle("long", long_guest))
    zic.run("start", "soak-long", check=True)
    for i in range(WARM_UP):
        one_cycle(zic, f"warm-{i}", bundle)
    before, rss_before = measure(zic, monitor), rss(monitor)
    for i in range(count):
        one_cycle(zic, f"soak-{i}", bundle)
    after, rss_after = measure(zic, monitor), rss(monitor)
    # Shown with `pytest -rP`: the figures docs/RELIABILITY.md quotes.
    print(f"{count} cycles: " + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in before)
          + f", monitor RSS {rss_before // 1024} -> {rss_after // 1024} KiB")
    grown = {key: (before[key], after[key]) for key in before if after[key] > before[key] + SLACK.get(key, 0)}
    assert not grown, f"grew over {count} cycles: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in grown.items())
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, f"monitor RSS {rss_before} -> {rss_after}"
    zic.run("delete", "--force", "soak-long", check=True)
    reap_all(zic.monitors)
    assert zic.board.cells() == {}
    assert json.loads((zic.node / "jailhouse-ledger.json").read_text())["allocations"] == {}


def test_script_engine_soak(zic, request):
    count = cycles(request, reduced=20, full=500)
    soak(zic, zic.bundle("cycle", guest_script("tick 50 x")), count, guest_script("tick 5 streaming-line"))


@pytest.mark.qemu
def test_qemu_engine_soak(subreaper, tmp_path, request):
    from tools.inmates.build import ensure_built, missing_tools

    reason = missing_tools()
    if reason or shutil.which("qemu-system-aarch64") is None:
        pytest.skip(f"QEMU inmates: {reason or 'qemu-system-aarch64 not found'}")
    inmates = ensure_built()
    count = cycles(request, reduced=5, full=100)
    with board_in_tempdir(prefix="rphi-qsoak-", engine="qemu") as own:
        z = Zic(own, tmp_path)
        try:
            ticker = (inmates / "ticker.bin").read_bytes()
            soak(z, z.bundle("cycle", ticker), count, ticker)
        finally:
            reap_all(z.monitors)
            for cid in [p.name for p in z.root.iterdir()] if z.root.exists() else []:
                z.run("delete", "--force", cid)
