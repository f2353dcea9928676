"""Test support: a simulated board in a temporary directory.

Usage from any test suite (runphi's included)::

    from tools.jailhouse_sim.testing import SimBoard

    def test_something(tmp_path):
        with SimBoard.running(tmp_path / "sim") as sim:
            sim.jailhouse("cell", "create", cell_file).check()
            sim.wait_state(1, "shut down")

or the pytest fixture ``jailhouse_sim`` (import it into a conftest.py). The
daemon runs as a direct child of the test process (``jailhouse-sim serve``
with PR_SET_PDEATHSIG), so it is reaped on teardown and dies with the test run.

``netns="<name>"`` runs the daemon inside the network namespace ``/run/netns/<name>``
(through ``nsenter --net``, which execs it: it stays the direct child): the taps that
stand in for ivshmem-net, and its QEMU guests, are then in that namespace only.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import spawn
from .cli import (cleanup_leftovers, daemon_pid, install_cell_linux, install_client, install_system_config,
                  query_status, request)
from .layout import SimLayout

READY_TIMEOUT_S = 30.0


class SimError(AssertionError):
    """The simulator did not start or a checked command failed."""


@dataclass(frozen=True)
class Result:
    """Outcome of one ``jailhouse`` invocation."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        """Raise unless the command exited 0."""
        if self.returncode != 0:
            raise SimError(f"{' '.join(self.argv)} exited {self.returncode}: {self.stderr.strip() or self.stdout.strip()}")
        return self


class SimBoard:
    """A running simulated board (see the module docstring)."""

    def __init__(self, root: Path, board: str, engine: str, process: subprocess.Popen[bytes]) -> None:
        self.layout = SimLayout(root)
        self.root = self.layout.root
        self.board = board
        self.engine = engine
        self.process = process

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(cls, root: Path | str, board: str = "sim-qemu-arm64", engine: str = "script",
              *, enabled: bool = True, netns: str | None = None) -> SimBoard:
        """Start a simulator rooted at ``root`` and return once it serves requests; with ``netns``,
        the daemon runs in the network namespace ``/run/netns/<netns>`` (which must exist)."""
        from .board import load_board

        layout = SimLayout(root)
        board_config = load_board(board)
        if daemon_pid(layout) is not None:
            raise SimError(f"a simulator is already running in {layout.root}")
        cleanup_leftovers(layout)
        layout.run.mkdir(parents=True, exist_ok=True)
        install_client(layout, board_config.rcpus)
        install_cell_linux(layout.root, board)
        install_system_config(layout, board_config)
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, "-m", spawn.module("cli"), "serve", "--root", str(layout.root),
                "--board", board, "--engine", engine, "--ready-fd", str(write_fd), "--pdeathsig"]
        if not enabled:
            argv.append("--disabled")
        if netns is not None:
            argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
        with open(layout.daemon_log, "ab") as log:
            process = subprocess.Popen(argv, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=log, env=spawn.child_env(), cwd="/")
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            readable, _, _ = select.select([pipe], [], [], READY_TIMEOUT_S)
            message = pipe.readline().decode(errors="replace").strip() if readable else "timed out"
        if message != "ok":
            process.kill()
            process.wait()
            raise SimError(f"simulator did not start in {layout.root}: {message or 'daemon died'}; "
                           f"log: {layout.daemon_log.read_text()[-2000:]}")
        return cls(layout.root, board, engine, process)

    @classmethod
    @contextmanager
    def running(cls, root: Path | str, board: str = "sim-qemu-arm64", engine: str = "script",
                *, enabled: bool = True, netns: str | None = None) -> Iterator[SimBoard]:
        """Context manager: start (in network namespace ``netns`` if given), yield, always stop."""
        sim = cls.start(root, board, engine, enabled=enabled, netns=netns)
        try:
            yield sim
        finally:
            sim.stop()

    def stop(self) -> None:
        """Stop the daemon (orderly, escalating to SIGKILL) and reap it. Idempotent."""
        if self.process.poll() is None:
            try:
                request(self.layout, {"op": "stop"}, timeout=10.0)
            except (OSError, ConnectionError, ValueError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        cleanup_leftovers(self.layout)

    def kill(self) -> None:
        """SIGKILL the daemon: the board vanishes (files it made stay behind, as after a crash)."""
        self.process.kill()
        self.process.wait()

    @property
    def pid(self) -> int:
        return self.process.pid

    # ---- driving it ------------------------------------------------------------------------

    @property
    def jailhouse_path(self) -> Path:
        """``bin/jailhouse``: the compiled client (the Python one where no C compiler was found)."""
        return self.layout.bin_jailhouse

    @property
    def python_client_path(self) -> Path:
        """The Python ``jailhouse`` client of this root: the code the daemon runs for ``bin/jailhouse``,
        run by ``bin/jailhouse`` itself when no daemon answers."""
        return self.layout.python_client

    def python_client_env(self) -> dict[str, str]:
        """The environment that runs the Python client as if it were ``bin/jailhouse`` (the
        name it prints in its usage, where it looks for helpers), as the compiled one runs it."""
        return {**os.environ, "JAILHOUSE_SIM_EXECFN": str(self.jailhouse_path)}

    def jailhouse(self, *args: str | os.PathLike[str], timeout: float = 30.0) -> Result:
        """Run ``bin/jailhouse ARGS`` and capture its exit status and output."""
        argv = (str(self.jailhouse_path), *map(str, args))
        done = subprocess.run(argv, capture_output=True, timeout=timeout, cwd=self.root)
        return Result(argv, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))

    def inject(self, *, errno: int = 0, count: int = 1, delay_ms: int = 0, op: str | None = None,
               clear: bool = False) -> None:
        """Make upcoming management calls fail with ``errno`` and/or take ``delay_ms``."""
        reply = request(self.layout, {"op": "inject", "count": count, "errno": errno, "delay_ms": delay_ms,
                                      "only": op, "clear": clear})
        if reply.get("errno"):
            raise SimError(f"inject rejected: {reply}")

    def status(self) -> dict:
        status = query_status(self.layout)
        if status is None:
            raise SimError(f"simulator in {self.root} does not answer")
        return status

    def wait_status(self, predicate, timeout: float = 5.0) -> dict:
        """Ask the daemon for its status until ``predicate(status)`` holds; returns that status."""
        start = time.monotonic()
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() - start > timeout:
                raise SimError(f"simulator status still {status} after {timeout}s")
            time.sleep(0.01)

    # ---- observing it ----------------------------------------------------------------------

    def uart(self, index: int) -> Path:
        """The stable pty path of board UART ``index``."""
        return self.layout.uart(index)

    @property
    def console_device(self) -> Path:
        """``dev/jailhouse``: connect a unix stream socket to read the hypervisor console as
        an open file of ``/dev/jailhouse`` (see the README's "The hypervisor console")."""
        return self.layout.console_device

    def sysfs_path(self, relpath: str = "") -> Path:
        return self.layout.sysfs / relpath

    def read_sysfs(self, relpath: str) -> str | None:
        """A sysfs attribute's content, or None if it does not exist."""
        try:
            return (self.layout.sysfs / relpath).read_text()
        except FileNotFoundError:
            return None

    def state(self, cell_id: int) -> str | None:
        """``cells/<id>/state`` without the newline (None if there is no such cell)."""
        value = self.read_sysfs(f"cells/{cell_id}/state")
        return value.rstrip("\n") if value is not None else None

    def wait_state(self, cell_id: int, state: str, timeout: float = 5.0) -> float:
        """Poll the sysfs state file until it reads ``state``; returns the seconds waited."""
        start = time.monotonic()
        while True:
            current = self.state(cell_id)
            if current == state:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise SimError(f"cell {cell_id} state is {current!r}, not {state!r}, after {timeout}s")
            time.sleep(0.001)

    def wait_sysfs(self, relpath: str, predicate, timeout: float = 5.0) -> str:
        """Poll a sysfs attribute until ``predicate(value)`` holds; returns the value."""
        start = time.monotonic()
        while True:
            value = self.read_sysfs(relpath)
            if value is not None and predicate(value):
                return value
            if time.monotonic() - start > timeout:
                raise SimError(f"{relpath} is {value!r} after {timeout}s")
            time.sleep(0.001)

    def console(self) -> str:
        """The hypervisor console ring as the sysfs ``console`` attribute shows it."""
        return self.read_sysfs("console") or ""

    def kernel_log(self) -> str:
        try:
            return self.layout.kernel_log.read_text()
        except FileNotFoundError:
            return ""


def jailhouse_sim_fixture(tmp_path: Path) -> Iterator[SimBoard]:
    """Generator behind the ``jailhouse_sim`` pytest fixture."""
    with SimBoard.running(tmp_path / "sim") as sim:
        yield sim


try:
    import pytest

    jailhouse_sim = pytest.fixture(jailhouse_sim_fixture, name="jailhouse_sim")
except ImportError:  # pragma: no cover - pytest is a test-only dependency
    pass
