"""Resource allocator and ledger: CPU lists, exhaustion messages, coalescing, concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runphi import oci
from runphi.backends.cpulist import CpuListError, format_cpu_list, parse_cpu_list
from runphi.backends.jailhouse.allocator import (
    LEDGER_NAME,
    Allocator,
    ResourceRequest,
    Segment,
    best_fit,
    free_segments,
    request_from,
)
from runphi.backends.jailhouse.platform import MiB, load_platform
from runphi.backends.ledger import AllocationError
from runphi.image import BootDescription

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "templates"


@pytest.fixture
def sim():
    return load_platform("sim-qemu-arm64", TEMPLATES)


def make_sysfs(root: Path, cpus: str) -> Path:
    sysfs = root / "sysfs"
    (sysfs / "cells" / "0").mkdir(parents=True, exist_ok=True)
    (sysfs / "cells" / "0" / "cpus_assigned_list").write_text(cpus + "\n")
    return sysfs


@pytest.fixture
def allocator(tmp_path, sim) -> Allocator:
    return Allocator(sim, tmp_path / "state", make_sysfs(tmp_path, "0-7"))


# --- CPU lists ---


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3", {0, 1, 2, 3}), ("0,2-3", {0, 2, 3}), ("", set()), ("\n", set()), ("5", {5}), ("0-7:2/4", {0, 1, 4, 5})],
)
def test_cpu_list_parses_kernel_syntax(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["3-1", "a", "0,,1", "-1", "1-", "0-99999", "0-3:0/2"])
def test_cpu_list_rejects_garbage(text: str) -> None:
    with pytest.raises(CpuListError, match="invalid CPU list element"):
        parse_cpu_list(text)


@given(st.frozensets(st.integers(0, 200)))
def test_cpu_list_round_trips(cpus: frozenset[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


def test_cpu_list_formats_ranges() -> None:
    assert format_cpu_list({0, 2, 3, 4, 7}) == "0,2-4,7"


# --- free memory arithmetic ---


def test_free_segments_coalesce_adjacent_holes() -> None:
    pool = [Segment(0x1000, 0x9000)]
    assert free_segments(pool, [Segment(0x3000, 0x1000), Segment(0x4000, 0x1000)]) == [
        Segment(0x1000, 0x2000),
        Segment(0x5000, 0x5000),
    ]
    assert free_segments(pool, []) == pool


def test_best_fit_prefers_the_smallest_hole_and_aligns() -> None:
    free = [Segment(0x0, 0x10000), Segment(0x21000, 0x3000), Segment(0x30100, 0x2000)]
    assert best_fit(free, 0x2000, 0x100) == Segment(0x30100, 0x2000)
    assert best_fit(free, 0x2000, 0x1000) == Segment(0x21000, 0x2000)
    assert best_fit(free, 0x2000, 0x10000) == Segment(0x0, 0x2000)
    assert best_fit(free, 0x20000, 0x1000) is None


# --- allocation ---


def test_allocation_is_recorded_and_released(allocator: Allocator, sim) -> None:
    a = allocator.allocate("c1", ResourceRequest(cpu_count=2, network=True))
    assert a.cpus == {1, 2} and a.uart_slot == 0 and a.ivshmem_slot == 1
    assert a.ram.size == 64 * MiB + sim.memory.low_ram_size and a.main_ram_size == 64 * MiB
    assert a.ram.start % sim.memory.alignment == 0
    assert allocator.allocations() == [a]
    ledger = json.loads((allocator.state_dir / LEDGER_NAME).read_text())
    assert ledger["platform"] == "sim-qemu-arm64" and "c1" in ledger["allocations"]
    assert allocator.release("c1") == a
    assert allocator.allocations() == []
    assert allocator.release("c1") is None


def test_explicit_cpuset_is_honoured_and_conflicts_named(allocator: Allocator) -> None:
    assert allocator.allocate("a", ResourceRequest(cpus=frozenset({3, 5}))).cpus == {3, 5}
    with pytest.raises(AllocationError, match=r"CPUs 5-6 requested, CPUs 5 are not free \(free for cells: 1-2,4,6-7\)"):
        allocator.allocate("b", ResourceRequest(cpus=frozenset({5, 6})))
    with pytest.raises(AllocationError, match="CPUs 0 are not free"):
        allocator.allocate("b", ResourceRequest(cpus=frozenset({0})))


def test_root_keeps_its_last_cpu(tmp_path, sim) -> None:
    alloc = Allocator(sim, tmp_path / "state", make_sysfs(tmp_path, "3,5"))
    assert alloc.allocate("a", ResourceRequest()).cpus == {3}
    with pytest.raises(AllocationError, match=r"1 CPU\(s\) requested, 0 free for cells \(none; the root cell keeps"):
        alloc.allocate("b", ResourceRequest())
    with pytest.raises(AllocationError, match="the root cell must keep one CPU"):
        alloc.allocate("b", ResourceRequest(cpus=frozenset({5})))


def test_root_cpus_come_from_sysfs_in_full_list_syntax(tmp_path, sim) -> None:
    alloc = Allocator(sim, tmp_path / "state", make_sysfs(tmp_path, "0,2-3,6"))
    assert alloc.root_cpus() == {0, 2, 3, 6}
    assert alloc.allocate("a", ResourceRequest(cpu_count=3)).cpus == {2, 3, 6}


def test_disabled_hypervisor_is_a_clear_error(tmp_path, sim) -> None:
    alloc = Allocator(sim, tmp_path / "state", tmp_path / "nowhere")
    with pytest.raises(AllocationError, match="Jailhouse is not enabled"):
        alloc.allocate("a", ResourceRequest())


def test_exhaustion_names_every_missing_resource_and_allocates_nothing(allocator: Allocator) -> None:
    allocator.allocate("a", ResourceRequest(network=True))
    allocator.allocate("b", ResourceRequest(network=True))
    before = allocator.allocations()
    with pytest.raises(AllocationError) as err:
        allocator.allocate("c", ResourceRequest(cpu_count=6, memory=1024 * MiB, network=True))
    message = str(err.value)
    assert message.startswith("cannot create container c on sim-qemu-arm64: ")
    assert "6 CPU(s) requested, 5 free for cells (3-7" in message
    assert "1024 MiB" not in message and "of cell RAM requested" in message and "free: " in message
    assert "all 2 ivshmem links are in use" in message
    assert allocator.allocations() == before


def test_uart_slots_run_out_after_seven(allocator: Allocator) -> None:
    for n in range(7):
        allocator.allocate(f"c{n}", ResourceRequest(memory=4 * MiB, cpus=frozenset()))
    with pytest.raises(AllocationError, match="all 7 UART slots are in use"):
        allocator.allocate("c7", ResourceRequest(memory=4 * MiB, cpus=frozenset()))


def test_released_memory_coalesces(allocator: Allocator, sim) -> None:
    req = ResourceRequest(memory=250 * MiB - sim.memory.low_ram_size, cpus=frozenset())
    a, b, c = (allocator.allocate(n, req) for n in "abc")
    assert a.ram.end <= b.ram.start and b.ram.end <= c.ram.start
    big = ResourceRequest(memory=300 * MiB, cpus=frozenset())
    with pytest.raises(AllocationError, match="of cell RAM requested"):
        allocator.allocate("d", big)
    allocator.release("a")
    allocator.release("b")
    d = allocator.allocate("d", big)
    assert d.ram.start == a.ram.start  # the two released neighbours form one hole


def test_double_allocation_for_one_container_is_refused(allocator: Allocator) -> None:
    allocator.allocate("a", ResourceRequest())
    with pytest.raises(AllocationError, match="container a already holds node resources"):
        allocator.allocate("a", ResourceRequest())


def test_rpu_requests_on_a_board(tmp_path) -> None:
    kria = load_platform("kria-kv260", TEMPLATES)
    alloc = Allocator(kria, tmp_path / "state", make_sysfs(tmp_path, "0-3"))
    a = alloc.allocate("r", ResourceRequest(rpu=True, memory=4 * MiB))
    assert a.rpus == {0} and a.cpus == frozenset()
    with pytest.raises(AllocationError, match="all 1 RPUs are in use"):
        alloc.allocate("s", ResourceRequest(rpu=True, memory=4 * MiB))


def test_corrupt_ledger_and_foreign_platform_are_refused(allocator: Allocator, tmp_path) -> None:
    allocator.allocate("a", ResourceRequest())
    other = Allocator(load_platform("qemu-arm64", TEMPLATES), allocator.state_dir, allocator.sysfs)
    with pytest.raises(AllocationError, match="belongs to platform 'sim-qemu-arm64', not 'qemu-arm64'"):
        other.allocate("b", ResourceRequest())
    # A corrupt ledger is rebuilt from the allocation claims (a is held by this live process).
    (allocator.state_dir / LEDGER_NAME).write_text("{not json")
    b = allocator.allocate("b", ResourceRequest())
    assert {x.container_id for x in allocator.allocations()} == {"a", "b"} and not b.cpus & {1}


def test_replace_all_rewrites_the_ledger(allocator: Allocator) -> None:
    a = allocator.allocate("a", ResourceRequest())
    allocator.allocate("b", ResourceRequest())
    allocator.replace_all([a])
    assert allocator.allocations() == [a]


def test_preview_records_nothing(allocator: Allocator) -> None:
    p = allocator.preview("x", ResourceRequest(cpu_count=2))
    assert p.cpus == {1, 2} and allocator.allocations() == []
    held = allocator.allocate("x", ResourceRequest())
    assert allocator.preview("x", ResourceRequest(cpu_count=2)) == held
    assert allocator.preview("y", ResourceRequest(), root_cpus=frozenset({0, 1, 2})).cpus == {2}


# --- request precedence ---


def oci_config(cpus=None, quota=None, period=None, limit=None) -> oci.Config:
    return msgspec.convert(
        {
            "ociVersion": "1.0.2",
            "linux": {"resources": {"cpu": {"cpus": cpus, "quota": quota, "period": period}, "memory": {"limit": limit}}},
        },
        oci.Config,
    )


def boot(**kw) -> BootDescription:
    return BootDescription(source=Path("/boot/config.json"), inmate=Path("/boot/boot.bin"), **kw)


def test_request_defaults(sim) -> None:
    assert request_from(None, None, sim) == ResourceRequest(cpu_count=1, memory=64 * MiB)


def test_request_from_oci(sim) -> None:
    assert request_from(oci_config(quota=150000, period=100000), None, sim).cpu_count == 2
    r = request_from(oci_config(cpus="1,3-4", quota=100000, period=100000, limit=100 * MiB + 1), None, sim)
    assert r.cpus == {1, 3, 4} and r.cpu_count == 3 and r.memory == 100 * MiB + 0x1000
    with pytest.raises(AllocationError, match="linux.resources.cpu.cpus"):
        request_from(oci_config(cpus="x"), None, sim)


def test_boot_description_wins_over_oci(sim) -> None:
    cfg = oci_config(cpus="1", limit=100 * MiB)
    r = request_from(cfg, boot(memory_mib=32, vcpus=3, net=True), sim)
    assert (r.cpus, r.cpu_count, r.memory, r.network) == (None, 3, 32 * MiB, True)
    r = request_from(cfg, boot(pinned_cpus=frozenset({4, 6}), rpu_req=True), sim)
    assert (r.cpus, r.memory, r.rpu) == ({4, 6}, 100 * MiB, True)


# --- concurrency: real processes, real flock ---

WORKER = """
import sys, json
from pathlib import Path
from runphi.backends.jailhouse.allocator import Allocator, ResourceRequest
from runphi.backends.jailhouse.platform import load_platform
from runphi.backends.ledger import AllocationError
templates, state, sysfs, cid, verb = sys.argv[1:6]
alloc = Allocator(load_platform("sim-qemu-arm64", Path(templates)), Path(state), Path(sysfs))
sys.stdin.read()  # wait until every worker is started
try:
    if verb == "allocate":
        a = alloc.allocate(cid, ResourceRequest(memory=16 << 20, network=cid.endswith("0")))
        print(json.dumps({"cpus": sorted(a.cpus), "ram": [a.ram.start, a.ram.end], "uart": a.uart_slot, "net": a.ivshmem_slot}))
    else:
        print(json.dumps({"released": alloc.release(cid) is not None}))
