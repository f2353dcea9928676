"""The per-ZIC monitor: the process whose exit status is the container's.

``runphi create`` forks it (twice, so the shim — a child subreaper — adopts it)
after the cell is created and loaded; it inherits the open console fds and the
start fifo from ``create``. Only then is trio imported, off create's path.

What it guarantees:

* it brings the cell's host side up first (``CellWatch.bring_up``: the VM process of
  a KVM cell becomes its child) and tells ``create`` on the ready pipe when that
  waits for it;
* it exits exactly once, with the DESIGN §4 status (:mod:`runphi.core.outcome`),
  after writing why to ``<container dir>/monitor-exit.json``;
* SIGTERM/SIGINT/SIGHUP/SIGQUIT become stop requests of the cell's
  :class:`~runphi.core.supervise.Supervisor` (a graceful ``cell shutdown``,
  escalating to a destroy; exit 128+N). A signal that arrives while trio is
  still being imported is not lost;
* it holds no fd it must not (no lock, no buffer pipe in tty mode): the spawn
  code closes everything but what is listed in :class:`MonitorSetup`.
"""

from __future__ import annotations

import os
import signal
import sys

import msgspec

from runphi.backends.base import BackendError, WatchSettings
from runphi.container import GRACEFUL_STOP_SIGNALS
from runphi.core.node import TOOL_TIMEOUT
from runphi.core.outcome import (
    EXIT_CRASHED,
    EXIT_VANISHED,
    MonitorExit,
    record_exit_in_container_record,
    utc_now,
    write_monitor_exit,
)

#: Signals that turn into a graceful cell shutdown (SIGKILL cannot be caught:
#: ``kill`` handles it by stopping the cell itself, then killing the monitor).
SHUTDOWN_SIGNALS = tuple(sorted(GRACEFUL_STOP_SIGNALS))

class MonitorSetup(msgspec.Struct, frozen=True):
    """Everything the monitor needs, handed over in memory across the fork."""

    container_id: str
    container_dir: str
    cell_name: str
    #: Which backend watches the cell, how, and at what pace.
    watch: WatchSettings
    tool_timeout: float = TOOL_TIMEOUT
    #: Read end (opened read-write) of the start fifo; ``start`` writes one byte.
    start_fd: int = -1
    #: Console source fd (UART), or -1 when the cell has no console.
    console_fd: int = -1
    #: ``LaunchedCell.console_kind``: "uart" or "hypervisor".
    console_kind: str = "uart"
    #: pty slave for terminal mode, or -1: then the pumps use fds 0 and 1.
    terminal_fd: int = -1
    #: The cell's host-side fds for its watch (``LaunchedCell.host_fds``).
    host_fds: tuple[int, ...] = ()
    #: Write end of the pipe on which the monitor tells ``create`` its cell came up
    #: ("ok", or "error <line>"); -1 when ``create`` does not wait for that.
    ready_fd: int = -1
    #: runc's `--log` of the create that made us ("" = do not log: our stderr may be
    #: the container's), its format and level.
    log_path: str = ""
    log_format: str = "json"
    log_level: str = "info"


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
                code=code, reason=f"monitor error: {type(exc).__name__}: {exc}", time=utc_now()))
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
        except Exception:
            pass
        os._exit(code)


async def _supervise(setup: MonitorSetup, early: list[int]) -> MonitorExit:
    """Run the cell's :class:`~runphi.core.supervise.Supervisor`, fed by this process's signals."""
    import trio

    from runphi.backends.registry import open_cell_watch
    from runphi.core.supervise import Supervisor

    cell = open_cell_watch(setup.watch.backend, setup.watch.backend_config, setup.cell_name,
                           setup.tool_timeout, setup.host_fds)
    _bring_up(cell, setup.ready_fd)
    supervisor = Supervisor(cell, setup.watch, start_fd=setup.start_fd, console=_console_tasks(setup))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_forward_signals, supervisor, early)
        outcome = await supervisor.run()
        nursery.cancel_scope.cancel()
    return outcome


