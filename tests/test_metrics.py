"""``runphi metrics``: the node's ZICs in the Prometheus/OpenMetrics formats, checked against
what the hypervisor and the ledger say.

Three ZICs run on a simulated board (script guests): two tick, one takes a data abort
(its cell fails, exit 139). The exporter (``--listen`` on 127.0.0.1) is scraped over HTTP
and its answer parsed with prometheus_client's own parser; the one-shot output is parsed
with its OpenMetrics parser. Values are compared with the simulator's sysfs counters and
runphi's ledger file.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request

import pytest

from tests.test_lifecycle_harness import RUNPHI, board, guest_script, subreaper, wait_exit, zic  # noqa: F401

TICKER = guest_script("print up\\n", "tick 50 tick")
CRASH = guest_script("print about to crash\\n", "fault")


def samples(text: str, *, openmetrics: bool = False) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value, from a scrape (parsed by prometheus_client)."""
    if openmetrics:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    matches = [v for (n, ls), v in found.items() if n == name and labels.items() <= dict(ls).items()]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return matches[0]


def sysfs_counter(zic, cell: str, relative: str) -> int:
    cells = zic.board.sysfs / "cells"
    for entry in cells.iterdir():
        if (entry / "name").read_text().strip() == cell:
            return int((entry / "statistics" / relative).read_text())
    raise AssertionError(f"no cell {cell}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def three_zics(zic):
    """Two ticking ZICs and one whose cell failed (its monitor ended with 139)."""
    for name in ("tick-a", "tick-b"):
        zic.create(name, zic.bundle(name, TICKER))
        zic.run("start", name, check=True)
    crashed = zic.create("crashed", zic.bundle("crashed", CRASH))
    zic.run("start", "crashed", check=True)
    assert wait_exit(crashed, timeout=30) == 139
    return zic


def records(zic) -> dict[str, dict]:
    return {p.name: json.loads((p / "runphi.json").read_text()) for p in zic.root.iterdir()
            if (p / "runphi.json").exists()}


def test_the_exporter_answers_what_sysfs_and_the_ledger_say(three_zics):
    zic = three_zics
    cells = {cid: record["cell"]["cell_name"] for cid, record in records(zic).items()}
    port = free_port()
    exporter = subprocess.Popen([str(RUNPHI), "--root", str(zic.root), "metrics", "--listen", f"127.0.0.1:{port}"],
                                env=zic.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in exporter.stderr.readline()
        before = {cid: sysfs_counter(zic, cell, "vmexits_total") for cid, cell in cells.items() if cid != "crashed"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        after = {cid: sysfs_counter(zic, cell, "vmexits_total") for cid, cell in cells.items() if cid != "crashed"}
    finally:
        exporter.terminate()
        assert exporter.wait(timeout=10) == 0
    found = samples(text)

    for cid in ("tick-a", "tick-b"):
        assert value(found, "runphi_zic_state", container_id=cid, state="running") == 1
        assert before[cid] <= value(found, "runphi_zic_vmexits_total", container_id=cid) <= after[cid]
        assert value(found, "runphi_zic_failed_cpus", container_id=cid) == 0
    crashed = cells["crashed"]
    assert value(found, "runphi_zic_state", container_id="crashed", state="stopped") == 1
    assert value(found, "runphi_zic_last_exit_status", container_id="crashed") == 139
    assert value(found, "runphi_zic_cell_state", container_id="crashed", state="failed") == 1
    [cpu] = records(zic)["crashed"]["cell"]["allocation"]["cpus"]
    assert value(found, "runphi_zic_failed_cpus", container_id="crashed") == 1
    assert value(found, "runphi_zic_cpu_failed", container_id="crashed", cpu=str(cpu)) == 1
    assert value(found, "runphi_zic_vmexits_total", container_id="crashed") == sysfs_counter(
        zic, crashed, "vmexits_total")

    ledger = json.loads((zic.node / "jailhouse-ledger.json").read_text())["allocations"]
    held = {cpu for allocation in ledger.values() for cpu in allocation["cpus"]}
    assert value(found, "runphi_node_resource_used", resource="cpus") == len(held) == 3
    assert value(found, "runphi_node_resource_free", resource="cpus") == 7 - 3
    assert value(found, "runphi_node_resource_used", resource="console_slots") == 3
    # 7 UART slots and the hypervisor console (sim-qemu-arm64 offers it; nobody leased it here)
    assert value(found, "runphi_node_resource_free", resource="console_slots") == 8 - 3
    pool_used = int((zic.board.sysfs / "mem_pool_used").read_text())
    assert value(found, "runphi_hypervisor_pool_used_pages", pool="mem") == pool_used
    assert value(found, "runphi_verb_duration_seconds_count", verb="create") >= 3


def test_the_one_shot_output_is_prometheus_text_or_openmetrics(three_zics):
    classic = three_zics.run("metrics", check=True)
    assert "# EOF" not in classic.stdout  # node-exporter's textfile collector reads this one
    found = samples(classic.stdout)
    assert value(found, "runphi_zic_info", container_id="tick-a", backend="jailhouse") == 1
    assert value(found, "runphi_zic_console_bytes_total", container_id="tick-a") > 0
    openmetrics = three_zics.run("metrics", "--format", "openmetrics", check=True)
    assert openmetrics.stdout.endswith("# EOF\n")
    assert value(samples(openmetrics.stdout, openmetrics=True), "runphi_zic_info", container_id="tick-b") == 1


def test_a_bad_listen_address_is_one_line(zic):
    done = zic.run("metrics", "--listen", "nowhere")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "ADDR:PORT" in done.stderr
