"""Harness for ZIC lifecycle tests: a simulated board, ZIC bundles, the real `runphi` CLI.

The test process plays containerd's shim: it is a child subreaper, so the
monitor that ``runphi create`` double-forks is re-parented to it and its exit
status is observed exactly as the shim observes it (``waitpid`` on the pid
from ``--pid-file``). This module holds fixtures and helpers only (no tests).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36
RUNPHI = Path(sys.executable).parent / "runphi"
JAILHOUSE_SIM = Path(sys.executable).parent / "jailhouse-sim"


def become_subreaper() -> None:
    """Make this process adopt orphaned descendants, as containerd's shim does."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def guest_script(*lines: str) -> bytes:
    """A script-engine guest image (see tools/jailhouse_sim)."""
    return ("#!jailhouse-sim-inmate\n" + "\n".join(lines) + "\n").encode()


class Board:
    """One simulated Jailhouse board, its daemon a direct child of the test process
    (``tools.jailhouse_sim.testing.SimBoard``), reaped on teardown."""

    def __init__(self, root: Path, engine: str = "script", model: str = "sim-qemu-arm64",
                 netns: str | None = None) -> None:
        self.root = root
        self.engine = engine
        #: The network namespace (a /run/netns name) the daemon, its taps and runphi run in.
        self.netns = netns
        #: The simulator's board description (``jailhouse-sim --board``).
        self.model = model
        self.tool = root / "bin" / "jailhouse"
        self.sysfs = root / "sys" / "devices" / "jailhouse"
        self.sim = None

    def up(self) -> None:
        from tools.jailhouse_sim.testing import SimBoard

        self.sim = SimBoard.start(self.root, board=self.model, engine=self.engine, netns=self.netns)

    def down(self) -> None:
        if self.sim is not None:
            self.sim.stop()
            self.sim = None

    def kill(self) -> None:
        """SIGKILL the daemon: the board vanishes under its cells."""
        self.sim.kill()

    def inject(self, *args: str) -> None:
        """`jailhouse-sim inject` with the CLI's flags (`--op`, `--errno`, `--count`, `--clear`)."""
        subprocess.run([str(JAILHOUSE_SIM), "inject", "--root", str(self.root), *args], check=True,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=30)

    def jailhouse(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.tool), *args], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)

    def cells(self) -> dict[str, str]:
        """Non-root cells: name → state, read from sysfs."""
        out = {}
        for entry in sorted((self.sysfs / "cells").iterdir()):
            if entry.name == "0":
                continue
            try:
                out[(entry / "name").read_text().strip()] = (entry / "state").read_text().strip()
            except FileNotFoundError:
                continue
        return out

    def cell_state(self, name: str) -> str | None:
        return self.cells().get(name)


