"""Privilege boundaries: runphi runs as root on behalf of images written by strangers.

* state and ledger files are private (files 0600, directories 0700) and owned by
  the runtime's user; world-writable or foreign-owned state directories are refused;
* whatever an image asks, the allocation stays inside the platform's pools: CPUs
  the platform gives to cells, RAM in its pools, UART slots and ivshmem links it has;
* what runphi hands to `jailhouse cell load` is always a file inside the image.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runphi.backends.jailhouse.allocator import Allocator, ResourceRequest
from runphi.backends.jailhouse.platform import load_platform
from runphi.backends.ledger import AllocationError
from tests.test_allocator import TEMPLATES
from tests.test_lifecycle_harness import board, guest_script, reap_all, subreaper, zic  # noqa: F401

GUEST = guest_script("tick 50 x")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_state_and_ledger_files_are_private_and_owned_by_the_runtime(zic):
    zic.create("priv", zic.bundle("b", GUEST))
    directory = zic.root / "priv"
    assert mode(directory) == 0o700
    for name in ("runphi.json", "runphi.lock", "config.json", "start.fifo"):
        assert mode(directory / name) == 0o600, name
    assert mode(zic.node) == 0o700
    for name in ("jailhouse-ledger.json", "jailhouse-ledger.lock"):
        assert mode(zic.node / name) == 0o600, name
    assert mode(zic.node / "jailhouse-claims") == 0o700
    assert mode(zic.node / "jailhouse-claims" / "priv.json") == 0o600
    for path in [directory, *directory.iterdir(), zic.node, *zic.node.rglob("*")]:
        assert os.lstat(path).st_uid == os.geteuid(), path
        assert not os.lstat(path).st_mode & 0o002, f"{path} is world-writable"


@pytest.mark.parametrize("which", ["root", "node"])
def test_world_writable_state_directories_are_refused(zic, which):
    target = zic.root if which == "root" else zic.node
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o777)
    result = zic.run("create", "--bundle", str(zic.bundle("b", GUEST)), "--pid-file", str(zic.base / "p"), "ww")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "world-writable" in lines[0] and str(target) in lines[0], lines
    assert "Traceback" not in result.stderr
    assert zic.board.cells() == {}
    assert not (zic.root / "ww").exists()
    target.chmod(0o700)


def test_foreign_owned_state_root_is_refused(zic):
    zic.root.mkdir(parents=True)
    os.chown(zic.root, 12345, 12345)
    try:
        result = zic.run("create", "--bundle", str(zic.bundle("b", GUEST)), "--pid-file", str(zic.base / "p"), "fo")
    finally:
        os.chown(zic.root, os.geteuid(), os.getegid())
    assert result.returncode == 1 and "owned by uid 12345" in result.stderr
    assert not (zic.root / "fo").exists()


def test_cell_load_only_ever_gets_files_inside_the_image(zic, tmp_path):
    """Record the tool's argv through a wrapper: every file `cell load` names lies in the rootfs."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "jailhouse"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {calls}\nexec {zic.board.tool} \"$@\"\n")
    wrapper.chmod(0o755)
    zic.env["RUNPHI_JAILHOUSE"] = str(wrapper)
    bundle = zic.bundle("b", GUEST)
    (bundle / "rootfs" / "boot" / "link.bin").symlink_to("boot.bin")
    description = bundle / "rootfs" / "boot" / "config.json"
    description.write_text(json.dumps({**json.loads(description.read_text()), "inmate": "/boot/link.bin"}))
    zic.create("inside", bundle)
    loads = [line.split() for line in calls.read_text().splitlines() if line.startswith("cell load")]
    assert loads, "no cell load was run"
    rootfs = os.path.realpath(bundle / "rootfs")
    files = [arg for argv in loads for arg in argv[3:] if arg.startswith("/")]
    assert files and all(os.path.realpath(f).startswith(rootfs + os.sep) for f in files), files
    assert zic.run("delete", "--force", "inside").returncode == 0
    reap_all(zic.monitors)


# --- whatever is asked, allocations stay in the platform's pools -------------------------

requests = st.builds(
    ResourceRequest,
    cpus=st.none() | st.frozensets(st.integers(-4, 80), max_size=6),
    cpu_count=st.integers(-3, 200),
    memory=st.integers(-(1 << 40), 1 << 44),
    network=st.booleans(),
    rpu=st.booleans(),
)


@pytest.mark.parametrize("platform_name", ["sim-qemu-arm64", "zcu102"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(requests, min_size=1, max_size=12))
def test_allocations_never_leave_the_platform_pools(tmp_path_factory, platform_name, batch):
    platform = load_platform(platform_name, TEMPLATES)
    base = tmp_path_factory.mktemp("pools")
    sysfs = base / "sysfs"
    (sysfs / "cells" / "0").mkdir(parents=True)
    (sysfs / "cells" / "0" / "cpus_assigned_list").write_text("0-7\n")
    allocator = Allocator(platform, base / "state", sysfs)
    pools = [(p.start, p.start + p.size) for p in platform.memory.pools]
    links = set(platform.ivshmem.slots) if platform.ivshmem else set()
    for index, request in enumerate(batch):
        try:
            held = allocator.allocate(f"c{index}", request)
        except AllocationError:
            continue
        assert held.cpus <= platform.cell_cpu_set
        assert any(start <= held.ram.start and held.ram.end <= end for start, end in pools), held.ram
        assert held.ram.size > 0 and held.main_ram_size >= request.memory
        assert held.uart_slot is None or 0 <= held.uart_slot < len(platform.uarts)
        assert held.ivshmem_slot is None or held.ivshmem_slot in links
        assert held.rpus <= {r.id for r in platform.rpus}
    taken = [cpu for a in allocator.allocations() for cpu in a.cpus]
    assert len(taken) == len(set(taken))