except AllocationError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def run_workers(verb: str, ids: list[str], state: Path, sysfs: Path) -> dict[str, dict]:
    procs = {
        cid: subprocess.Popen(
            [sys.executable, "-c", WORKER, str(TEMPLATES), str(state), str(sysfs), cid, verb],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for cid in ids
    }
    for p in procs.values():
        p.stdin.close()  # the start signal: every worker is running now
    results = {}
    for cid, p in procs.items():
        out = p.stdout.read()
        assert p.wait(timeout=60) == 0
        results[cid] = json.loads(out)
    return results


def test_sixteen_concurrent_creates_never_overlap_and_all_release(tmp_path, sim) -> None:
    state, sysfs = tmp_path / "state", make_sysfs(tmp_path, "0-7")
    ids = [f"zic{n:02d}" for n in range(16)]
    results = run_workers("allocate", ids, state, sysfs)
    won = {cid: r for cid, r in results.items() if "error" not in r}
    lost = {cid: r for cid, r in results.items() if "error" in r}
    assert len(won) == 7  # 7 cell CPUs (CPU 0 stays root) and 7 UART slots
    for r in lost.values():
        assert r["error"].startswith("cannot create container zic")
    cpus = [c for r in won.values() for c in r["cpus"]]
    assert len(cpus) == len(set(cpus)) == 7 and 0 not in cpus
    assert len({r["uart"] for r in won.values()}) == 7
    nets = [r["net"] for r in won.values() if r["net"] is not None]
    assert len(nets) == len(set(nets))
    spans = sorted(tuple(r["ram"]) for r in won.values())
    pool = sim.memory.pools[0]
    assert all(pool.start <= s and e <= pool.end for s, e in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    ledger = Allocator(sim, state, sysfs).allocations()
    assert {a.container_id for a in ledger} == set(won)

    released = run_workers("release", ids, state, sysfs)
    assert {cid for cid, r in released.items() if r["released"]} == set(won)
    assert Allocator(sim, state, sysfs).allocations() == []


# --- property: any sequence of allocations and releases keeps the ledger consistent ---

operations = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 9), st.integers(1, 3), st.integers(1, 200), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 9), st.just(0), st.just(0), st.just(False)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_random_allocate_release_sequences_never_overlap(tmp_path_factory, sim, ops) -> None:
    base = tmp_path_factory.mktemp("seq")
    alloc = Allocator(sim, base / "state", make_sysfs(base, "0-7"))
    model: dict[str, object] = {}
    for op, n, cpus, mib, net in ops:
        cid = f"c{n}"
        if op == "release":
            assert (alloc.release(cid) is not None) == (cid in model)
            model.pop(cid, None)
            continue
        try:
            model[cid] = alloc.allocate(cid, ResourceRequest(cpu_count=cpus, memory=mib * MiB, network=net))
        except AllocationError as exc:
            assert cid in model or str(exc).startswith(f"cannot create container {cid} on sim-qemu-arm64: ")
        held = alloc.allocations()
        assert {a.container_id for a in held} == set(model)
        all_cpus = [c for a in held for c in a.cpus]
        assert len(all_cpus) == len(set(all_cpus)) and 0 not in all_cpus
        spans = sorted((a.ram.start, a.ram.end) for a in held)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
        assert all(sim.memory.pools[0].start <= s and e <= sim.memory.pools[0].end for s, e in spans)
        uarts = [a.uart_slot for a in held]
        links = [a.ivshmem_slot for a in held if a.ivshmem_slot is not None]
        assert len(uarts) == len(set(uarts)) and len(links) == len(set(links))