class Zic:
    """The runphi CLI bound to one state root, board and node state dir."""

    def __init__(self, board: Board, base: Path) -> None:
        self.board = board
        self.base = base
        self.root = base / "root"
        self.node = base / "node"
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({
            "RUNPHI_CONFIG": str(self._config_file()),
            "RUNPHI_BACKEND": "jailhouse",
            "RUNPHI_JAILHOUSE": str(board.tool),
            "RUNPHI_SYSFS": str(board.sysfs),
            "RUNPHI_PLATFORM": "sim-qemu-arm64",
            "RUNPHI_STATE_DIR": str(self.node),
        })
        self.monitors: list[int] = []
        #: runphi runs in the board's network namespace, as on a board it runs in the root cell's.
        self.prefix: tuple[str, ...] = ("nsenter", f"--net=/run/netns/{board.netns}") if board.netns else ()

    def _config_file(self) -> Path:
        path = self.base / "runphi.toml"
        path.write_text('backend = "jailhouse"\n\n[jailhouse]\npoll_interval_ms = 20\n')
        return path

    def bundle(self, name: str, guest: bytes, *, terminal: bool = False, hooks: dict | None = None,
               boot: dict | None = None, annotations: dict | None = None) -> Path:
        """Write a ZIC bundle: config.json + rootfs/boot/{config.json,boot.bin}."""
        bundle = self.base / "bundles" / name
        (bundle / "rootfs" / "boot").mkdir(parents=True, exist_ok=True)
        description = {"os_var": "baremetal", "inmate": "/boot/boot.bin",
                       "starting_vaddress": "0x70000000", "memory": 16}
        description.update(boot or {})
        (bundle / "rootfs" / "boot" / "config.json").write_text(json.dumps(description))
        (bundle / "rootfs" / "boot" / "boot.bin").write_bytes(guest)
        config = {"ociVersion": "1.0.2", "process": {"terminal": terminal, "args": ["/boot/boot.bin"],
                                                     "cwd": "/"},
                  "root": {"path": "rootfs"}, "annotations": {"org.runphi.runtime": "runphi",
                                                              **(annotations or {})}}
        if hooks:
            config["hooks"] = hooks
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle

    def run(self, *args: str, check: bool = False, timeout: float = 60,
            stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
        """Run `runphi --root R ARGS` (see :func:`run_runphi`)."""
        return run_runphi(self.root, args, self.env, self.logs, check=check, timeout=timeout, stdin=stdin,
                          prefix=self.prefix)

    def create(self, cid: str, bundle: Path, *extra: str, check: bool = True) -> int:
        """`runphi create`; returns the pid from the pid file (the monitor)."""
        pid_file = self.base / f"{cid}.pid"
        pid_file.unlink(missing_ok=True)
        result = self.run("create", "--bundle", str(bundle), "--pid-file", str(pid_file), *extra, cid,
                          check=check)
        if result.returncode != 0:
            return -1
        text = pid_file.read_text()
        assert text == text.strip() and text.isdigit(), f"pid file {text!r} is not a bare decimal"
        pid = int(text)
        self.monitors.append(pid)
        return pid

    def state(self, cid: str) -> dict:
        result = self.run("state", cid, check=True)
        return json.loads(result.stdout)

    def status(self, cid: str) -> str:
        return self.state(cid)["status"]


def run_runphi(root: Path, args, env: dict[str, str], logs: Path, *, check: bool = False,
               timeout: float = 60, stdin=subprocess.DEVNULL, prefix: tuple[str, ...] = ()
               ) -> subprocess.CompletedProcess[str]:
    """Run `[PREFIX...] runphi --root ROOT ARGS`; stdout/stderr go through files in ``logs``,
    never pipes a monitor could inherit and keep open. With ``check``, a failure raises."""
    with tempfile.TemporaryFile(dir=logs) as out, tempfile.TemporaryFile(dir=logs) as err:
        proc = subprocess.run([*prefix, str(RUNPHI), "--root", str(root), *args], stdout=out, stderr=err,
                              stdin=stdin, env=env, timeout=timeout)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read().decode(errors="replace"),
                                             err.read().decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"runphi {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def wait_exit(pid: int, timeout: float = 20.0) -> int:
    """Reap `pid` (our adopted child) and return its status the way the shim computes it.

    Waits on a pidfd (readable once the process has exited), then reaps it.
    """
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None  # already reaped by someone else: waitpid below says so
    if pidfd is not None:
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not ready:
            raise AssertionError(f"process {pid} did not exit within {timeout} s")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def live_children(parent: int) -> list[int]:
    """PIDs of the processes whose parent is ``parent`` and that have not exited (no zombies), sorted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return sorted(found)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll a file-backed observation (sysfs, /proc, state dir) until true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def reap_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


@contextmanager
def board_running(root: Path, engine: str = "script", model: str = "sim-qemu-arm64",
                  netns: str | None = None) -> Iterator[Board]:
    """A board up at ``root`` for the with-block; on leaving it the daemon is stopped and reaped."""
    board = Board(root, engine=engine, model=model, netns=netns)
    board.up()
    try:
        yield board
    finally:
        board.down()


@contextmanager
def board_in_tempdir(prefix: str = "rphi-sim-", engine: str = "script",
                     model: str = "sim-qemu-arm64", netns: str | None = None) -> Iterator[Board]:
    """:func:`board_running` in a fresh short temporary directory, removed afterwards.

    Short because the board's UART sockets live under it (108-byte unix path limit).
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with board_running(base / "sim", engine=engine, model=model, netns=netns) as board:
            yield board
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def subreaper() -> None:
    become_subreaper()


@pytest.fixture(scope="module")
def board(subreaper) -> Iterator[Board]:
    with board_in_tempdir() as sim:
        yield sim


@contextmanager
def zic_on(board: Board, base: Path, env: dict[str, str] | None = None) -> Iterator[Zic]:
    """The runphi CLI on ``board`` (its environment plus ``env``) for the with-block; afterwards
    the board is left clean for the next test: every container force-deleted, every monitor
    reaped, every cell destroyed."""
    z = Zic(board, base)
    z.env.update(env or {})
    try:
        yield z
    finally:
        for cid in list(_ids(z)):
            z.run("delete", "--force", cid)
        reap_all(z.monitors)
        for name in board.cells():
            board.jailhouse("cell", "destroy", "--name", name)


@pytest.fixture
def zic(board: Board, tmp_path: Path) -> Iterator[Zic]:
    with zic_on(board, tmp_path) as z:
        yield z


def _ids(z: Zic) -> list[str]:
    if not z.root.is_dir():
        return []
    return [p.name for p in z.root.iterdir() if p.is_dir()]
