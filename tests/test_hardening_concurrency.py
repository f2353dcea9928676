"""Concurrency: many `runphi` verb processes at once, as a kubelet starting pods in parallel does.

32 ZICs go through create → start → kill → delete at the same time on one simulated
board (7 free CPUs, 7 UART slots, 2 ivshmem links), mixed with plain containers that
runphi forwards to the real runc under the same ``--root``. Checked:

* no CPU, RAM byte, UART slot or ivshmem BDF is ever handed out twice — the ledger is
  checked after every successful create, and against the cells the board reports;
* every create that loses the race fails with one clean "not enough X" line;
* afterwards the ledger is empty and no cell, state directory or monitor is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from tools.testbed.containerd import busybox_path, make_busybox_rootfs
from tests.test_lifecycle_failures import live_runphi_descendants
from tests.test_kvm_net import own_namespace
from tests.test_lifecycle_harness import RUNPHI, board_in_tempdir, guest_script, reap_all, subreaper, zic  # noqa: F401

ZICS = int(os.environ.get("RUNPHI_CONCURRENCY", "32"))
PLAIN = 4
RUNC = shutil.which("runc")
#: What a create that lost the race for a resource may say (the allocator's words).
SHORTAGE_WORDS = ("CPU(s) requested", "UART slots are in use", "ivshmem links are in use", "of cell RAM requested")


@pytest.fixture(scope="module")
def board(subreaper):  # noqa: F811
    """The board, in a network namespace of the test's own: its networked ZICs' links (the
    simulator's taps and the addresses runphi gives them) stay there."""
    with own_namespace("hardening") as namespace, board_in_tempdir(netns=namespace) as sim:
        yield sim


async def runphi(zic, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`runphi --root R ARGS` without blocking the other tasks; stdio through files, never
    pipes a monitor could inherit and hold open."""
    with tempfile.TemporaryFile(dir=zic.logs) as out, tempfile.TemporaryFile(dir=zic.logs) as err:
        with trio.fail_after(timeout):
            proc = await trio.run_process([*zic.prefix, str(RUNPHI), "--root", str(zic.root), *args],
                                          stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=err, env=zic.env, check=False)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


def ledger_allocations(zic) -> dict[str, dict]:
    path = zic.node / "jailhouse-ledger.json"
    return json.loads(path.read_text())["allocations"] if path.exists() else {}


def assert_no_double_allocation(allocations: dict[str, dict]) -> None:
    """Every resource in the ledger belongs to exactly one container."""
    cpus: dict[int, str] = {}
    uarts: dict[int, str] = {}
    links: dict[int, str] = {}
    spans = []
    for cid, held in allocations.items():
        for cpu in held["cpus"]:
            assert cpus.setdefault(cpu, cid) == cid, f"CPU {cpu} held by {cpus[cpu]} and {cid}"
        if held.get("uart_slot") is not None:
            assert uarts.setdefault(held["uart_slot"], cid) == cid, f"UART slot {held['uart_slot']} twice"
        if held.get("ivshmem_slot") is not None:
            assert links.setdefault(held["ivshmem_slot"], cid) == cid, f"ivshmem slot {held['ivshmem_slot']} twice"
        spans.append((held["ram"]["start"], held["ram"]["start"] + held["ram"]["size"], cid))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        assert end <= start, f"RAM of {first} and {second} overlap"


def assert_cells_disjoint(board) -> None:
    """What the board itself says: no CPU is in two cells."""
    seen: dict[int, str] = {}
    for entry in (board.sysfs / "cells").iterdir():
        if entry.name == "0":
            continue
        try:
            text = (entry / "cpus_assigned_list").read_text().strip()
        except FileNotFoundError:
            continue  # destroyed while we looked
        from runphi.backends.cpulist import parse_cpu_list

        for cpu in parse_cpu_list(text) if text else ():
            assert seen.setdefault(cpu, entry.name) == entry.name, f"CPU {cpu} in cells {seen[cpu]} and {entry.name}"


async def wait_status(zic, cid: str, wanted: str, timeout: float = 60) -> None:
    """Poll `runphi state` (the record and the monitor's liveness) until `wanted`."""
    with trio.fail_after(timeout):
        while True:
            result = await runphi(zic, "state", cid)
            if result.returncode == 0 and json.loads(result.stdout)["status"] == wanted:
                return
            await trio.sleep(0.05)


async def zic_cycle(zic, cid: str, bundle: Path, outcome: dict[str, str]) -> None:
    """One ZIC's whole life; records "ok" or the shortage line it failed with."""
    pid_file = zic.base / f"{cid}.pid"
    created = await runphi(zic, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid)
    if created.returncode != 0:
        lines = [line for line in created.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in created.stderr, created.stderr
        assert any(words in lines[0] for words in SHORTAGE_WORDS), lines[0]
        assert cid in lines[0]
        assert not (zic.root / cid).exists() and not pid_file.exists()
        outcome[cid] = lines[0]
        return
    zic.monitors.append(int(pid_file.read_text()))
    assert_no_double_allocation(ledger_allocations(zic))
    assert_cells_disjoint(zic.board)
    assert (await runphi(zic, "start", cid)).returncode == 0
    killed = await runphi(zic, "kill", cid, "KILL")
    assert killed.returncode == 0, killed.stderr
    await wait_status(zic, cid, "stopped")
    deleted = await runphi(zic, "delete", cid)
    assert deleted.returncode == 0, deleted.stderr
    outcome[cid] = "ok"


def plain_bundle(base: Path, name: str) -> Path:
    bundle = base / "plain" / name
    make_busybox_rootfs(bundle / "rootfs")
    subprocess.run([RUNC, "spec", "--bundle", str(bundle)], check=True)
    document = json.loads((bundle / "config.json").read_text())
    document["process"].update({"terminal": False, "args": ["sleep", "600"], "env": ["PATH=/bin"]})
    document["root"] = {"path": "rootfs", "readonly": True}
    (bundle / "config.json").write_text(json.dumps(document))
    return bundle


async def plain_cycle(zic, cid: str, bundle: Path, outcome: dict[str, str]) -> None:
    """A runc container driven through runphi (forwarded) while the ZICs race."""
    created = await runphi(zic, "create", "--bundle", str(bundle), cid)
    assert created.returncode == 0, created.stderr
    assert (await runphi(zic, "start", cid)).returncode == 0
    assert (await runphi(zic, "kill", cid, "KILL")).returncode == 0
    await wait_status(zic, cid, "stopped")
    deleted = await runphi(zic, "delete", cid)
    assert deleted.returncode == 0, deleted.stderr
    assert not (zic.root / cid).exists()
    outcome[cid] = "ok"


@pytest.mark.skipif(RUNC is None or os.geteuid() != 0 or busybox_path() is None,
                    reason="needs root, runc and busybox-static for the forwarded containers")
async def test_parallel_lifecycles_never_double_allocate_and_leave_nothing(zic):
    guest = guest_script("tick 20 x")
    bundles = [zic.bundle(f"z{i}", guest, boot={"net": "yes"} if i % 3 == 0 else None) for i in range(ZICS)]
    plain = [plain_bundle(zic.base, f"p{i}") for i in range(PLAIN)]
    outcome: dict[str, str] = {}
    try:
        async with trio.open_nursery() as nursery:
            for i, bundle in enumerate(bundles):
                nursery.start_soon(zic_cycle, zic, f"par-{i}", bundle, outcome)
            for i, bundle in enumerate(plain):
                nursery.start_soon(plain_cycle, zic, f"plain-{i}", bundle, outcome)
    finally:
        reap_all(zic.monitors)
    assert len(outcome) == ZICS + PLAIN
    succeeded = [cid for cid, result in outcome.items() if result == "ok" and cid.startswith("par-")]
    assert succeeded, "no ZIC got through at all"
    assert all(outcome[f"plain-{i}"] == "ok" for i in range(PLAIN))
    assert ledger_allocations(zic) == {}
    assert zic.board.cells() == {}
    assert sorted(os.listdir(zic.root)) == []
    assert live_runphi_descendants() == []


async def test_parallel_creates_fill_the_board_exactly(zic):
    """With nothing released, exactly as many creates win as the board has room for;
    the losers name what ran out, and the winners' cells really own disjoint CPUs."""
    guest = guest_script("tick 20 x")
    bundles = [zic.bundle(f"f{i}", guest) for i in range(ZICS)]
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    async def create(cid: str, bundle: Path) -> None:
        results[cid] = await runphi(zic, "create", "--bundle", str(bundle), "--pid-file",
                                    str(zic.base / f"{cid}.pid"), cid)

    async with trio.open_nursery() as nursery:
        for i, bundle in enumerate(bundles):
            nursery.start_soon(create, f"fill-{i}", bundle)
    winners = sorted(cid for cid, r in results.items() if r.returncode == 0)
    zic.monitors += [int((zic.base / f"{cid}.pid").read_text()) for cid in winners]
    # 8 CPUs, the root keeps one: 7 single-CPU cells fit, and 7 UART slots.
    assert len(winners) == 7, {cid: r.stderr for cid, r in results.items()}
    for cid, result in results.items():
        if result.returncode != 0:
            assert any(words in result.stderr for words in SHORTAGE_WORDS), result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(ledger_allocations(zic)) == winners
    assert_no_double_allocation(ledger_allocations(zic))
    assert_cells_disjoint(zic.board)
    assert sorted(zic.board.cells()) == winners

    async with trio.open_nursery() as nursery:
        for cid in winners:
            nursery.start_soon(runphi, zic, "delete", "--force", cid)
    reap_all(zic.monitors)
    assert ledger_allocations(zic) == {}
    assert zic.board.cells() == {}
    assert sorted(os.listdir(zic.root)) == []


async def test_parallel_creates_of_one_id_make_exactly_one_container(zic):
    bundle = zic.bundle("dup", guest_script("tick 20 x"))
    results: list[subprocess.CompletedProcess[str]] = []

    async def create(n: int) -> None:
        results.append(await runphi(zic, "create", "--bundle", str(bundle), "--pid-file",
                                    str(zic.base / f"dup{n}.pid"), "dup"))

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(create, n)
    winners = [r for r in results if r.returncode == 0]
    assert len(winners) == 1, [r.stderr for r in results]
    for loser in results:
        if loser.returncode != 0:
            lines = [line for line in loser.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and ("exists" in lines[0] or "already holds" in lines[0]), lines
    zic.monitors += [int(p.read_text()) for p in zic.base.glob("dup*.pid")]
    assert sorted(ledger_allocations(zic)) == ["dup"]
    assert list(zic.board.cells()) == ["dup"]
    assert (await runphi(zic, "delete", "--force", "dup")).returncode == 0
    reap_all(zic.monitors)
    assert ledger_allocations(zic) == {} and zic.board.cells() == {}
