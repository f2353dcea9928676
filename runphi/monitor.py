"""The per-ZIC monitor: the process whose exit status is the container's.

``runphi create`` forks it (twice, so the shim — a child subreaper — adopts it)
after the cell is created and loaded; it inherits the open console fds and the
start fifo from ``create``. Only then is trio imported, off create's path.

What it guarantees:

* it exits exactly once, with the DESIGN §4 status, after writing why to
  ``<container dir>/monitor-exit.json`` (:class:`MonitorExit`):

  ====================================================  ======
  the guest shut itself down (`shut down` unrequested)   0
  ``kill`` with signal N caused the shutdown             128+N
  the cell `failed` or reports `Comm ABI mismatch`       139
  the cell vanished / the hypervisor is unreachable      255
  ====================================================  ======

* SIGTERM/SIGINT/SIGHUP/SIGQUIT request a graceful ``cell shutdown``; if the
  cell is not down within the shutdown deadline it is destroyed, and the monitor
  exits 128+N once the cell is down. A signal that arrives while trio is still
  being imported is not lost.
* it holds no fd it must not (no lock, no buffer pipe in tty mode): the spawn
  code closes everything but what is listed in :class:`MonitorSetup`.
* every long-running activity is a task of one nursery; the cell watcher
  decides the end and cancels the rest.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import msgspec

from runphi.backends.base import CellState, CellStatus, CellWatch
from runphi.container import GRACEFUL_STOP_SIGNALS

#: Signals that turn into a graceful cell shutdown (SIGKILL cannot be caught:
#: ``kill`` handles it by stopping the cell itself, then killing the monitor).
SHUTDOWN_SIGNALS = tuple(sorted(GRACEFUL_STOP_SIGNALS))

EXIT_SELF_SHUTDOWN = 0
EXIT_CRASHED = 139
EXIT_VANISHED = 255

MONITOR_EXIT_FILE = "monitor-exit.json"


class MonitorSetup(msgspec.Struct, frozen=True):
    """Everything the monitor needs, handed over in memory across the fork."""

    container_id: str
    container_dir: str
    cell_name: str
    #: Which backend's `watch` module makes the CellWatch, and its settings
    #: (Jailhouse: `tool`, `sysfs`).
    backend: str
    backend_config: dict[str, str]
    poll_interval: float = 0.05
    shutdown_timeout: float = 10.0
    tool_timeout: float = 10.0
    #: How often to check that the hypervisor still answers (seconds).
    probe_interval: float = 2.0
    #: Read end (opened read-write) of the start fifo; ``start`` writes one byte.
    start_fd: int = -1
    #: Console source fd (UART), or -1 when the cell has no console.
    console_fd: int = -1
    #: pty slave for terminal mode, or -1: then the pumps use fds 0 and 1.
    terminal_fd: int = -1
    #: runc's `--log` of the create that made us ("" = do not log: our stderr may be
    #: the container's), its format and level.
    log_path: str = ""
    log_format: str = "json"
    log_level: str = "info"


class MonitorExit(msgspec.Struct, frozen=True):
    """Why the monitor ended (written just before it exits)."""

    code: int
    reason: str
    signal: int | None = None
    cell_state: str | None = None
    time: str = ""
    dropped_console_bytes: int = 0


def decide_exit(status: CellStatus, *, available: bool, started: bool,
                signal_number: int | None) -> tuple[int, str] | None:
    """The DESIGN §4 exit status for what the cell looks like now, or None to keep watching.

    ``available`` is False when the hypervisor cannot be asked at all.
    """
    state = status.state
    if not available:
        return EXIT_VANISHED, "the hypervisor is unreachable"
    if state is CellState.FAILED:
        return EXIT_CRASHED, f"the cell is `{status.detail or state.value}`"
    if signal_number is not None and state in (CellState.GONE, CellState.SHUT_DOWN):
        name = signal.Signals(signal_number).name
        return 128 + signal_number, f"stopped by {name}"
    if state is CellState.GONE:
        return EXIT_VANISHED, "the cell vanished (destroyed outside runphi)"
    if state is CellState.SHUT_DOWN and started:
        return EXIT_SELF_SHUTDOWN, "the guest shut itself down"
    return None


def write_monitor_exit(container_dir: str | os.PathLike[str], outcome: MonitorExit) -> None:
    """Atomically record `outcome` (temp file + fsync + rename)."""
    final = Path(container_dir, MONITOR_EXIT_FILE)
    temp = final.with_name(f".{final.name}.{os.getpid()}")
    with open(temp, "wb") as out:
        out.write(msgspec.json.encode(outcome))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, final)


def record_exit_in_container_record(container_dir: str, outcome: MonitorExit, wait: float = 1.0) -> bool:
    """Copy the exit code and reason into the container record, under its lock.

    Never blocks on the lock for long: a verb holding it (``kill``, ``delete``)
    may be about to kill this process. Returns False when the record could not
    be updated; `monitor-exit.json` still says why.
    """
    import fcntl

    from runphi.store import LOCK_NAME, Store

    directory = Path(container_dir)
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)  # the lock is the thing polled, against a deadline
        store = Store(directory.parent)
        try:
            record = store.read(directory.name)
        except Exception:
            return False
        cell = msgspec.structs.replace(record.cell, exit_code=outcome.code, exit_reason=outcome.reason)
        status = "stopped" if record.status in ("created", "running") else record.status
        try:
            store.write(msgspec.structs.replace(record, cell=cell, status=status))
        except Exception:
            return False
        return True
    finally:
        os.close(fd)


def _log_exit(setup: MonitorSetup, outcome: MonitorExit) -> None:
    """One line in the container's runtime log saying how it ended (never raises)."""
    if not setup.log_path:
        return
    try:
        from runphi.log import get_logger

        log = get_logger(setup.log_path, setup.log_format, setup.log_level, id=setup.container_id)
        crashed = outcome.code in (EXIT_CRASHED, EXIT_VANISHED)
        log.msg(f"container {setup.container_id} exited with status {outcome.code}: {outcome.reason}",
                _level="warn" if crashed else "info", cell_state=outcome.cell_state or "")
        if outcome.dropped_console_bytes:
            log.msg(f"container {setup.container_id}: {outcome.dropped_console_bytes} console bytes "
                    "were dropped because nobody read the output fast enough", _level="warn")
    except Exception:
        pass


