"""The QEMU guest engine: a cell's real aarch64 machine code under qemu-system-aarch64.

One cell start is one QEMU process (``-M virt,gic-version=3 -cpu cortex-a53`` by
default), started paused (``-S``):

* every loaded image is placed at its guest address with
  ``-device loader,file=/dev/fd/N,addr=...,force-raw=on`` (the bytes live in a
  memfd, so nothing is left on disk), and the first CPU starts at the cell's
  reset address (``-device loader,addr=<reset>,cpu-num=0``); ``-smp`` is the
  number of cell CPUs (secondaries wait powered off for PSCI CPU_ON);
* QEMU's PL011 (guest 0x09000000 on ``virt``) and QMP each talk over one end of
  a socketpair passed as ``-chardev socket,fd=N``; the engine pumps UART bytes
  between the PL011 and the host's UART unchanged and resumes the VM (QMP
  ``cont``) only once both are wired, so no byte is lost;
* ``-no-reboot -d guest_errors``: a guest power-off (PSCI SYSTEM_OFF) arrives as
  the QMP event ``SHUTDOWN`` reason ``guest-shutdown`` and the cell becomes
  ``shut down``; a store/load to unassigned memory shows on QEMU's stderr as
  ``Invalid write at addr 0x..., size N`` and parks every CPU of the cell
  (``Unhandled data write at 0x...(N)``), so the cell is ``failed``; a guest
  reset or panic, or QEMU dying by itself, also parks the CPUs.

Memory: QEMU ``virt`` has RAM only from 0x40000000; below that are flash and
devices. ``-m`` covers every non-I/O cell region that lies at or above
0x40000000 (and every image there). Regions below 0x40000000 (Jailhouse's 64 KiB
"low RAM" at guest 0) cannot be RAM on this machine: an image placed there lands
in the virt flash (fetchable, not writable), so guests for this engine must keep
code, data and stack at or above 0x40000000, as the inmates in ``tools/inmates``
(linked at 0x70000000) and the Zephyr Jailhouse-on-QEMU build do.

Linux cells (``spec.linux``, from ``cell linux``) are refused with a
QemuEngineError: this engine boots raw images only.

UART address: the guest always sees QEMU's single PL011 at 0x09000000, whatever
UART address the board gives the cell; the bytes go to that cell's UART pty.

Statistics are approximate: every UART byte in or out counts as one ``mmio``
exit on the cell's first CPU and a power-off as one ``psci`` exit. QEMU does
not trap like Jailhouse does, so these are plausible numbers, not measurements.

QEMU never outlives its engine: it runs in its own process group that is
SIGKILLed and reaped when ``run`` is cancelled, and with PR_SET_PDEATHSIG(SIGKILL)
so that the kernel kills it if the process hosting the engine dies. The process
is forked from the trio thread itself (not trio's worker threads: the death
signal follows the forking *thread*, and worker threads exit when idle).

Configuration (all optional): ``QemuEngine(binary=..., machine=..., cpu=...)``,
environment ``JAILHOUSE_SIM_QEMU`` (binary), and per cell ``spec.extra`` keys
``qemu_machine`` / ``qemu_cpu`` (a board may pick another machine or core).
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
from typing import NamedTuple
from dataclasses import dataclass

import msgspec
import trio

from ..engine import GuestHost, GuestSpec, LoadedImage
from ..qmp import QmpClient, QmpError, QmpEvent, ShutdownEventData

DEFAULT_BINARY = "qemu-system-aarch64"
DEFAULT_MACHINE = "virt,gic-version=3"
DEFAULT_CPU = "cortex-a53"
VIRT_RAM_BASE = 0x4000_0000
MIN_RAM_MIB = 16
DEFAULT_RAM_MIB = 128
MEM_IO = 0x0010
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


Outcome = PoweredOff | DataAbort | GuestStopped | QemuDied


# ---------------------------------------------------------------- command line


def paint_images(images: Sequence[LoadedImage]) -> tuple[LoadedImage, ...]:
    """The guest memory the loads leave behind, as non-overlapping images sorted by address.

    ``cell load`` writes into cell RAM, so a later image overwrites an earlier one
    where they overlap (a reload after ``cell shutdown`` lands on the old bytes);
    QEMU's loader refuses overlapping images, so they are resolved here."""
    painted: list[tuple[int, bytes]] = []
    for image in images:
        if not image.data:
            continue
        start, end = image.address, image.address + len(image.data)
        kept: list[tuple[int, bytes]] = []
        for address, data in painted:
            # Keep what sticks out on either side of the new image.
            if address < start:
                kept.append((address, data[: start - address]))
            if address + len(data) > end:
                cut = max(0, end - address)
                kept.append((address + cut, data[cut:]))
        painted = [(a, d) for a, d in kept if d] + [(start, image.data)]
    return tuple(LoadedImage(address, data) for address, data in sorted(painted))


