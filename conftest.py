"""Settings shared by every test suite of the checkout (tests/ and the simulator's own)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Hypothesis: under CI=true one fixed seed per test and no example database, so a CI run
# is reproducible; locally the default profile keeps exploring new examples. Per-test
# @settings that do not set derandomize inherit it. The CI profile also drops the
# timing-dependent checks (deadline, too_slow) so a slow runner cannot fail a test.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else None)
if HYPOTHESIS_PROFILE:
    settings.load_profile(HYPOTHESIS_PROFILE)