def _utc_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat()


# ---- the process side: called in the forked child, never returns ----------

def run_monitor(setup: MonitorSetup) -> None:
    """Become the monitor: catch early signals, import trio, supervise, exit."""
    early: list[int] = []

    def remember(signum: int, _frame: object) -> None:
        early.append(signum)

    for sig in SHUTDOWN_SIGNALS:
        signal.signal(sig, remember)
    code = EXIT_VANISHED
    try:
        import trio

        outcome = trio.run(_supervise, setup, early)
        code = outcome.code
        write_monitor_exit(setup.container_dir, outcome)
        record_exit_in_container_record(setup.container_dir, outcome)
        _log_exit(setup, outcome)
    except BaseException as exc:  # the monitor must always leave a reason and a status
        try:
            write_monitor_exit(setup.container_dir, MonitorExit(
                code=code, reason=f"monitor error: {type(exc).__name__}: {exc}", time=_utc_now()))
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
        except Exception:
            pass
        os._exit(code)


class _Watch:
    """What the monitor's tasks share."""

    def __init__(self) -> None:
        import trio

        self.started = trio.Event()
        self.signal_number: int | None = None
        self.unreachable = False


async def _supervise(setup: MonitorSetup, early: list[int]) -> MonitorExit:
    import trio

    from runphi.backends.registry import open_cell_watch

    cell = open_cell_watch(setup.backend, setup.backend_config, setup.cell_name, setup.tool_timeout)
    watch = _Watch()
    outcome: MonitorExit | None = None
    console = _console_tasks(setup)
    dropped = 0
    async with trio.open_nursery() as outer:
        if console is not None:
            await outer.start(console.run)
        async with trio.open_nursery() as nursery:
            if setup.start_fd >= 0:
                nursery.start_soon(_wait_for_start, setup.start_fd, watch)
            nursery.start_soon(_handle_signals, setup, cell, watch, early)
            nursery.start_soon(_probe_backend, setup, cell, watch)

            async def decide() -> None:
                nonlocal outcome
                outcome = await _watch_cell(setup, cell, watch)
                nursery.cancel_scope.cancel()

            nursery.start_soon(decide)
        if console is not None:
            dropped = await console.drain()
        outer.cancel_scope.cancel()
    assert outcome is not None
    return msgspec.structs.replace(outcome, time=_utc_now(), dropped_console_bytes=dropped)