def ram_mib(spec: GuestSpec) -> int:
    """MiB of QEMU RAM (from 0x40000000) covering every RAM region and image at or above it."""
    top = VIRT_RAM_BASE
    for region in spec.ram:
        if region.flags & MEM_IO or region.size == 0:
            continue
        top = max(top, region.guest_address + region.size)
    for image in spec.images:
        top = max(top, image.address + len(image.data))
    if top == VIRT_RAM_BASE:
        return DEFAULT_RAM_MIB
    return max(MIN_RAM_MIB, -(-(top - VIRT_RAM_BASE) // (1 << 20)))


def qemu_argv(
    spec: GuestSpec,
    *,
    binary: str,
    machine: str,
    cpu: str,
    image_fds: Sequence[int],
    uart_fd: int,
    qmp_fd: int,
) -> list[str]:
    """The QEMU command line for one cell; painted image i is read from /dev/fd/image_fds[i]."""
    argv = [
        binary,
        "-M", machine,
        "-cpu", cpu,
        "-smp", str(max(1, len(spec.cpus))),
        "-m", f"{ram_mib(spec)}M",
        "-nodefaults", "-display", "none",
        "-no-reboot", "-S",
        "-d", "guest_errors",
        "-chardev", f"socket,id=uart,fd={uart_fd}",
        "-serial", "chardev:uart",
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    for image, fd in zip(paint_images(spec.images), image_fds, strict=True):
        argv += ["-device", f"loader,file=/dev/fd/{fd},addr={image.address:#x},force-raw=on"]
    if spec.reset_address != 0:
        # QEMU's loader rejects addr=0 without a file; a firmware-less virt CPU resets to 0 anyway.
        argv += ["-device", f"loader,addr={spec.reset_address:#x},cpu-num=0"]
    return argv


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
def _image_memfds(spec: GuestSpec) -> Iterator[list[int]]:
    """One memfd per painted image (see paint_images) holding its bytes, closed on exit."""
    with ExitStack() as stack:
        fds = []
        for index, image in enumerate(paint_images(spec.images)):
            fd = os.memfd_create(f"cell-{spec.cell_id}-image-{index}")
            stack.callback(os.close, fd)
            _write_all(fd, image.data)
            fds.append(fd)
        yield fds


def _write_all(fd: int, data: bytes) -> None:
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


class _GuestRun:
    """The tasks around one QEMU process: UART pumps, QMP events, stderr, exit."""

    def __init__(self, spec: GuestSpec, host: GuestHost, process: QemuProcess) -> None:
        self.spec = spec
        self.host = host
        self.process = process
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


async def _connect_and_resume(nursery: trio.Nursery, run: _GuestRun, qmp_stream: trio.abc.Stream,
                              qmp_done: trio.Event) -> QmpClient | None:
    """Take QMP, watch its events and let the paused guest run; the client, or None
    (``qmp_done`` set) when QEMU refused its command line or died at start: watch_exit explains."""
    try:
        qmp = await QmpClient.connect(qmp_stream)
    except QmpError:
        qmp_done.set()
        return None
    nursery.start_soon(_run_then_set, qmp_done, qmp.serve)
    nursery.start_soon(run.watch_events, qmp)
    try:
        await qmp.execute("cont")
    except QmpError:
        pass
    return qmp


async def _run_then_set(done: trio.Event, function: Callable[..., Awaitable[object]], *args: object) -> None:
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


class QemuEngine:
    """Runs a cell's images under qemu-system-aarch64 (see the module docstring)."""

    name = "qemu"

    def __init__(self, binary: str | None = None, machine: str | None = None, cpu: str | None = None) -> None:
        self.binary = binary or os.environ.get("JAILHOUSE_SIM_QEMU") or DEFAULT_BINARY
        self.machine = machine or DEFAULT_MACHINE
        self.cpu = cpu or DEFAULT_CPU

    async def run(self, spec: GuestSpec, host: GuestHost) -> None:
        """Boot the cell under QEMU and return once the guest ended and the host was told how.

        On cancellation QEMU is killed and reaped before the cancellation propagates.
        Raises QemuEngineError if QEMU cannot be started at all."""
        if spec.linux is not None:
            from .qemu_linux import run_linux_guest

            await run_linux_guest(self, spec, host)
            return
        with qemu_channels(lambda uart, qmp, stderr_fd: self._spawn(spec, uart, qmp, stderr_fd)) as channels:
            try:
                outcome = await self._supervise(spec, host, channels.process, channels.uart, channels.qmp,
                                                channels.stderr)
            finally:
                await channels.process.kill_and_reap()
        report_outcome(outcome, spec, host)

    def _spawn(self, spec: GuestSpec, uart: socket.socket, qmp: socket.socket, stderr_fd: int) -> QemuProcess:
        machine = spec.extra.get("qemu_machine", self.machine)
        cpu = spec.extra.get("qemu_cpu", self.cpu)
        with _image_memfds(spec) as image_fds:
            argv = qemu_argv(
                spec,
                binary=self.binary,
                machine=machine,
                cpu=cpu,
                image_fds=image_fds,
                uart_fd=uart.fileno(),
                qmp_fd=qmp.fileno(),
            )
            return QemuProcess.spawn(argv, [*image_fds, uart.fileno(), qmp.fileno()], stderr_fd,
                                     cell_name=spec.cell_name)

    async def _supervise(
        self,
        spec: GuestSpec,
        host: GuestHost,
        process: QemuProcess,
        uart: trio.SocketStream,
        qmp_stream: trio.SocketStream,
        stderr: trio.lowlevel.FdStream,
    ) -> Outcome:
        """Wire the console, resume the VM, and wait until the guest ended and QEMU is reaped."""
        run = _GuestRun(spec, host, process)
        exited, qmp_done, stderr_done, output_done = (trio.Event() for _ in range(4))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_then_set, stderr_done, run.watch_stderr, stderr)
            nursery.start_soon(_run_then_set, output_done, run.pump_guest_output, uart)
            nursery.start_soon(run.pump_guest_input, uart)
            nursery.start_soon(run.watch_exit, exited, qmp_done, stderr_done)
            await _connect_and_resume(nursery, run, qmp_stream, qmp_done)
            await run.ending.decided.wait()
            # A parked guest would spin forever: stop it. A powered-off one is exiting anyway.
            if not isinstance(run.ending.outcome, PoweredOff):
                process.kill()
            await exited.wait()
            await output_done.wait()
            nursery.cancel_scope.cancel()
        assert run.ending.outcome is not None
        return run.ending.outcome

