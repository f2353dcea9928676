"""Reusable test-beds: a private containerd, optionally driving a simulated board.

Shared by the demo (:mod:`tools.demo`), the benchmarks and the test suite, so
none of them has to import from ``tests/``.
"""
