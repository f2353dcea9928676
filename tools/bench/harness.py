"""The benchmark harness: repeated samples, same-run references, budgets, table and JSON.

Absolute times drift on shared machines; ratios measured in one invocation do
not. So every suite measures its references next to the thing under test
(interleaved where they are processes), after a warm-up, and every budget is a
ratio or a quantity that does not depend on the machine's speed (bytes per
second, CPU share, resident memory).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec


class Series(msgspec.Struct, frozen=True):
    """Repeated samples of one quantity (seconds unless ``unit`` says otherwise)."""

    name: str
    samples: tuple[float, ...]
    unit: str = "s"

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile (``fraction`` in 0..1)."""
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Budget(msgspec.Struct, frozen=True):
    """One checked budget: ``value`` compared with ``limit`` (``<=`` or ``>=``)."""

    name: str
    value: float
    limit: float
    compare: Literal["<=", ">="]
    unit: str = ""
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.compare == "<=" else self.value >= self.limit


class Check(msgspec.Struct, frozen=True):
    """A yes/no correctness finding made while measuring (e.g. identical bytes, no errors)."""

    name: str
    ok: bool
    detail: str = ""


class SuiteResult(msgspec.Struct):
    """What one suite measured; ``skipped`` holds the reason when it could not run."""

    name: str
    series: list[Series] = msgspec.field(default_factory=list)
    budgets: list[Budget] = msgspec.field(default_factory=list)
    checks: list[Check] = msgspec.field(default_factory=list)
    info: dict[str, str] = msgspec.field(default_factory=dict)
    skipped: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.error and all(b.passed for b in self.budgets) and all(c.ok for c in self.checks)

    def add(self, series: Series) -> Series:
        self.series.append(series)
        return series


class BudgetLine(msgspec.Struct, frozen=True):
    """A budget as written to JSON (with its verdict spelled out)."""

    suite: str
    name: str
    value: float
    limit: float
    compare: str
    unit: str
    passed: bool
    note: str


class SeriesLine(msgspec.Struct, frozen=True):
    """A series as written to JSON: summary figures plus the raw samples."""

    name: str
    unit: str
    count: int
    min: float
    median: float
    max: float
    samples: tuple[float, ...]


class SuiteLine(msgspec.Struct, frozen=True):
    name: str
    passed: bool
    seconds: float
    skipped: str
    error: str
    info: dict[str, str]
    series: list[SeriesLine]
    checks: list[Check]


class Machine(msgspec.Struct, frozen=True):
    """Where the numbers were taken."""

    system: str
    machine: str
    cpu: str
    cpus: int
    python: str
    load_average: tuple[float, float, float]


class Report(msgspec.Struct, frozen=True):
    """The JSON file ``python -m tools.bench --json FILE`` writes."""

    command: str
    started: str
    quick: bool
    machine: Machine
    suites: list[SuiteLine]
    budgets: list[BudgetLine]
    passed: bool


# ---- measuring ------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every child process this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def interleaved(candidates: dict[str, Callable[[], object]], runs: int, warmup: int = 1,
                *, child_cpu: bool = False) -> dict[str, Series]:
    """Time each candidate ``runs`` times, alternating between them round by round.

    Alternation spreads any drift of the machine (other load, frequency
    changes) evenly over all candidates, so their ratios stay meaningful.
    The ``warmup`` rounds are run and discarded (page cache, .pyc files).
    With ``child_cpu`` (candidates that run and wait for a process), also a
    ``"<name> [cpu]"`` series: the CPU time the process used, which waiting
    for a busy machine's CPUs does not inflate.
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for round_number in range(warmup + runs):
        for name, fn in candidates.items():
            before = children_cpu_seconds()
            elapsed = timed(fn)
            if round_number >= warmup:
                samples[name].append(elapsed)
                cpu[name].append(children_cpu_seconds() - before)
    result = {name: Series(name, tuple(values)) for name, values in samples.items()}
    if child_cpu:
        result.update({f"{name} [cpu]": Series(f"{name} [cpu]", tuple(values)) for name, values in cpu.items()})
    return result


def per_call(fn: Callable[[], object], count: int, rounds: int) -> Series:
    """Seconds per call of a fast ``fn``: ``rounds`` rounds of ``count`` calls after one warm-up."""
    fn()
    values = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            fn()
        values.append((time.perf_counter() - start) / count)
    return Series("", tuple(values))


def ratio(numerator: Series, denominator: Series) -> float:
    """Median over median: the ratio every "N x the reference" budget is checked on."""
    return numerator.median / denominator.median


# ---- reporting ------------------------------------------------------------------------------


def machine() -> Machine:
    """A description of this machine for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return Machine(system=f"{platform.system()} {platform.release()}", machine=platform.machine(), cpu=cpu,
                   cpus=os.cpu_count() or 1, python=sys.version.split()[0],
                   load_average=tuple(round(x, 2) for x in os.getloadavg()))


