"""The simulator daemon: one trio program owning the board.

It owns the UART ptys, the simulated hypervisor and every running guest, and
serves the ``jailhouse`` client over a unix socket. Management calls are
serialised by one lock (the driver's mutex); console reads, status and fault
injection bypass it, as the real console read does. It also holds the taps that
stand in for the root's ivshmem-net netdevs (:mod:`.netdev`), in the network
namespace it runs in; they are closed, and so removed, when it exits.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import trio

from . import protocol as p
from .board import Board
from .cellfile import MEM_COMM_REGION, MEM_IO, minimal_system_config
from .engine import GuestEngine, GuestNic, GuestSpec, LoadedImage, RamRegion
from .engines import load_engine
from .engines.script import guest_image, is_script
from .hvconsole import serve_device
from .hypervisor import GUEST_STATES, Cell, CellRef, HvError, Hypervisor
from .layout import SimLayout
from .linux_boot import linux_boot_of
from .netdev import IvshmemNet
from .relay import MAGIC, serve_tool
from .sysfs import SysfsTree
from .uart import PtyUart

STATS_FLUSH_S = 0.1
# A running cell's timer and maintenance interrupts, so `cell stats` moves for any guest.
TIMER_TICK_S = 0.05
MAX_REQUEST_BYTES = 512 * 1024 * 1024


def log(event: str, **fields: object) -> None:
    """One line in the daemon log (stderr is redirected there)."""
    details = " ".join(f"{k}={v!r}" for k, v in fields.items())
    print(f"jailhouse-sim: {event} {details}".rstrip(), file=sys.stderr, flush=True)


class CellHost:
    """The :class:`GuestHost` one guest run talks to; inert once the run is over."""

    def __init__(self, hv: Hypervisor, cell: Cell, uart: PtyUart | None) -> None:
        self.hv = hv
        self.cell = cell
        self.uart = uart
        self.live = True
        self.graceful_stop = True
        self.rx: trio.MemoryReceiveChannel[bytes] | None = None

    async def uart_write(self, data: bytes) -> None:
        if not self.live or self.uart is None:
            await trio.lowlevel.checkpoint()
            return
        await self.uart.write(data)

    async def uart_read(self) -> bytes:
        if self.rx is None:
            await trio.sleep_forever()
        assert self.rx is not None
        return await self.rx.receive()

    def set_state(self, state: str) -> None:
        if state not in GUEST_STATES:
            raise ValueError(f"not a cell state: {state!r}")
        if self.live:
            self.hv.set_state(self.cell, state)

    def park_cpu(self, cpu: int, reason: str) -> None:
        if self.live:
            if reason:
                self.hv.hv_print(reason)
            self.hv.park_cpu(self.cell, cpu)

    def hv_print(self, line: str) -> None:
        if self.live:
            self.hv.hv_print(line)

    def hv_write(self, data: bytes) -> None:
        """The debug-console hypercall for each byte of ``data``; a cell without
        VIRTUAL_CONSOLE_PERMITTED/ACTIVE gets EPERM, i.e. nothing is written."""
        if self.live and self.hv.virtual_console_permitted(self.cell):
            self.hv.hv_write(data)

    def count_vmexits(self, cpu: int, kind: str, n: int = 1) -> None:
        if self.live and cpu in self.cell.cpus:
            self.hv.count_vmexits(cpu, kind, n)


def _root_cause(error: BaseException) -> str:
    """The first leaf of a (possibly nested) exception group, as one line."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


