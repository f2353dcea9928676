"""runphi's benchmarks: every figure a ratio against a reference measured in the same run.

    python -m tools.bench [suite ...] [--quick] [--json FILE]

Suites (one module each, each also runnable as ``python -m tools.bench.<suite>``):
cellgen, simtool, console, verbs, lifecycle, qemu, e2e, shim, kvm, net, metrics, scale. See docs/BENCHMARKS.md for
the budgets and the latest numbers, and ``harness.py`` for how samples are taken.
"""
