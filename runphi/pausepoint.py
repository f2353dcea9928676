"""Named pause points: a test hook for crash-consistency tests, inert in production.

With ``RUNPHI_TEST_PAUSE_AT=<step>`` in its environment, a runphi process stops
itself with SIGSTOP when it reaches the step of that name, so a test can observe
the half-done state and then ``kill -9`` the process exactly there. Without the
variable a pause point costs one dictionary lookup done at import.

Steps (in the order a verb reaches them):

``create``: ``create:record`` (the ``creating`` record is written),
``create:allocated`` (ledger entry written), ``create:cell-created``,
``create:loaded``, ``create:launched`` (monitor forked, record not yet
updated), ``create:recorded`` (record holds the cell and the monitor),
``create:hooks-done``.
``delete``: ``delete:monitor-stopped``, ``delete:cell-destroyed`` (ledger not yet
released), ``delete:released`` (record not yet removed).
"""

from __future__ import annotations

import os
import signal

ENV = "RUNPHI_TEST_PAUSE_AT"
_PAUSE_AT = os.environ.get(ENV, "")


def pause_point(step: str) -> None:
    """Stop this process (SIGSTOP) if ``RUNPHI_TEST_PAUSE_AT`` names ``step``; else nothing."""
    if _PAUSE_AT and step == _PAUSE_AT:
        os.kill(os.getpid(), signal.SIGSTOP)
