"""``python -m tools.bench [suite ...] [--quick] [--json FILE]``: run suites, check budgets.

Prints one table per suite (min / median / max of every series, correctness
checks, PASS/FAIL per budget) and exits 0 only when every budget and check of
every suite that ran passed. A suite that cannot run here (no containerd, no
QEMU, not root) is reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time

from .harness import Options, build_report, format_suite, run_suite, write_report

#: Suite name -> module under tools.bench; in the order they run by default.
SUITES = {
    "cellgen": "cellgen",
    "simtool": "simtool",
    "console": "console",
    "verbs": "verbs",
    "lifecycle": "lifecycle",
    "qemu": "qemu_first_byte",
    "e2e": "e2e",
    "shim": "shim",
    "kvm": "kvm",
    "net": "net",
    "scale": "scale",
    "metrics": "metrics",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", metavar="suite",
                        help=f"suites to run (default: all): {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run of each suite")
    parser.add_argument("--json", metavar="FILE", help="also write the full report as JSON to FILE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        print(f"tools.bench: unknown suite {unknown[0]!r}: choose from {', '.join(SUITES)}", file=sys.stderr)
        return 1
    options = Options(quick=args.quick)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    for name in args.suites or list(SUITES):
        module = importlib.import_module(f"tools.bench.{SUITES[name]}")
        result = run_suite(name, module.run, options)
        print(format_suite(result), flush=True)
        results.append(result)
    command = "python -m tools.bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = build_report(results, command=command.strip(), started=started, quick=args.quick)
    if args.json:
        write_report(args.json, report)
    failed = [f"{b.suite}: {b.name}" for b in report.budgets if not b.passed]
    failed += [f"{s.name}: {c.name}" for s in report.suites for c in s.checks if not c.ok]
    failed += [f"{s.name}: error" for s in report.suites if s.error]
    skipped = [s.name for s in report.suites if s.skipped]
    print(f"\n{len(report.budgets) - sum(not b.passed for b in report.budgets)}/{len(report.budgets)} budgets met"
          + (f"; skipped: {', '.join(skipped)}" if skipped else "")
          + (f"; FAILED: {'; '.join(failed)}" if failed else ""))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