async def _wait_for_start(fd: int, watch: _Watch) -> None:
    """Set `started` once ``runphi start`` has started the cell and written its byte."""
    import trio

    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            if os.read(fd, 64):
                watch.started.set()
                return
        except BlockingIOError:
            continue


async def _handle_signals(setup: MonitorSetup, cell: CellWatch, watch: _Watch, early: list[int]) -> None:
    """Turn the first shutdown signal into a graceful cell shutdown, escalating to destroy."""
    import trio

    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as receiver:
        if not early:
            async for signum in receiver:
                early.append(signum)
                break
        watch.signal_number = early[0]
        await _stop_cell(setup, cell)
        # Further signals change nothing: the first one decides the exit status.
        async for _ in receiver:
            pass


async def _stop_cell(setup: MonitorSetup, cell: CellWatch) -> None:
    """Graceful shutdown until it works or the deadline passes, then destroy."""
    import trio

    with trio.move_on_after(setup.shutdown_timeout):
        while not await cell.request_shutdown():
            await trio.sleep(setup.poll_interval)  # the cell refused: ask again
        return
    # Forced: the guest did not stop in time, so the cell is destroyed. If even
    # that is refused, keep asking; the watcher keeps the monitor (and so the
    # container) alive while the cell runs, and `kill KILL` remains.
    while not await cell.force_destroy():
        await trio.sleep(max(setup.poll_interval, 0.2))


async def _probe_backend(setup: MonitorSetup, cell: CellWatch, watch: _Watch) -> None:
    """Every probe interval, check the hypervisor still answers (see CellWatch.reachable)."""
    import trio

    while True:
        await trio.sleep(setup.probe_interval)
        if not await cell.reachable():
            watch.unreachable = True


async def _watch_cell(setup: MonitorSetup, cell: CellWatch, watch: _Watch) -> MonitorExit:
    """Poll the cell state until it decides the exit status."""
    import trio

    shut_down_seen = False
    while True:
        available, status = cell.read_state()
        available = available and not watch.unreachable
        if status.state is CellState.RUNNING:
            watch.started.set()  # the cell runs, whatever the fifo says
        decision = decide_exit(status, available=available, started=watch.started.is_set(),
                               signal_number=watch.signal_number)
        if decision is not None and decision[0] == EXIT_SELF_SHUTDOWN and not shut_down_seen:
            # A destroy also passes through `shut down` just before the cell disappears:
            # only a cell still there one poll later really shut itself down.
            shut_down_seen = True
        elif decision is not None:
            code, reason = decision
            return MonitorExit(code=code, reason=reason, signal=watch.signal_number, cell_state=status.detail)
        else:
            shut_down_seen = False
        await trio.sleep(setup.poll_interval)  # sysfs offers no change notification


def _console_tasks(setup: MonitorSetup):
    """The console pump group for this container, or None without a console (see #7 wiring)."""
    if setup.console_fd < 0:
        return None
    from runphi.monitor_console import ConsoleTasks

    return ConsoleTasks(setup)


# ---- spawning: used by create (synchronous, no trio) ------------------------

def spawn_monitor(setup: MonitorSetup, stdio: tuple[int, int, int], keep: list[int]) -> int:
    """Double-fork the monitor and return its pid once it exists.

    The intermediate child exits at once, so the monitor is re-parented to the
    nearest child subreaper (the shim). In the monitor: new session, ``stdio``
    dup'ed over 0/1/2, every other fd closed except ``keep``.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            grandchild = os.fork()
            if grandchild == 0:
                os.close(write_end)
                _become_monitor(setup, stdio, keep)
            os.write(write_end, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = b""
        while chunk := os.read(read_end, 32):
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    if not data:
        raise OSError("the monitor process could not be forked")
    return int(data)


def _become_monitor(setup: MonitorSetup, stdio: tuple[int, int, int], keep: list[int]) -> None:
    try:
        os.setsid()
        os.chdir("/")  # pin no directory (the bundle, its rootfs mount) while we live
        for target, fd in enumerate(stdio):
            if fd != target:
                os.dup2(fd, target)
        _close_all_but({0, 1, 2, *keep})
        run_monitor(setup)
    finally:
        os._exit(EXIT_VANISHED)


def _close_all_but(keep: set[int]) -> None:
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = list(range(3, 1024))
    for fd in open_fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
