"""metrics: the ``runphi metrics --listen`` exporter with 16 ZICs: scrape latency, idle CPU and RSS.

    python -m tools.bench.metrics [--quick]      (or: python -m tools.bench metrics)

Issue #21's budget, without a threshold: "exporter overhead: scrape latency with 16
ZICs, and idle CPU of the exporter". Jailhouse cells never share a CPU and the shipped
simulator board lends 7, so this suite runs on scale's widened copy of it (17 CPUs, a
UART per cell, :func:`tools.bench.scale.wide_board`): 16 script-guest ZICs (print a
line, then idle), created and started at once with the runphi CLI, all 16 running
(one CPU each, each with its monitor polling its cell) while the exporter is measured.

The exporter is ``runphi metrics --listen 127.0.0.1:PORT`` with the node's environment,
ready when it prints its ``serving`` line on stderr. A first scrape (lazy imports, the
backend's first use) is reported on its own; then N = 50 (``--quick``: 5) sequential
``GET /metrics``, each from before ``connect`` to the last byte (prometheus_client's
server speaks HTTP/1.0: a connection per scrape, whoever scrapes), without
``Accept``/``Accept-Encoding`` headers (the text format, uncompressed): p50 / p99 / max,
and the exporter's CPU per scrape (``utime + stime`` of ``/proc/<pid>/stat`` over the N
scrapes, its per-request threads included). Then, with no scrape, its CPU over an idle
window of 10 s (``--quick``: 1 s) as a share of one CPU (``/proc/<pid>/stat``, clock
ticks; and the scheduler's nanosecond run time of its threads) and its VmRSS.

No budget (issue #21 gives no threshold): values are series and info lines. The
reference limits quoted next to them are ours: scrape p50 <= 250 ms with 16 ZICs, idle
CPU <= 0.5 % (the idle budget of the monitor and of the shim server). Checks: all 16
ZICs created and started (16 monitors, 16 disjoint CPUs in the ledger); every scrape
parses with prometheus_client's parser and holds 16 ``runphi_zic_info`` samples,
exactly our 16 ids, each in state ``running``; the exporter ends 0 on SIGTERM and is
reaped; after the deletes no cell, ledger entry or record is left; after the board
stopped, no process carrying the node's state dir in its environment (exporter,
monitors, verbs) is left.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from .console import _cpu_seconds, _rss_mib
from .harness import Check, Options, Series, SuiteResult, standalone
from .scale import batch, ledger, wide_board
from .shim import _run_ns
from .zic import Node, guest_script, scratch_dir, sim_node, take_calls

ZICS = 16
#: Reference limits quoted next to the values (ours; issue #21 gives none).
SCRAPE_P50_REFERENCE_MS = 250.0
IDLE_CPU_REFERENCE_PERCENT = 0.5
READY_TIMEOUT_S = 30.0


def start_zics(node: Node, count: int) -> list[str]:
    """Create ``count`` idle script-guest ZICs at once, then start them at once; their ids."""
    bundle = node.bundle("metrics", guest_script("print up\\n", "halt"))
    ids = [f"bench-metrics-{i}" for i in range(count)]
    pid_files = {cid: node.base / f"{cid}.pid" for cid in ids}
    _, failed, why = batch(node, [node.argv("create", "--bundle", str(bundle), "--pid-file", str(pid_files[cid]),
                                            cid) for cid in ids])
    for cid, pid_file in pid_files.items():
        if pid_file.exists():
            node.monitors[cid] = int(pid_file.read_text())
    if failed:
        raise RuntimeError(f"{failed} of {count} creates failed: {why}")
    _, failed, why = batch(node, [node.argv("start", cid) for cid in ids])
    if failed:
        raise RuntimeError(f"{failed} of {count} starts failed: {why}")
    return ids


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Exporter:
    """A running ``runphi metrics --listen``: its process, URL and, once stopped, exit status."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url
        self.status: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def exporter(node: Node) -> Iterator[Exporter]:
    """``runphi metrics --listen 127.0.0.1:<free port>``, ready (its ``serving`` line read);
    SIGTERM and reaped afterwards."""
    port = free_port()
    process = subprocess.Popen(node.argv("metrics", "--listen", f"127.0.0.1:{port}"), env=node.env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    running = Exporter(process, f"http://127.0.0.1:{port}/metrics")
    stderr = process.stderr
    assert stderr is not None
    try:
        ready, _, _ = select.select([stderr], [], [], READY_TIMEOUT_S)
        line = stderr.readline() if ready else ""
        if "serving" not in line:
            raise RuntimeError(f"runphi metrics did not report serving within {READY_TIMEOUT_S:g} s: {line.strip()!r}")
        yield running
    finally:
        process.terminate()
        try:
            running.status = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            running.status = process.wait()
        stderr.close()


def scrape(url: str) -> tuple[float, str]:
    """One ``GET /metrics`` on a new connection: (seconds to the last byte, body)."""
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as answer:
        body = answer.read()
    return time.perf_counter() - start, body.decode()


def scrape_problem(text: str, ids: list[str]) -> str:
    """What is wrong with one scrape ("" when it parses and shows exactly ``ids``, all running)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as error:
        return f"does not parse: {error}"
    info = [s.labels.get("container_id", "") for s in samples if s.name == "runphi_zic_info"]
    running = {s.labels.get("container_id", "") for s in samples
               if s.name == "runphi_zic_state" and s.labels.get("state") == "running" and s.value == 1}
    if len(info) != len(ids) or set(info) != set(ids):
        return f"{len(info)} runphi_zic_info samples, ids {sorted(set(info) ^ set(ids))[:4]} differ"
    if running != set(ids):
        return f"{len(set(ids) - running)} ZICs not running"
    return ""


class Scrapes(NamedTuple):
    """What the scrapes measured."""

    first: float
    latencies: tuple[float, ...]
    cpu_per_scrape: float
    tool_calls_per_scrape: float
    size: int
    samples: int
    problems: list[str]


def measure_scrapes(node: Node, running: Exporter, ids: list[str], count: int) -> Scrapes:
    """A first scrape, then ``count`` timed ones; each checked (outside the timing)."""
    from prometheus_client.parser import text_string_to_metric_families

    first, text = scrape(running.url)
    problems = [f"first: {p}" for p in [scrape_problem(text, ids)] if p]
    take_calls(node.tool_log)  # drop the calls made so far (monitors' probes, the first scrape)
    cpu_before = _cpu_seconds(running.pid)[0]
    latencies = []
    for index in range(count):
        seconds, text = scrape(running.url)
        latencies.append(seconds)
        problem = scrape_problem(text, ids)
        if problem:
            problems.append(f"scrape {index}: {problem}")
    cpu = _cpu_seconds(running.pid)[0] - cpu_before
    calls = sum(1 for call in take_calls(node.tool_log) if call.caller == running.pid)
    samples = sum(len(family.samples) for family in text_string_to_metric_families(text))
    return Scrapes(first, tuple(latencies), cpu / count, calls / count, len(text.encode()), samples, problems)


class IdleExporter(NamedTuple):
    """The exporter between scrapes: CPU shares of one CPU (clock ticks; scheduler ns) and VmRSS."""

    cpu: float
    cpu_ns: float
    rss_mib: float


def measure_idle(pid: int, settle: float, window: float) -> IdleExporter:
    """The exporter's CPU over ``window`` seconds without scrapes, after ``settle`` seconds."""
    time.sleep(settle)  # let the last request's thread end before the window
    own, run_ns, start = _cpu_seconds(pid)[0], _run_ns(pid), time.perf_counter()
    time.sleep(window)  # the measurement window itself, not a synchronisation
    elapsed = time.perf_counter() - start
    return IdleExporter((_cpu_seconds(pid)[0] - own) / elapsed, (_run_ns(pid) - run_ns) / 1e9 / elapsed,
                        _rss_mib(pid))


def left_on_board(node: Node) -> Check:
    """After the deletes: no cell on the board, no ledger entry, no record in the state root."""
    cells = [p.name for p in node.sim.sysfs_path("cells").iterdir() if p.name != "0"]
    records = [p.name for p in node.root.iterdir() if p.is_dir()] if node.root.is_dir() else []
    held = ledger(node)
    return Check("no cell, ledger entry or record left after the deletes", not cells and not held and not records,
                 f"cells {cells}, ledger {len(held)}, records {len(records)}")


def left_processes(marker: str) -> Check:
    """After the board stopped: no process carrying the node's state dir in its environment."""
    from tools.testbed.containerd import processes_with_env

    found = processes_with_env(marker, exclude={os.getpid()})
    return Check("no runphi process of ours left (exporter, monitors, verbs)", not found, "; ".join(found)[:300])


def report(result: SuiteResult, scrapes: Scrapes, idle: IdleExporter, options: Options) -> None:
    """Series and info lines (no budget: issue #21 gives no threshold)."""
    latency = result.add(Series(f"GET /metrics, {ZICS} ZICs", scrapes.latencies))
    result.add(Series("exporter CPU per scrape", (scrapes.cpu_per_scrape,)))
    result.add(Series("idle exporter CPU (own)", (idle.cpu * 100,), unit="%"))
    result.add(Series("idle exporter RSS", (idle.rss_mib,), unit="MiB"))
    p50 = latency.median * 1e3
    result.info["scrape latency"] = (f"p50 (median) {p50:.1f} ms, p99 {latency.percentile(0.99) * 1e3:.1f} ms, "
                                     f"max {latency.max * 1e3:.1f} ms over {len(latency.samples)} scrapes "
                                     f"(reference, ours: p50 <= {SCRAPE_P50_REFERENCE_MS:g} ms: "
                                     f"{'within' if p50 <= SCRAPE_P50_REFERENCE_MS else 'OVER'})")
    result.info["first scrape"] = f"{scrapes.first * 1e3:.1f} ms (lazy imports, first backend use)"
    result.info["one scrape"] = (f"{scrapes.size} bytes, {scrapes.samples} samples, exporter CPU "
                                 f"{scrapes.cpu_per_scrape * 1e3:.1f} ms, "
                                 f"{scrapes.tool_calls_per_scrape:g} hypervisor tool calls")
    window = options.count(10, 1)
    result.info["idle exporter"] = (f"own CPU {idle.cpu * 100:.3f} % over {window} s (scheduler run time "
                                    f"{idle.cpu_ns * 100:.4f} %; reference, ours: <= {IDLE_CPU_REFERENCE_PERCENT:g} %: "
                                    f"{'within' if idle.cpu * 100 <= IDLE_CPU_REFERENCE_PERCENT else 'OVER'}), "
                                    f"RSS {idle.rss_mib:.1f} MiB")


def run(options: Options) -> SuiteResult:
    result = SuiteResult("metrics")
    base = Path(tempfile.mkdtemp(prefix="rphi-bench-", dir=scratch_dir()))
    board, platform = wide_board(base, ZICS + 1)
    with sim_node(board=str(board), platform=str(platform), base=base) as node:
        marker = f"RUNPHI_STATE_DIR={node.env['RUNPHI_STATE_DIR']}"
        ids = start_zics(node, ZICS)
        cpus = [frozenset(held["cpus"]) for held in ledger(node).values()]
        result.checks.append(Check(f"{ZICS} ZICs created and started, one CPU each",
                                   len(node.monitors) == len(cpus) == len(frozenset().union(*cpus)) == ZICS,
                                   f"{len(node.monitors)} monitors, {len(cpus)} ledger entries"))
        with exporter(node) as running:
            scrapes = measure_scrapes(node, running, ids, options.count(50, 5))
            idle = measure_idle(running.pid, settle=0.5 if options.quick else 1.0, window=options.count(10, 1))
        node.cleanup()
        result.checks += [
            Check(f"every scrape parses, {ZICS} runphi_zic_info samples (our ids), all running",
                  not scrapes.problems, "; ".join(scrapes.problems)[:300]),
            Check("exporter ended 0 on SIGTERM and was reaped", running.status == 0, f"status {running.status}"),
            left_on_board(node),
        ]
    result.checks.append(left_processes(marker))
    report(result, scrapes, idle, options)
    result.info["ZICs"] = (f"{ZICS} running script guests (print a line, then idle), one CPU each, on a simulated "
                           f"board widened to {ZICS + 1} CPUs with a UART per cell")
    return result


if __name__ == "__main__":
    sys.exit(standalone("metrics", run))