@dataclass
class GuestRun:
    host: CellHost
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class GuestSupervisor:
    """Starts and stops guests as tasks of the daemon's nursery (the GuestRunner)."""

    def __init__(self, nursery: trio.Nursery, board: Board, layout: SimLayout, uarts: dict[int, PtyUart],
                 default_engine: GuestEngine, script_engine: GuestEngine) -> None:
        self.nursery = nursery
        self.board = board
        self.layout = layout
        self.uarts = uarts
        self.default_engine = default_engine
        self.script_engine = script_engine
        self.runs: dict[int, GuestRun] = {}
        self.hv: Hypervisor

    def spec_for(self, cell: Cell) -> tuple[GuestSpec, PtyUart | None]:
        """Describe a cell to an engine, and find the UART its console is routed to."""
        assert cell.config is not None
        uart, guest_address = self.hv.uart_of(cell)
        pty = self.uarts.get(uart.index) if uart else None
        ram = tuple(
            RamRegion(r.virt_start, r.size, r.flags)
            for r in cell.config.memory_regions
            if r.size and not r.flags & (MEM_IO | MEM_COMM_REGION)
        )
        extra = {
            "board": self.board.name,
            "uart_device": str(pty.link) if pty else "",
            "virtual_console": "1" if self.hv.virtual_console_permitted(cell) else "0",
            "work_dir": str(self.layout.work),
        }
        spec = GuestSpec(
            cell_name=cell.name,
            cell_id=cell.id,
            cpus=tuple(sorted(cell.cpus)),
            reset_address=cell.config.cpu_reset_address,
            images=tuple(cell.images),
            ram=ram,
            uart_guest_address=guest_address,
            linux=linux_boot_of(cell.images, cell.config.cpu_reset_address),
            nics=self.nics_of(cell),
            extra=extra,
        )
        return spec, pty

    def nics_of(self, cell: Cell) -> tuple[GuestNic, ...]:
        """The cell's links that have a root-side tap, as the guest's network devices."""
        if self.hv.netdevs is None:
            return ()
        return tuple(GuestNic(n.tap.fd, n.guest_mac) for n in self.hv.netdevs.of(cell.id))

    def start(self, cell: Cell) -> None:
        spec, pty = self.spec_for(cell)
        booted = guest_image(spec)
        engine = self.script_engine if booted is not None and is_script(booted.data) else self.default_engine
        run = GuestRun(CellHost(self.hv, cell, pty))
        self.runs[cell.id] = run
        self.nursery.start_soon(self._run_guest, cell, engine, spec, run)

    async def stop(self, cell: Cell, graceful: bool = True) -> None:
        run = self.runs.pop(cell.id, None)
        if run is not None:
            run.host.graceful_stop = graceful
            run.scope.cancel()
            await run.done.wait()

    async def stop_all(self) -> None:
        for cell_id in list(self.runs):
            run = self.runs.pop(cell_id)
            run.scope.cancel()
            await run.done.wait()

    async def _run_guest(self, cell: Cell, engine: GuestEngine, spec: GuestSpec, run: GuestRun) -> None:
        host = run.host
        send, receive = trio.open_memory_channel[bytes](64)
        host.rx = receive
        if host.uart is not None:
            host.uart.listeners.add(send)
        try:
            with run.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._timer_exits, cell, host)
                    await engine.run(spec, host)
                    nursery.cancel_scope.cancel()
        except Exception as e:  # noqa: BLE001 - an engine failure must not take the board down
            log("guest engine failed", cell=cell.name, engine=engine.name, error=repr(e))
            host.hv_print(f"jailhouse-sim: {engine.name} engine failed for cell \"{cell.name}\": {_root_cause(e)}")
            for cpu in sorted(cell.cpus):
                host.park_cpu(cpu, "")
        finally:
            host.live = False
            if host.uart is not None:
                host.uart.listeners.discard(send)
            send.close()
            if self.runs.get(cell.id) is run:
                del self.runs[cell.id]
            run.done.set()

    async def _timer_exits(self, cell: Cell, host: CellHost) -> None:
        while True:
            await trio.sleep(TIMER_TICK_S)
            for cpu in cell.cpus - cell.failed_cpus:
                host.count_vmexits(cpu, "virt_irq")


@dataclass
class Injection:
    count: int
    err: int
    delay_ms: int
    only: type | None


class FaultInjector:
    """Pending injected faults, consumed by matching management calls in order."""

    def __init__(self) -> None:
        self.pending: list[Injection] = []

    def add(self, request: p.Inject) -> None:
        if request.clear:
            self.pending.clear()
            return
        only = p.INJECTABLE[request.only] if request.only else None
        self.pending.append(Injection(request.count, request.errno, request.delay_ms, only))

    def take(self, request: p.Request) -> Injection | None:
        for injection in self.pending:
            if injection.only is None or isinstance(request, injection.only):
                if injection.count > 0:
                    injection.count -= 1
                    if injection.count == 0:
                        self.pending.remove(injection)
                return injection
        return None


