"""``runphi top``: the live view on a real terminal, the plain view elsewhere, bad flags.

Three ZICs run on a simulated board (script guests): two tick, one takes a data abort
(its cell fails, exit 139). ``runphi top`` runs on a pty whose slave is its stdin,
stdout, stderr and controlling terminal, as in a terminal emulator; the test reads the
master against deadlines (never sleeps) and types into it. The terminal's termios
attributes are compared before ``top`` starts and after it exits.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import termios
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from runphi.verbs.top import _ENTER, _LEAVE
from tests.fdread import read_until
from tests.test_lifecycle_harness import RUNPHI, board, subreaper, zic  # noqa: F401
from tests.test_metrics import three_zics  # noqa: F401  (fixture: two ticking ZICs, one crashed)

HEADER = re.compile(r"^ID\s+CELL\s+CPUS\s+STATE\s+UPTIME\s+EXITS/S\s+CONSOLE B/S\s+DROPPED$", re.M)
ESCAPE = "\x1b"
#: How long ``top`` may take to draw, or to exit once told to.
DEADLINE = 30.0


class Pty:
    """``runphi --root R top ARGS`` on a fresh pty: the slave is its controlling terminal
    and its stdin/stdout/stderr; the test holds the master and keeps the slave open (to
    read its attributes after the process is gone)."""

    def __init__(self, zic, *args: str) -> None:
        self.master, self.slave = os.openpty()
        #: The terminal's attributes before ``top`` started.
        self.before = termios.tcgetattr(self.slave)
        self.seen = bytearray()
        try:
            self.process = subprocess.Popen([str(RUNPHI), "--root", str(zic.root), "top", *args], env=zic.env,
                                            stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                            start_new_session=True, preexec_fn=_take_controlling_terminal)
        except BaseException:
            os.close(self.master)
            os.close(self.slave)
            raise

    @property
    def text(self) -> str:
        return self.seen.decode(errors="replace")

    def expect(self, *markers: str, after: int = 0) -> None:
        """Read until every marker showed up at or after offset ``after`` (AssertionError past DEADLINE)."""
        for marker in markers:
            read_until(self.master, marker.encode(), self.seen, start=after, timeout=DEADLINE)

    def type(self, keys: bytes) -> int:
        """Type ``keys``; the offset of the output that follows."""
        mark = len(self.seen)
        os.write(self.master, keys)
        return mark

    def exit_status(self) -> int:
        """The exit status, waited for at most DEADLINE; then everything it wrote is in ``seen``."""
        status = self.process.wait(timeout=DEADLINE)
        # It has exited: all it wrote is in the pty already, so reading until empty is exact.
        while select.select([self.master], [], [], 0)[0]:
            self.seen += os.read(self.master, 65536)
        return status

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=DEADLINE)
        os.close(self.master)
        os.close(self.slave)


def _take_controlling_terminal() -> None:
    """In the child, after setsid: make its stdin (the pty slave) its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@contextmanager
def top_on_a_pty(zic, *args: str) -> Iterator[Pty]:
    """A :class:`Pty` running ``top``, killed (if still running) and closed on leaving."""
    term = Pty(zic, *args)
    try:
        yield term
    finally:
        term.close()


def last_frame(text: str) -> str:
    """The last view drawn before ``top`` left the screen, with plain newlines.

    Each view is written whole before ``top`` looks at the keyboard again, so the one
    before the leave sequence is complete.
    """
    assert text.endswith(_LEAVE), text[-200:]
    return text[:-len(_LEAVE)].split("\x1b[H\x1b[2J")[-1].replace("\r", "")


def check_rows(view: str) -> None:
    """``view`` has the header and one row per ZIC: the tickers running, the crashed one stopped (139)."""
    assert HEADER.search(view), view
    ids = ("crashed", "tick-a", "tick-b")
    rows = {line.split()[0]: line for line in view.splitlines() if line.split()[:1] and line.split()[0] in ids}
    assert sorted(rows) == list(ids), view
    assert " running " in rows["tick-a"] and " running " in rows["tick-b"], view
    assert "stopped (139)" in rows["crashed"], view
    assert view.splitlines()[0].startswith("runphi top: 3 ZIC(s) on jailhouse"), view


@pytest.mark.parametrize("quit_key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_on_a_terminal_it_redraws_until_q_or_ctrl_c_and_restores_the_terminal(three_zics, quit_key):
    with top_on_a_pty(three_zics, "--interval", "0.2") as term:
        term.expect("DROPPED", "tick-a", "tick-b", "crashed")
        assert term.text.startswith(_ENTER), term.text[:200]
        during = termios.tcgetattr(term.slave)
        assert not during[3] & (termios.ICANON | termios.ECHO), "the keyboard is not in cbreak mode"
        mark = term.type(quit_key)
        term.expect(_LEAVE, after=mark)
        assert term.exit_status() == 0, term.text[-2000:]
        assert term.text.endswith(_LEAVE), term.text[-200:]
        assert termios.tcgetattr(term.slave) == term.before
    check_rows(last_frame(term.text))


def test_on_a_terminal_once_prints_one_plain_view(three_zics):
    with top_on_a_pty(three_zics, "--interval", "0.2", "--once") as term:
        assert term.exit_status() == 0, term.text
        assert ESCAPE not in term.text, term.text
        check_rows(term.text.replace("\r\n", "\n"))
        assert termios.tcgetattr(term.slave) == term.before


def test_off_a_terminal_it_prints_one_plain_view_and_exits_0(three_zics):
    done = three_zics.run("top", "--interval", "0.2", timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    assert ESCAPE not in done.stdout, repr(done.stdout)
    check_rows(done.stdout)
    assert len(HEADER.findall(done.stdout)) == 1, done.stdout


def test_a_terminal_is_restored_when_top_is_terminated(three_zics):
    with top_on_a_pty(three_zics, "--interval", "0.2") as term:
        term.expect("DROPPED", "tick-a")
        mark = len(term.seen)
        term.process.send_signal(signal.SIGTERM)
        term.expect(_LEAVE, after=mark)
        assert term.exit_status() == 128 + signal.SIGTERM, term.text[-2000:]
        assert termios.tcgetattr(term.slave) == term.before


@pytest.mark.parametrize("interval", ["abc", "0", "-1", "nan"])
def test_a_bad_interval_is_one_line_and_exit_1(zic, interval):
    done = zic.run("top", "--interval", interval, timeout=DEADLINE)
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"--interval {interval!r}" in done.stderr and "seconds" in done.stderr, done.stderr
    assert done.stdout == ""