def _scaled(value: float, unit: str) -> str:
    if unit == "s":
        if value >= 1.0:
            return f"{value:.2f} s"
        if value >= 1e-3:
            return f"{value * 1e3:.1f} ms"
        return f"{value * 1e6:.1f} us"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.4g} {unit}".rstrip()


def format_suite(result: SuiteResult) -> str:
    """The human table for one suite: series (min / median / max), checks, budgets."""
    lines = [f"== {result.name} ({result.seconds:.1f} s)"]
    if result.skipped:
        lines.append(f"   skipped: {result.skipped}")
        return "\n".join(lines)
    for key, value in result.info.items():
        lines.append(f"   {key}: {value}")
    if result.series:
        width = max(len(s.name) for s in result.series)
        lines.append(f"   {'series':<{width}}  {'n':>4}  {'min':>10}  {'median':>10}  {'max':>10}")
        for s in result.series:
            lines.append(f"   {s.name:<{width}}  {len(s.samples):>4}  {_scaled(s.min, s.unit):>10}  "
                         f"{_scaled(s.median, s.unit):>10}  {_scaled(s.max, s.unit):>10}")
    for check in result.checks:
        lines.append(f"   [{'ok' if check.ok else 'FAIL'}] {check.name}{': ' + check.detail if check.detail else ''}")
    for budget in result.budgets:
        verdict = "PASS" if budget.passed else "FAIL"
        note = f"  ({budget.note})" if budget.note else ""
        lines.append(f"   [{verdict}] {budget.name}: {_scaled(budget.value, budget.unit)} "
                     f"{budget.compare} {_scaled(budget.limit, budget.unit)}{note}")
    if result.error:
        lines.append(f"   ERROR: {result.error}")
    return "\n".join(lines)


def build_report(results: Sequence[SuiteResult], *, command: str, started: str, quick: bool) -> Report:
    """Everything measured, as the JSON report's Structs."""
    suites = [SuiteLine(name=r.name, passed=r.passed, seconds=round(r.seconds, 3), skipped=r.skipped,
                        error=r.error, info=r.info,
                        series=[SeriesLine(s.name, s.unit, len(s.samples), s.min, s.median, s.max, s.samples)
                                for s in r.series],
                        checks=r.checks)
              for r in results]
    budgets = [BudgetLine(r.name, b.name, b.value, b.limit, b.compare, b.unit, b.passed, b.note)
               for r in results for b in r.budgets]
    return Report(command=command, started=started, quick=quick, machine=machine(), suites=suites,
                  budgets=budgets, passed=all(r.passed for r in results))


def write_report(path: str, report: Report) -> None:
    """Write the JSON report atomically (temp file + rename)."""
    data = msgspec.json.format(msgspec.json.encode(report), indent=2)
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "wb") as out:
        out.write(data + b"\n")
    os.replace(temp, path)


class Skip(Exception):
    """A suite cannot run here (a tool or privilege is truly absent); the message says which."""


class Options(msgspec.Struct, frozen=True):
    """How hard to measure: ``quick`` is the smoke run (tiny counts, seconds per suite)."""

    quick: bool = False

    @property
    def warmup(self) -> int:
        """Discarded warm-up rounds before the measured ones (none in the smoke run)."""
        return 0 if self.quick else 1

    def count(self, full: int, quick: int) -> int:
        """``full`` normally, ``quick`` for the smoke run."""
        return quick if self.quick else full


def run_suite(name: str, body: Callable[[Options], SuiteResult], options: Options) -> SuiteResult:
    """Run one suite, turning a skip or a failure into a result that says so in one line."""
    start = time.perf_counter()
    try:
        result = body(options)
    except Skip as why:
        result = SuiteResult(name, skipped=str(why))
    except Exception as error:  # a broken suite is reported, the others still run
        result = SuiteResult(name, error=f"{type(error).__name__}: {error}")
    result.name = name
    result.seconds = time.perf_counter() - start
    return result


def standalone(name: str, body: Callable[[Options], SuiteResult], argv: Sequence[str] | None = None) -> int:
    """``python -m tools.bench.<suite> [--quick]``: run one suite and print its table."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m tools.bench.{name}",
                                     description=f"the {name} benchmark suite (see tools/bench/__main__.py)")
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke run)")
    args = parser.parse_args(argv)
    result = run_suite(name, body, Options(quick=args.quick))
    print(format_suite(result))
    return 0 if result.passed else 1