class Daemon:
    """Request handling on top of the hypervisor."""

    def __init__(self, board: Board, layout: SimLayout, engine_name: str, hv: Hypervisor,
                 supervisor: GuestSupervisor, uarts: dict[int, PtyUart]) -> None:
        self.board = board
        self.layout = layout
        self.engine_name = engine_name
        self.hv = hv
        self.supervisor = supervisor
        self.uarts = uarts
        self.mutex = trio.Lock()
        self.injector = FaultInjector()
        self.stop_requested = trio.Event()
        self.tool_threads = trio.CapacityLimiter(math.inf)
        self.tool_runs = 0

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection: a JSON request (``jailhouse_client.py``, ``jailhouse-sim``) or,
        when it starts with the relay's MAGIC, a command of the compiled ``bin/jailhouse``."""
        try:
            data = bytearray(await stream.receive_some())
            if data.startswith(MAGIC[:1]):
                await self.serve_tool(stream, bytes(data))
                return
            async for chunk in stream:
                data += chunk
                if len(data) > MAX_REQUEST_BYTES:
                    raise ValueError("request too large")
            await stream.send_all(await self.answer(bytes(data)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as e:
            log("client connection dropped", error=repr(e))
        finally:
            await stream.aclose()

    async def serve_tool(self, stream: trio.SocketStream, head: bytes) -> None:
        """One command of the compiled client, run by ``relay`` (counted in ``status``)."""
        self.tool_runs += 1
        try:
            await serve_tool(stream, head, self.answer, str(self.layout.root), self.board.rcpus, self.tool_threads)
        finally:
            self.tool_runs -= 1

    async def answer(self, data: bytes) -> bytes:
        """The encoded reply to one encoded request."""
        try:
            request = p.decode_request(data)
        except msgspec.DecodeError as e:  # not JSON, or not a request
            return p.encode(p.Reply(errno=errno.EINVAL, message=f"bad request: {e}"))
        return p.encode(await self.dispatch(request))

    async def dispatch(self, request: p.Request) -> p.Reply:
        match request:
            case p.ConsoleRead(head=head, saved_seen=seen, follow=follow):
                chunk = self.hv.console.read(head, seen, self.hv.enabled, follow, self.hv.virtual_console)
                return p.Reply(data=chunk.data, head=chunk.head, saved_seen=chunk.saved_seen, error=chunk.error)
            case p.Inject():
                self.injector.add(request)
                return p.Reply()
            case p.Status():
                return p.Reply(status=self.status())
            case p.Stop():
                self.stop_requested.set()
                return p.Reply()
        async with self.mutex:
            injection = self.injector.take(request)
            if injection is not None:
                await trio.sleep(injection.delay_ms / 1000)
                if injection.err:
                    return p.Reply(errno=injection.err)
            try:
                await self.management(request)
            except HvError as e:
                return p.Reply(errno=e.errno)
        return p.Reply()

    async def management(self, request: p.Request) -> None:
        hv = self.hv
        match request:
            case p.Enable(config=config):
                await hv.enable(config)
            case p.Disable():
                await hv.disable()
            case p.CellCreate(config=config):
                await hv.create(config)
            case p.CellLoad(cell=cell, images=images, rcpu_images=rcpus) | p.CellShutdown(
                cell=cell, images=images, rcpu_images=rcpus
            ):
                loaded = [LoadedImage(i.address, i.data) for i in images]
                await hv.load(CellRef(cell.id, cell.name), loaded, [self.firmware(r) for r in rcpus])
            case p.CellStart(cell=cell):
                await hv.start(CellRef(cell.id, cell.name))
            case p.CellDestroy(cell=cell):
                await hv.destroy(CellRef(cell.id, cell.name))

    def firmware(self, image: p.RcpuImage) -> tuple[str, int, bytes | None]:
        """Read an Omnivisor rCPU image from the simulated ``/lib/firmware``."""
        try:
            return image.name, image.rcpu, (self.layout.firmware / image.name).read_bytes()
        except OSError:
            return image.name, image.rcpu, None

    def status(self) -> p.StatusInfo:
        cells = []
        for cell in sorted(self.hv.cells.values(), key=lambda c: c.id):
            uart = None
            if cell.config is not None:
                found, _ = self.hv.uart_of(cell)
                uart = str(self.layout.uart(found.index)) if found else None
            cells.append(p.CellInfo(cell.id, cell.name, cell.state, sorted(cell.cpus), uart))
        return p.StatusInfo(
            pid=os.getpid(), board=self.board.name, engine=self.engine_name, enabled=self.hv.enabled,
            root=str(self.layout.root), jailhouse=str(self.layout.bin_jailhouse), sysfs=str(self.layout.sysfs),
            console=str(self.layout.uart(0)) if 0 in self.uarts else "",
            uarts={i: str(u.link) for i, u in self.uarts.items()}, cells=cells,
            kernel_log=str(self.layout.kernel_log), daemon_log=str(self.layout.daemon_log),
            tool_runs=self.tool_runs,
        )


async def _flush_stats(hv: Hypervisor) -> None:
    while True:
        await trio.sleep(STATS_FLUSH_S)
        hv.flush_stats()


async def _stop_on_signal(event: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log("signal", signum=signum)
            event.set()


def _fresh_unix_socket(path) -> trio.socket.SocketType:
    """A new unix stream socket, with any stale socket file at ``path`` removed."""
    if path.exists() or path.is_symlink():
        path.unlink()
    return trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)


async def serve(layout: SimLayout, board: Board, engine_name: str, *, enable: bool,
                ready: Callable[[str], None]) -> None:
    """Run the daemon until ``Stop`` or SIGTERM; calls ``ready("")`` once serving
    (or ``ready(<error line>)`` if it cannot start). Everything it created is
    removed again on the way out: guests, ptys, symlinks, socket, pid file, sysfs."""
    default_engine = load_engine(engine_name)
    script_engine = load_engine("script")
    for directory in (layout.run, layout.dev, layout.work, layout.kernel_log.parent, layout.firmware):
        directory.mkdir(parents=True, exist_ok=True)
    uarts: dict[int, PtyUart] = {}
    sysfs = SysfsTree(layout.sysfs)
    netdevs = IvshmemNet(layout.pci_bus)
    try:
        netdevs.reset()
        for uart in board.uarts:
            uarts[uart.index] = PtyUart(uart.index, layout.uart(uart.index))
        async with trio.open_nursery() as nursery:
            supervisor = GuestSupervisor(nursery, board, layout, uarts, default_engine, script_engine)
            hv = Hypervisor(board, sysfs, supervisor, layout.kernel_log, netdevs)
            supervisor.hv = hv
            if 0 in uarts:
                hv.console_listeners.append(uarts[0].write_nowait)
            await nursery.start(serve_device, layout.console_device, hv.console,
                                lambda: (hv.enabled, hv.virtual_console))
            if enable:
                await hv.enable(minimal_system_config(board.profile, board.arch_code))
            daemon = Daemon(board, layout, engine_name, hv, supervisor, uarts)
            sock = _fresh_unix_socket(layout.socket)
            await sock.bind(str(layout.socket))
            sock.listen(64)
            listener = trio.SocketListener(sock)
            for uart in uarts.values():
                nursery.start_soon(uart.pump_input)
            nursery.start_soon(_flush_stats, hv)
            nursery.start_soon(_stop_on_signal, daemon.stop_requested)
            nursery.start_soon(trio.serve_listeners, daemon.handle_connection, [listener])
            layout.pid_file.write_text(f"{os.getpid()}\n")
            log("serving", board=board.name, engine=engine_name, root=str(layout.root))
            ready("")
            await daemon.stop_requested.wait()
            await supervisor.stop_all()
            nursery.cancel_scope.cancel()
    finally:
        for uart in uarts.values():
            uart.close()
        for path in (layout.socket, layout.pid_file):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        netdevs.remove()
        sysfs.remove()
        log("stopped")
