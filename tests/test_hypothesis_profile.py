"""Under CI=true every property test draws the same examples on every run (conftest's "ci" profile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Loads conftest as pytest does, then runs a property with its own @settings (which must
# still inherit the profile's fixed seed) and prints the profile and what it drew.
PROBE = f"""
import json, sys
sys.path[:0] = [{str(TESTS.parent)!r}, {str(TESTS)!r}]
import conftest
from hypothesis import given, settings, strategies as st

drawn = []

@settings(max_examples=25)
@given(st.integers(), st.text(max_size=8), st.frozensets(st.integers(0, 63), max_size=4))
def probe(n, s, cpus):
    drawn.append([n, s, sorted(cpus)])

probe()
d = settings.default
print(json.dumps({{"derandomize": d.derandomize, "database": d.database is None, "print_blob": d.print_blob,
                  "drawn": drawn}}))
"""


def run_probe(hash_seed: str, **env: str) -> dict:
    """The probe's report in a fresh interpreter with `env` (and no inherited profile choice)."""
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, "PYTHONHASHSEED": hash_seed, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_ci_profile_draws_the_same_examples_on_every_run() -> None:
    first, second = run_probe("1", CI="true"), run_probe("2", CI="true")
    assert first["derandomize"] and first["database"] and first["print_blob"]
    assert len(first["drawn"]) > 1 and first["drawn"] == second["drawn"]


def test_hypothesis_profile_variable_selects_the_profile() -> None:
    report = run_probe("1", HYPOTHESIS_PROFILE="ci")
    assert report["derandomize"] and report["database"]
