"""What both QEMU engines share: the QEMU process, its channels, and one guest run around it.

:mod:`.qemu` (raw images) and :mod:`.qemu_linux` (Linux cells) each build their own
command line and supervise a run their own way; everything from spawning QEMU to
telling the host how the guest ended is here, so the two behave alike. See
:mod:`.qemu` for what the process guarantees (its own process group, killed with
its parent) and how a guest's end is recognised.

Network: each of the cell's links (``spec.nics``, the taps standing in for the root's
ivshmem-net netdevs) is the guest's ``virtio-net-device`` (virtio-mmio on ``virt``: no
PCI, no option ROM, so a QEMU without ipxe-qemu runs it), on
``-netdev tap,fd=N,vhost=off`` with a duplicate of the tap made for that one start.
A real cell sees an ivshmem-net PCI device instead; a guest's driver is the difference.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import msgspec
import trio

from ..engine import GuestHost, GuestNic, GuestSpec
from ..qmp import QmpClient, QmpError, QmpEvent, ShutdownEventData

DEFAULT_RAM_MIB = 128
STDERR_TAIL_LINES = 20

_PR_SET_PDEATHSIG = 1
_INVALID_ACCESS = re.compile(rb"Invalid (read|write) at addr 0x([0-9A-Fa-f]+), size (\d+)")


class QemuEngineError(RuntimeError):
    """QEMU could not be started for a cell (one line: what, which cell, why, what to do)."""


# What ended a guest. Exactly one is reported to the host per run.
@dataclass(frozen=True)
class PoweredOff:
    """PSCI SYSTEM_OFF: the guest ended cleanly."""


@dataclass(frozen=True)
class DataAbort:
    """An access to memory the cell does not own (from QEMU's guest_errors log)."""

    address: int
    size: int
    is_write: bool

    def console_line(self) -> str:
        kind = "write" if self.is_write else "read"
        return f"Unhandled data {kind} at 0x{self.address:x}({self.size})"


@dataclass(frozen=True)
class GuestStopped:
    """The guest reset or panicked (QMP SHUTDOWN with another reason)."""

    reason: str  # QEMU's SHUTDOWN reason without "guest-": "reset", "panic"

    def console_line(self) -> str:
        if self.reason == "reset":
            return "Unhandled guest system reset request"
        return f"Guest stopped the machine ({self.reason})"


@dataclass(frozen=True)
class QemuDied:
    """QEMU exited without telling us why over QMP."""

    status: int
    qemu_says: str  # QEMU's own error line, or its last stderr line

    def console_line(self) -> str:
        detail = f": {self.qemu_says}" if self.qemu_says else ""
        return f"Guest machine exited unexpectedly (status {self.status}){detail}"


@dataclass(frozen=True)
class El2Trap:
    """The EL2 layer met a trap it does not handle and ended QEMU (see ``el2/el2.S``)."""

    exception_class: int  # ESR_EL2.EC
    forbidden: bool  # an HVC with another immediate than Jailhouse's (Jailhouse: TRAP_FORBIDDEN)

    def console_line(self) -> str:
        what = "forbidden access" if self.forbidden else "unhandled trap"
        return f"FATAL: {what} (exception class 0x{self.exception_class:02x})"


Outcome = PoweredOff | DataAbort | GuestStopped | QemuDied | El2Trap


# ---------------------------------------------------------------- the process


# Resolved in the parent: the forked child must not dlopen (another thread may
# have held the loader lock at fork time).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL this child when the forking thread dies (and if it already did)."""
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() != parent:
        os._exit(127)


class QemuProcess:
    """A running QEMU in its own process group, reaped exactly once."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._pidfd = os.pidfd_open(popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @classmethod
    def spawn(cls, argv: list[str], pass_fds: Sequence[int], stderr_fd: int, *, cell_name: str) -> QemuProcess:
        """Fork+exec QEMU from the calling (trio) thread for cell ``cell_name``.

        Raises QemuEngineError, naming the cell and the binary, if it cannot run."""
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stderr_fd,
                stderr=stderr_fd,
                pass_fds=tuple(pass_fds),
                process_group=0,
                preexec_fn=lambda parent=os.getpid(): _die_with_parent(parent),
            )
        except OSError as exc:
            raise QemuEngineError(
                f'cell "{cell_name}": cannot run {argv[0]}: {exc.strerror or exc}; '
                "install qemu-system-arm or set JAILHOUSE_SIM_QEMU"
            ) from None
        return cls(popen)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group; harmless once QEMU has exited (not yet reaped)."""
        if self._popen.returncode is None:
            try:
                os.killpg(self._popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def wait(self) -> int:
        """Wait for QEMU to exit and reap it; returns its status (-N for signal N)."""
        if self._popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            self._popen.wait()
        return self._popen.returncode

    async def kill_and_reap(self) -> None:
        """Kill and reap, even inside a cancelled scope."""
        with trio.CancelScope(shield=True):
            self.kill()
            await self.wait()
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1


class QemuChannels(NamedTuple):
    """A started QEMU and this side's ends of its UART, QMP and stderr."""

    process: QemuProcess
    uart: trio.SocketStream
    qmp: trio.SocketStream
    stderr: trio.lowlevel.FdStream


@contextmanager
def qemu_channels(spawn: Callable[[socket.socket, socket.socket, int], QemuProcess]) -> Iterator[QemuChannels]:
    """Start QEMU with ``spawn(uart, qmp, stderr_fd)`` on fresh UART and QMP socketpairs and a stderr pipe.

    QEMU's ends are closed here as soon as it holds its own copies (ours would keep
    EOF from ever arriving); this side's ends are closed when the block ends. The
    caller still kills and reaps the process.
    """
    uart_ours, uart_theirs = socket.socketpair()
    qmp_ours, qmp_theirs = socket.socketpair()
    stderr_read, stderr_write = os.pipe()
    with ExitStack() as cleanup:
        for sock in (uart_ours, uart_theirs, qmp_ours, qmp_theirs):
            cleanup.callback(sock.close)
        stderr = trio.lowlevel.FdStream(stderr_read)  # owns stderr_read from here
        cleanup.callback(stderr.close)
        try:
            process = spawn(uart_theirs, qmp_theirs, stderr_write)
        finally:
            uart_theirs.close()
            qmp_theirs.close()
            os.close(stderr_write)
        yield QemuChannels(process, trio.SocketStream(trio.socket.from_stdlib_socket(uart_ours)),
                           trio.SocketStream(trio.socket.from_stdlib_socket(qmp_ours)), stderr)


@contextmanager
def nic_fds(spec: GuestSpec) -> Iterator[list[int]]:
    """A duplicate of every NIC's tap for one QEMU start, closed when the block ends.

    QEMU's copy is closed when QEMU exits, so only the daemon's own descriptor keeps the
    tap alive between starts, and closing it removes the tap."""
    with ExitStack() as stack:
        fds = []
        for nic in spec.nics:
            fd = os.dup(nic.fd)
            stack.callback(os.close, fd)
            fds.append(fd)
        yield fds


def nic_argv(nics: Sequence[GuestNic], fds: Sequence[int]) -> list[str]:
    """QEMU options giving the guest NIC i on the tap at /dev/fd/fds[i], with its MAC."""
    argv: list[str] = []
    for index, (nic, fd) in enumerate(zip(nics, fds, strict=True)):
        argv += ["-netdev", f"tap,id=net{index},fd={fd},vhost=off",
                 "-device", f"virtio-net-device,netdev=net{index},mac={nic.mac}"]
    return argv


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` from offset 0 (short writes are continued)."""
    os.lseek(fd, 0, os.SEEK_SET)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---------------------------------------------------------------- one guest run


class _Ending:
    """The first outcome wins; later ones (e.g. the exit after a crash) are ignored."""

    def __init__(self) -> None:
        self.outcome: Outcome | None = None
        self.decided = trio.Event()

    def decide(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.decided.set()


class GuestRun:
    """The tasks around one QEMU process: UART pumps, QMP events, stderr, exit.

    ``el2_layer``: the guest runs behind the simulator's EL2 layer (:mod:`..el2`), whose
    debug-console bytes arrive on their own channel and whose fatal traps end QEMU with
    a status of its own."""

    def __init__(self, spec: GuestSpec, host: GuestHost, process: QemuProcess, *, el2_layer: bool = False) -> None:
        self.spec = spec
        self.host = host
        self.process = process
        self.el2_layer = el2_layer
        self.ending = _Ending()
        self.stderr_tail: collections.deque[bytes] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.first_cpu = spec.cpus[0] if spec.cpus else 0

    async def pump_guest_output(self, uart: trio.SocketStream) -> None:
        """PL011 → host UART, until QEMU closes its end."""
        while True:
            try:
                data = await uart.receive_some(65536)
            except trio.BrokenResourceError:
                # ECONNRESET: QEMU was killed with typed bytes still unread.
                return
            if not data:
                return
            await self.host.uart_write(data)
            self.host.count_vmexits(self.first_cpu, "mmio", len(data))

    async def pump_hv_console(self, channel: trio.SocketStream) -> None:
        """EL2 layer's debug-console channel → hypervisor console ring, until QEMU closes it.

        Every byte is one DEBUG_CONSOLE_PUTC hypercall the layer allowed; the bytes go
        to the ring exactly as the guest sent them."""
        while True:
            try:
                data = await channel.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            self.host.hv_write(data)
            self.host.count_vmexits(self.first_cpu, "hypercall", len(data))

    async def pump_guest_input(self, uart: trio.SocketStream) -> None:
        """Host UART → PL011, unchanged, until QEMU is gone."""
        while True:
            data = await self.host.uart_read()
            if not data:
                return
            try:
                await uart.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            self.host.count_vmexits(self.first_cpu, "mmio", len(data))

    async def watch_stderr(self, stderr: trio.lowlevel.FdStream) -> None:
        """Keep QEMU's last stderr lines; an invalid guest access ends the guest."""
        pending = b""
        while chunk := await stderr.receive_some(65536):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                self._note_stderr_line(line)
        if pending:
            self._note_stderr_line(pending)

    def _note_stderr_line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line:
            return
        self.stderr_tail.append(line)
        match = _INVALID_ACCESS.search(line)
        if match:
            kind, address, size = match.groups()
            self.ending.decide(DataAbort(int(address, 16), int(size), kind == b"write"))

    async def watch_events(self, qmp: QmpClient) -> None:
        """SHUTDOWN tells a guest power-off from a reset or panic."""
        async for event in qmp.events:
            outcome = _outcome_of_event(event)
            if outcome is not None:
                self.ending.decide(outcome)

    async def watch_exit(self, exited: trio.Event, qmp_done: trio.Event, stderr_done: trio.Event) -> None:
        """The only task waiting for QEMU: once it exited and its last event and stderr
        line are read, decide "died" unless something else decided first."""
        status = await self.process.wait()
        exited.set()
        await qmp_done.wait()
        await stderr_done.wait()
        if self.el2_layer:
            from ..el2 import trap_of_exit_status  # only a run that has the layer has its package

            trap = trap_of_exit_status(status)
            if trap is not None:
                self.ending.decide(El2Trap(*trap))
        self.ending.decide(QemuDied(status, self._exit_reason()))

    def _exit_reason(self) -> str:
        """QEMU's own error line (``qemu-system-aarch64: ...``) if it printed one, else its last line."""
        lines = [line.decode(errors="replace") for line in self.stderr_tail]
        own = [line for line in lines if line.startswith("qemu-system-")]
        return (own or lines or [""])[0 if own else -1]


def _outcome_of_event(event: QmpEvent) -> Outcome | None:
    """A guest-initiated SHUTDOWN ends the guest (with -no-reboot a reset is one too)."""
    if event.name != "SHUTDOWN":
        return None
    try:
        shutdown = msgspec.convert(event.data, ShutdownEventData)
    except msgspec.ValidationError:
        return None
    if not shutdown.guest:
        return None
    if shutdown.reason == "guest-shutdown":
        return PoweredOff()
    return GuestStopped(shutdown.reason.removeprefix("guest-"))


async def connect_and_resume(nursery: trio.Nursery, run: GuestRun, qmp_stream: trio.abc.Stream,
                              qmp_done: trio.Event) -> QmpClient | None:
    """Take QMP, watch its events and let the paused guest run; the client, or None
    (``qmp_done`` set) when QEMU refused its command line or died at start: watch_exit explains."""
    try:
        qmp = await QmpClient.connect(qmp_stream)
    except QmpError:
        qmp_done.set()
        return None
    nursery.start_soon(run_then_set, qmp_done, qmp.serve)
    nursery.start_soon(run.watch_events, qmp)
    try:
        await qmp.execute("cont")
    except QmpError:
        pass
    return qmp


async def run_then_set(done: trio.Event, function: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run one task and signal its end, however it ends."""
    try:
        await function(*args)
    finally:
        done.set()


def report_outcome(outcome: Outcome, spec: GuestSpec, host: GuestHost) -> None:
    """Tell the hypervisor side how the guest ended."""
    if isinstance(outcome, PoweredOff):
        host.count_vmexits(spec.cpus[0] if spec.cpus else 0, "psci")
        host.set_state("shut down")
        return
    line = outcome.console_line()
    for cpu in spec.cpus:
        host.park_cpu(cpu, line)