def _bring_up(cell, ready_fd: int) -> None:
    """Bring the cell up in this process and tell ``create`` how it went (when it waits)."""
    try:
        cell.bring_up()
    except BackendError as exc:
        _tell_create(ready_fd, f"error {exc}")
        raise
    _tell_create(ready_fd, "ok")


def _tell_create(ready_fd: int, answer: str) -> None:
    if ready_fd < 0:
        return
    try:
        os.write(ready_fd, answer.encode(errors="replace"))
    except OSError:
        pass  # create gave up waiting: it undoes the launch and kills us
    finally:
        os.close(ready_fd)


async def _forward_signals(supervisor, early: list[int]) -> None:
    """Every shutdown signal, those caught while trio was imported first, becomes a stop request."""
    import trio

    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as receiver:
        # Read only now: a signal is either in `early` or queued for the receiver.
        for signum in early:
            supervisor.stop(signum)
        async for signum in receiver:
            supervisor.stop(signum)


def _console_tasks(setup: MonitorSetup):
    """The console pump group for this container, or None without a console."""
    if setup.console_fd < 0:
        return None
    from runphi.monitor_console import ConsoleTasks

    terminal = setup.terminal_fd >= 0
    return ConsoleTasks(console_fd=setup.console_fd, output_fd=setup.terminal_fd if terminal else 1,
                        input_fd=setup.terminal_fd if terminal else 0, log_dir=setup.container_dir,
                        kind=setup.console_kind, cell_name=setup.cell_name)


# ---- spawning: used by create (synchronous, no trio) ------------------------

#: How long ``create`` waits for a monitor to bring its cell up (seconds).
BRING_UP_TIMEOUT = 60.0


class SpawnedMonitor:
    """A monitor just forked by ``create``: its pid, and the pipe on which it reports its cell up."""

    def __init__(self, pid: int, ready_fd: int) -> None:
        self.pid = pid
        self._ready_fd = ready_fd

    def wait_until_ready(self, timeout: float = BRING_UP_TIMEOUT) -> None:
        """Return once the monitor brought its cell up (at once when its backend has nothing
        to bring up); BackendError with the monitor's reason when it could not."""
        if self._ready_fd < 0:
            return
        import select

        answer, ended = b"", False
        try:
            poller = select.poll()
            poller.register(self._ready_fd, select.POLLIN)
            deadline = _now() + timeout
            while not ended and (left := deadline - _now()) > 0 and poller.poll(left * 1000):
                chunk = os.read(self._ready_fd, 4096)
                ended = not chunk
                answer += chunk
        finally:
            os.close(self._ready_fd)
            self._ready_fd = -1
        text = answer.decode(errors="replace")
        if text == "ok":
            return
        if text.startswith("error "):
            raise BackendError(text.removeprefix("error "))
        if text:
            raise BackendError(f"its monitor answered {text!r} instead of bringing the cell up")
        raise BackendError("its monitor exited before bringing the cell up (see its log)" if ended
                           else f"its monitor did not bring the cell up within {timeout:.0f} s")


def _now() -> float:
    import time

    return time.monotonic()


def spawn_monitor(setup: MonitorSetup, stdio: tuple[int, int, int], keep: list[int]) -> SpawnedMonitor:
    """Double-fork the monitor and return it once it exists.

    The intermediate child exits at once, so the monitor is re-parented to the
    nearest child subreaper (the shim). In the monitor: new session, ``stdio``
    dup'ed over 0/1/2, every other fd closed except ``keep`` (and the ready pipe when
    ``setup.watch.owner_brings_up``).
    """
    ready_read, ready_write = os.pipe() if setup.watch.owner_brings_up else (-1, -1)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            grandchild = os.fork()
            if grandchild == 0:
                os.close(write_end)
                if ready_read >= 0:
                    os.close(ready_read)
                    setup = msgspec.structs.replace(setup, ready_fd=ready_write)
                    keep = [*keep, ready_write]
                _become_monitor(setup, stdio, keep)
            os.write(write_end, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    if ready_write >= 0:
        os.close(ready_write)
    try:
        data = b""
        while chunk := os.read(read_end, 32):
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
    if not data:
        if ready_read >= 0:
            os.close(ready_read)
        raise OSError("the monitor process could not be forked")
    return SpawnedMonitor(int(data), ready_read)


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
