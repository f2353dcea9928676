"""The monitor's exit-status rule (DESIGN §4) as a pure function, state by state.

States are written as Jailhouse reports them and mapped by the backend's own
``cell_status``, so each row also checks that mapping.
"""

from __future__ import annotations

import signal

import pytest

from runphi.backends.jailhouse.driver import cell_status
from runphi.core.outcome import decide_exit

TERM, KILL, INT, HUP, QUIT = (int(s) for s in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT,
                                               signal.SIGHUP, signal.SIGQUIT))


@pytest.mark.parametrize(
    ("state", "available", "started", "sig", "code"),
    [
        # the guest shut itself down
        ("shut down", True, True, None, 0),
        # kill N caused the shutdown (or the forced destroy)
        ("shut down", True, True, TERM, 143),
        ("shut down", True, False, TERM, 143),
        (None, True, True, TERM, 143),
        ("shut down", True, True, INT, 130),
        ("shut down", True, True, HUP, 129),
        ("shut down", True, True, QUIT, 131),
        # crashed
        ("failed", True, True, None, 139),
        ("Comm ABI mismatch", True, True, None, 139),
        ("failed", True, True, TERM, 139),
        # vanished / unreachable
        (None, True, True, None, 255),
        (None, True, False, None, 255),
        (None, False, True, None, 255),
        ("running", False, True, TERM, 255),
    ],
)
def test_decided_exit_status(state, available, started, sig, code):
    decision = decide_exit(cell_status(state), available=available, started=started, signal_number=sig)
    assert decision is not None and decision[0] == code
    assert decision[1]


@pytest.mark.parametrize(
    ("state", "started", "sig"),
    [
        ("shut down", False, None),  # created, not yet started: keep waiting
        ("running", True, None),
        ("running/locked", True, None),
        ("running", True, TERM),  # shutdown requested, not done yet
        ("running/locked", True, TERM),
        ("invalid", True, None),
    ],
)
def test_keeps_watching(state, started, sig):
    assert decide_exit(cell_status(state), available=True, started=started, signal_number=sig) is None


def test_a_crash_names_the_hypervisors_word():
    assert decide_exit(cell_status("Comm ABI mismatch"), available=True, started=True,
                       signal_number=None) == (139, "the cell is `Comm ABI mismatch`")
