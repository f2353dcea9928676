"""Named pause points: a test hook for crash-consistency tests, inert in production.

With ``RUNPHI_TEST_PAUSE_AT=<step>`` in its environment, a runphi process stops
itself with SIGSTOP when it reaches the step of that name, so a test can observe
the half-done state and then ``kill -9`` the process exactly there. Without the
variable a pause point costs one dictionary lookup done at import.

Steps (in the order a verb reaches them):

``create``: ``create:record`` (the ``creating`` record is written),
``create:allocated`` (ledger entry written), ``create:cell-created``,
``create:loaded``, ``create:linked`` (KVM: the VM plan written and its network link
made), ``create:launched`` (monitor forked, record not yet updated), ``create:recorded`` (record holds the cell and the monitor),
``create:hooks-done``.
``delete``: ``delete:monitor-stopped``, ``delete:cell-destroyed`` (ledger not yet
released), ``delete:released`` (record not yet removed).

With ``RUNPHI_TEST_PAUSE_ONCE=<path>`` as well, only the first process to reach the
step stops (it creates ``<path>``): when every process of a node shares one
environment (containerd's), the cleanup that follows the kill must run through.
"""

from __future__ import annotations

import os
import signal

ENV = "RUNPHI_TEST_PAUSE_AT"
ONCE_ENV = "RUNPHI_TEST_PAUSE_ONCE"
_PAUSE_AT = os.environ.get(ENV, "")


def pause_point(step: str) -> None:
    """Stop this process (SIGSTOP) if ``RUNPHI_TEST_PAUSE_AT`` names ``step`` (and, with
    ``RUNPHI_TEST_PAUSE_ONCE``, no process stopped there before); else nothing."""
    if _PAUSE_AT and step == _PAUSE_AT and _first_to_stop():
        os.kill(os.getpid(), signal.SIGSTOP)


def _first_to_stop() -> bool:
    marker = os.environ.get(ONCE_ENV, "")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return True
    except FileExistsError:
        return False
