"""The node ledger after a crash or an operator's mistake: missing or corrupt, it is
rebuilt from the allocation claims that reality backs (a cell in the hypervisor's
list, or a create still in flight) — detected, logged in one warning, never a crash,
and never a resource handed out twice."""

from __future__ import annotations

import json
import os
import subprocess

import msgspec
import pytest

from runphi.backends.jailhouse.allocator import (CLAIMS_DIR, LEDGER_NAME, Allocation, Allocator, Claim,
                                                 ResourceRequest, Segment)
from runphi.backends.jailhouse.platform import load_platform
from tests.test_lifecycle_harness import board, guest_script, reap_all, subreaper, zic  # noqa: F401

GUEST = guest_script("tick 50 x")


def ledger(zic) -> dict:
    return json.loads((zic.node / LEDGER_NAME).read_text())["allocations"]


def dead_pid() -> int:
    """The pid of a process that has certainly exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_create_rebuilds_a_damaged_ledger_and_never_double_allocates(zic, damage):
    for cid in ("keep-a", "keep-b"):
        zic.create(cid, zic.bundle(cid, GUEST))
    held = ledger(zic)
    path = zic.node / LEDGER_NAME
    if damage == "corrupt":
        path.write_bytes(b"\xff{ not a ledger")
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:20])

    result = zic.run("create", "--bundle", str(zic.bundle("new", GUEST)), "--pid-file", str(zic.base / "n"), "new-c")
    assert result.returncode == 0, result.stderr
    zic.monitors.append(int((zic.base / "n").read_text()))
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "rebuilt from 2 claim(s)" in warnings[0], warnings
    after = ledger(zic)
    assert {k: after[k] for k in held} == held, "the rebuild lost or changed a live allocation"
    taken = [cpu for allocation in after.values() for cpu in allocation["cpus"]]
    assert len(taken) == len(set(taken)) == 3

    for cid in ("keep-a", "keep-b", "new-c"):
        assert zic.run("delete", "--force", cid).returncode == 0
    reap_all(zic.monitors)
    assert ledger(zic) == {}
    assert list((zic.node / CLAIMS_DIR).iterdir()) == []


def test_claims_nothing_backs_are_dropped_on_rebuild(zic):
    zic.create("real", zic.bundle("real", GUEST))
    claims = zic.node / CLAIMS_DIR
    ghost = Claim(allocation=Allocation(container_id="ghost", cpus=frozenset({5}), ram=Segment(0x70000000, 0x1000000),
                                        main_ram_size=0x1000000, uart_slot=6),
                  cell_name="ghost", pid=dead_pid(), start_time=1)
    (claims / "ghost.json").write_bytes(msgspec.json.encode(ghost))
    (zic.node / LEDGER_NAME).unlink()
    created = zic.run("create", "--bundle", str(zic.bundle("next", GUEST)), "--pid-file", str(zic.base / "n"),
                      "next")
    assert created.returncode == 0, created.stderr
    zic.monitors.append(int((zic.base / "n").read_text()))
    assert "dropped stale claims of ghost" in created.stderr
    assert sorted(ledger(zic)) == ["next", "real"]
    assert not (claims / "ghost.json").exists()


def test_a_claim_backed_by_a_cell_survives_its_dead_creator(tmp_path):
    """Unit level: the hypervisor's cell list alone is enough to keep an allocation."""
    from tests.test_allocator import TEMPLATES

    platform = load_platform("sim-qemu-arm64", TEMPLATES)
    sysfs = tmp_path / "sysfs"
    (sysfs / "cells" / "0").mkdir(parents=True)
    (sysfs / "cells" / "0" / "cpus_assigned_list").write_text("0-7\n")
    (sysfs / "cells" / "0" / "name").write_text("root\n")
    (sysfs / "cells" / "3").mkdir()
    (sysfs / "cells" / "3" / "name").write_text("survivor\n")
    warnings: list[str] = []
    allocator = Allocator(platform, tmp_path / "state", sysfs, warn=warnings.append)
    kept = allocator.allocate("survivor", ResourceRequest(cpu_count=2))
    gone = allocator.allocate("gone", ResourceRequest())
    for cid, pid in (("survivor", dead_pid()), ("gone", dead_pid())):
        path = tmp_path / "state" / CLAIMS_DIR / f"{cid}.json"
        claim = msgspec.json.decode(path.read_bytes(), type=Claim)
        path.write_bytes(msgspec.json.encode(msgspec.structs.replace(claim, pid=pid)))
    (tmp_path / "state" / LEDGER_NAME).write_text("[]")
    assert allocator.allocations() == [kept]
    assert len(warnings) == 1 and "gone" in warnings[0]
    assert allocator.allocate("third", ResourceRequest()).cpus.isdisjoint(kept.cpus)
    assert gone.cpus  # it held something that is free again now
