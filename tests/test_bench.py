"""Smoke runs of every benchmark suite with tiny counts, so the benchmarks cannot rot.

Budgets are not asserted here (timings belong to ``python -m tools.bench``, not to
tests); what is asserted is that each suite runs to the end on real processes,
measures something, and that its correctness checks hold (identical bytes from
gcc, exit statuses, import audit, ledger consistency).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import msgspec
import pytest

from tools.testbed.containerd import missing_requirements
from tools.bench import __main__ as bench
from tools.bench.harness import Budget, Options, Report, Series, SuiteResult, interleaved, run_suite

QUICK = Options(quick=True)


def smoke(name: str) -> SuiteResult:
    """Run suite ``name`` in its quick form and check what every suite must deliver."""
    module = __import__(f"tools.bench.{bench.SUITES[name]}", fromlist=["run"])
    result = run_suite(name, module.run, QUICK)
    assert not result.error, result.error
    assert not result.skipped, result.skipped
    assert result.series, f"{name} measured nothing"
    for series in result.series:
        assert series.samples and all(math.isfinite(v) and v >= 0 for v in series.samples), series
    failed = [f"{c.name}: {c.detail}" for c in result.checks if not c.ok]
    assert not failed, failed
    for budget in result.budgets:
        # >= 0, not > 0: an idle monitor's CPU share below one clock tick reads as 0 %.
        assert math.isfinite(budget.value) and budget.value >= 0, budget
    return result


def qemu_missing() -> str | None:
    from tools.inmates import build as inmates
    from tools.jailhouse_sim.engines.qemu import DEFAULT_BINARY

    if shutil.which(DEFAULT_BINARY) is None:
        return f"{DEFAULT_BINARY} is not installed"
    return inmates.missing_tools()


# ---- harness ---------------------------------------------------------------------------------


def test_budget_verdicts_follow_the_comparison():
    assert Budget("b", 1.0, 1.25, "<=").passed
    assert not Budget("b", 1.3, 1.25, "<=").passed
    assert Budget("b", 150.0, 100.0, ">=").passed
    assert not Budget("b", 99.0, 100.0, ">=").passed


def test_series_summary_and_percentile():
    series = Series("s", (3.0, 1.0, 2.0, 10.0))
    assert (series.min, series.median, series.max) == (1.0, 2.5, 10.0)
    assert series.percentile(0.5) == 3.0
    assert series.percentile(0.99) == 10.0


def test_interleaved_alternates_candidates_and_drops_warmup():
    order: list[str] = []
    result = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, runs=2, warmup=1)
    assert order == ["a", "b"] * 3
    assert [len(s.samples) for s in result.values()] == [2, 2]


def test_a_failing_suite_is_reported_not_raised():
    def broken(options: Options) -> SuiteResult:
        raise RuntimeError("no such thing")

    result = run_suite("broken", broken, QUICK)
    assert result.error == "RuntimeError: no such thing"
    assert not result.passed


def test_unknown_suite_is_one_line_and_exit_1():
    done = subprocess.run([sys.executable, "-m", "tools.bench", "nonsense"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"tools.bench: unknown suite 'nonsense': choose from {', '.join(bench.SUITES)}"]


def test_cli_prints_verdicts_and_writes_the_json_report(tmp_path):
    report_path = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "tools.bench", "cellgen", "--quick", "--json", str(report_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    report = msgspec.json.decode(report_path.read_bytes(), type=Report)
    assert [s.name for s in report.suites] == ["cellgen"]
    assert report.quick and report.machine.cpus >= 1
    (budget,) = report.budgets
    assert budget.name == "speed-up over gcc + objcopy"
    assert ("PASS" if budget.passed else "FAIL") + "] speed-up over gcc + objcopy" in done.stdout
    assert report.passed == (done.returncode == 0)


# ---- suites ----------------------------------------------------------------------------------


def test_cellgen_suite_matches_gcc_bytes():
    result = smoke("cellgen")
    if shutil.which("gcc") and shutil.which("objcopy"):
        assert [c.name for c in result.checks] == ["gcc + objcopy bytes == write_cell bytes"]
        assert [b.name for b in result.budgets] == ["speed-up over gcc + objcopy"]


def test_simtool_suite_times_both_jailhouse_clients():
    result = smoke("simtool")
    assert [b.name for b in result.budgets] == ["C client / Python client: cell list (wall)"]
    assert {c.name for c in result.checks} == {"same output from both clients: cell list",
                                                "same output from both clients: console"}
    assert {"C client: cell list", "Python client: cell list", "true (process floor)"} <= {s.name for s in result.series}


def test_console_suite_through_the_real_monitor():
    result = smoke("console")
    assert {b.name for b in result.budgets} == {
        "guest->pipe p99 (echo round trip, upper bound)", "throughput through the monitor",
        "idle monitor CPU (own)", "monitor RSS"}


def test_verbs_suite_and_import_audit():
    result = smoke("verbs")
    audited = {c.name for c in result.checks}
    assert {"imports of runphi state", "imports of runphi create", "imports of runphi delete"} <= audited
    names = {s.name for s in result.series}
    assert {"runphi state", "runphi create (own)", "python -c pass"} <= names


@pytest.mark.qemu
def test_lifecycle_suite_script_and_qemu_guests():
    reason = qemu_missing()
    if reason:
        pytest.skip(reason)
    result = smoke("lifecycle")
    assert any(s.name.startswith("qemu:") for s in result.series)
    assert any(s.name == "script: cell failed -> monitor exit" for s in result.series)


@pytest.mark.qemu
def test_qemu_suite():
    reason = qemu_missing()
    if reason:
        pytest.skip(reason)
    smoke("qemu")


@pytest.mark.containerd
def test_e2e_suite_with_a_private_containerd():
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    result = smoke("e2e")
    assert len(result.budgets) == 2


@pytest.mark.containerd
def test_shim_suite_installs_runphi_and_leaves_nothing_behind():
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    result = smoke("shim")
    assert {b.name for b in result.budgets} == {
        "ZIC shim mode / runc busybox, overall", "ZIC shim mode: runphi's own share / runc busybox",
        "busybox: io.containerd.runphi.v2 / io.containerd.runc.v2",
        "create -> first console byte, shim / runc-CLI mode",
        "idle shim server CPU (own)", "idle shim server RSS"}
    assert {c.name for c in result.checks} == {
        "nothing left in containerd after the runs", "no cell left on the board",
        "idle guest printed before the window", "the shim server runs the installed runphi",
        "no runphi process left after cleanup (warm parent, servers)"}
    assert result.info["processes per ctr run, ZIC, shim mode"].startswith("2: ")


@pytest.mark.containerd
@pytest.mark.qemu
def test_kvm_suite_pins_every_vcpu_refuses_the_rest_and_leaves_nothing_behind():
    reason = missing_requirements() or qemu_missing()
    if reason:
        pytest.skip(reason)
    result = smoke("kvm")
    assert {b.name for b in result.budgets} == {
        "backend path: launch + start -> first console byte / bare QEMU",
        "ctr run --rm hello, shim mode: KVM / simulator"}
    assert len(result.checks) == 8
    assert any(c.name.startswith("8 creates at once: exactly ") for c in result.checks)


@pytest.mark.containerd
@pytest.mark.qemu
def test_net_suite_reports_both_backends_next_to_runc_and_leaves_nothing_behind():
    from tools.linux_guest.testing import guest_unavailable

    reason = (missing_requirements() or guest_unavailable()
              or (None if shutil.which("nft") else "nft is not installed (apt-get install nftables)"))
    if reason:
        pytest.skip(reason)
    result = smoke("net")
    assert not result.budgets  # issue #20: numbers and ratios, no threshold
    backends = ("KVM backend", "simulator (QEMU engine)")
    assert [s.name for s in result.series] == [f"{backend}: {what}, {target}" for backend in backends
                                               for what in ("GET / latency", "GET 10 MiB")
                                               for target in ("ZIC", "runc")]
    for backend in backends:
        for what in ("GET / p50, ZIC / runc", "GET / p99, ZIC / runc",
                     "10 MiB GET throughput (median), ZIC / runc"):
            assert result.info[f"{backend}: {what}"].endswith("x")
    assert len(result.checks) == 9


def test_scale_suite_leaves_nothing_behind():
    result = smoke("scale")
    assert len(result.checks) == 3


def test_metrics_suite_scrapes_16_zics_and_leaves_nothing_behind():
    result = smoke("metrics")
    assert not result.budgets  # issue #21: numbers, no threshold (the reference limits are info lines)
    assert [s.name for s in result.series] == ["GET /metrics, 16 ZICs", "exporter CPU per scrape",
                                               "idle exporter CPU (own)", "idle exporter RSS"]
    assert len(result.series[0].samples) == 5
    assert {c.name for c in result.checks} == {
        "16 ZICs created and started, one CPU each",
        "every scrape parses, 16 runphi_zic_info samples (our ids), all running",
        "exporter ended 0 on SIGTERM and was reaped",
        "no cell, ledger entry or record left after the deletes",
        "no runphi process of ours left (exporter, monitors, verbs)"}
