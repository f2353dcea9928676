"""The QEMU guest engine: a cell's real aarch64 machine code under qemu-system-aarch64.

One cell start is one QEMU process (``-M virt,gic-version=3 -cpu cortex-a53`` by
default), started paused (``-S``):

* every loaded image is placed at its guest address with
  ``-device loader,file=/dev/fd/N,addr=...,force-raw=on`` (the bytes live in a
  memfd, so nothing is left on disk); ``-smp`` is the number of cell CPUs
  (secondaries wait powered off for PSCI CPU_ON);
* the machine gets EL2 (``virtualization=on``) and the first CPU starts in the
  simulator's **EL2 layer** (:mod:`..el2`), loaded in an extra MiB of RAM above
  the cell's: it enters the cell at EL1 at its reset address, as Jailhouse does,
  and answers its hypercalls. Bytes of the debug-console hypercall (only from a
  cell with ``VIRTUAL_CONSOLE_PERMITTED``/``ACTIVE``; others get EPERM) arrive
  over ARM semihosting on a third socketpair and go to the hypervisor console
  (``host.hv_write``, one ``hypercall`` exit each); PSCI (``hvc #0`` or ``smc
  #0``) reaches QEMU's built-in PSCI; a trap the layer does not handle ends the
  cell with Jailhouse's ``FATAL: unhandled trap``/``forbidden access`` line.
  Without the layer (not a ``virt`` machine, ``QemuEngine(el2_layer=False)``, or
  no cross toolchain to build it: said once on stderr) the first CPU starts at
  the cell's reset address at EL1 (``-device loader,addr=<reset>,cpu-num=0``)
  and PSCI is QEMU's over HVC;
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

Linux cells (``spec.linux``, from ``cell linux``) are booted by :mod:`.qemu_linux`;
the process, its channels and the guest run both use are in :mod:`.qemu_common`.

UART address: the guest always sees QEMU's single PL011 at 0x09000000, whatever
UART address the board gives the cell; the bytes go to that cell's UART pty.

Network: each ivshmem-net link of the cell (``spec.nics``) is a ``virtio-net-device``
on the link's tap (see :mod:`.qemu_common`); a bare-metal guest needs a virtio-mmio
network driver to use it.

Statistics are approximate: every UART byte in or out counts as one ``mmio``
exit on the cell's first CPU, every debug-console byte as one ``hypercall`` exit
there (refused ones are not seen) and a power-off as one ``psci`` exit. QEMU does
not trap like Jailhouse does, so these are plausible numbers, not measurements.

QEMU never outlives its engine: it runs in its own process group that is
SIGKILLed and reaped when ``run`` is cancelled, and with PR_SET_PDEATHSIG(SIGKILL)
so that the kernel kills it if the process hosting the engine dies. The process
is forked from the trio thread itself (not trio's worker threads: the death
signal follows the forking *thread*, and worker threads exit when idle).

Configuration (all optional): ``QemuEngine(binary=..., machine=..., cpu=..., el2_layer=...)``,
environment ``JAILHOUSE_SIM_QEMU`` (binary), and per cell ``spec.extra`` keys
``qemu_machine`` / ``qemu_cpu`` (a board may pick another machine or core).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import trio

from ..cellfile import MEM_IO
from ..engine import GuestHost, GuestSpec, LoadedImage
from .qemu_common import (DEFAULT_RAM_MIB, GuestRun, Outcome, PoweredOff, QemuProcess, connect_and_resume,
                          nic_argv, nic_fds, qemu_channels, report_outcome, run_then_set, write_all)

DEFAULT_BINARY = "qemu-system-aarch64"
DEFAULT_MACHINE = "virt,gic-version=3"
DEFAULT_CPU = "cortex-a53"
VIRT_RAM_BASE = 0x4000_0000
MIN_RAM_MIB = 16
# RAM added above the cell's for the EL2 layer (its code, stacks and CPU_ON mailboxes).
EL2_RESERVE_MIB = 1


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


def el2_machine(machine: str) -> str | None:
    """``machine`` with EL2 (``virtualization=on``) for the EL2 layer, or None where the layer
    cannot run: not a ``virt`` machine, ``virtualization=off``, or ``secure=on`` (an EL3 takes
    QEMU's built-in PSCI away)."""
    kind, _, rest = machine.partition(",")
    options = [option for option in rest.split(",") if option]
    if not (kind == "virt" or kind.startswith("virt-")) or "secure=on" in options:
        return None
    if any(option.startswith("virtualization=") for option in options):
        return machine if "virtualization=on" in options else None
    return f"{machine},virtualization=on"


def el2_address(spec: GuestSpec) -> int:
    """Where the EL2 layer is placed: the MiB of RAM right above everything the cell has."""
    return VIRT_RAM_BASE + (ram_mib(spec) << 20)


@dataclass(frozen=True)
class El2Boot:
    """The EL2 layer on a QEMU command line: its patched image and the console channel."""

    image_fd: int  # the layer's bytes (see el2.patched), loaded at el2_address(spec)
    console_fd: int  # QEMU's end of the debug-console channel (the semihosting chardev)


def qemu_argv(
    spec: GuestSpec,
    *,
    binary: str,
    machine: str,
    cpu: str,
    image_fds: Sequence[int],
    uart_fd: int,
    qmp_fd: int,
    net_fds: Sequence[int] = (),
    el2: El2Boot | None = None,
) -> list[str]:
    """The QEMU command line for one cell; painted image i is read from /dev/fd/image_fds[i],
    NIC i (``spec.nics``) uses the tap at net_fds[i]. With ``el2`` the machine gets EL2 and
    the first CPU starts in the EL2 layer, which enters the cell at its reset address."""
    memory = ram_mib(spec)
    if el2 is not None:
        machine = el2_machine(machine) or machine
        memory += EL2_RESERVE_MIB
    argv = [
        binary,
        "-M", machine,
        "-cpu", cpu,
        "-smp", str(max(1, len(spec.cpus))),
        "-m", f"{memory}M",
        "-nodefaults", "-display", "none",
        "-no-reboot", "-S",
        "-d", "guest_errors",
        "-chardev", f"socket,id=uart,fd={uart_fd}",
        "-serial", "chardev:uart",
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    argv += nic_argv(spec.nics, net_fds)
    if el2 is not None:
        # SYS_WRITEC from the layer goes to this chardev; nothing else does.
        argv += ["-chardev", f"socket,id=hvcon,fd={el2.console_fd}",
                 "-semihosting-config", "enable=on,target=native,chardev=hvcon"]
    for image, fd in zip(paint_images(spec.images), image_fds, strict=True):
        argv += ["-device", f"loader,file=/dev/fd/{fd},addr={image.address:#x},force-raw=on"]
    if el2 is not None:
        layer = el2_address(spec)
        argv += ["-device", f"loader,file=/dev/fd/{el2.image_fd},addr={layer:#x},force-raw=on",
                 "-device", f"loader,addr={layer:#x},cpu-num=0"]
    elif spec.reset_address != 0:
        # QEMU's loader rejects addr=0 without a file; a firmware-less virt CPU resets to 0 anyway.
        argv += ["-device", f"loader,addr={spec.reset_address:#x},cpu-num=0"]
    return argv


@contextmanager
def _image_memfds(spec: GuestSpec) -> Iterator[list[int]]:
    """One memfd per painted image (see paint_images) holding its bytes, closed on exit."""
    with ExitStack() as stack:
        fds = []
        for index, image in enumerate(paint_images(spec.images)):
            fds.append(stack.enter_context(_memfd(f"cell-{spec.cell_id}-image-{index}", image.data)))
        yield fds


@contextmanager
def _memfd(name: str, data: bytes) -> Iterator[int]:
    fd = os.memfd_create(name)
    try:
        write_all(fd, data)
        yield fd
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the EL2 layer

# Filled once per process: the built layer image, or why there is none.
_el2_built: list[bytes | str] = []


def _build_el2() -> bytes | str:
    """The unpatched layer image, or why it cannot be had (runs make: call it in a thread)."""
    try:
        from .. import el2
    except ImportError as exc:  # an install without the layer's sources
        return f"the EL2 layer is not installed ({exc})"
    try:
        return el2.ensure_built().read_bytes()
    except (el2.El2BuildError, OSError) as exc:
        return str(exc)


async def el2_image() -> bytes | None:
    """The EL2 layer, built on first use; None (said once on stderr) when it cannot be built."""
    if not _el2_built:
        built = await trio.to_thread.run_sync(_build_el2)
        if not _el2_built:
            _el2_built.append(built)
            if isinstance(built, str):
                print(f"jailhouse-sim: qemu engine: running cells without the EL2 layer "
                      f"(no debug-console hypercall): {built}", file=sys.stderr, flush=True)
    built = _el2_built[0]
    return built if isinstance(built, bytes) else None


class QemuEngine:
    """Runs a cell's images under qemu-system-aarch64 (see the module docstring)."""

    name = "qemu"

    def __init__(self, binary: str | None = None, machine: str | None = None, cpu: str | None = None,
                 el2_layer: bool = True) -> None:
        self.binary = binary or os.environ.get("JAILHOUSE_SIM_QEMU") or DEFAULT_BINARY
        self.machine = machine or DEFAULT_MACHINE
        self.cpu = cpu or DEFAULT_CPU
        self.el2_layer = el2_layer

    async def run(self, spec: GuestSpec, host: GuestHost) -> None:
        """Boot the cell under QEMU and return once the guest ended and the host was told how.

        On cancellation QEMU is killed and reaped before the cancellation propagates.
        Raises QemuEngineError if QEMU cannot be started at all."""
        if spec.linux is not None:
            from .qemu_linux import run_linux_guest

            await run_linux_guest(self, spec, host)
            return
        machine = spec.extra.get("qemu_machine", self.machine)
        layer = await self._el2_layer_for(spec, machine)
        with ExitStack() as stack:
            console: trio.SocketStream | None = None
            console_theirs: socket.socket | None = None
            if layer is not None:
                console_ours, console_theirs = socket.socketpair()
                stack.callback(console_ours.close)
                stack.callback(console_theirs.close)
                console = trio.SocketStream(trio.socket.from_stdlib_socket(console_ours))

            def spawn(uart: socket.socket, qmp: socket.socket, stderr_fd: int) -> QemuProcess:
                try:
                    return self._spawn(spec, machine, uart, qmp, stderr_fd, layer, console_theirs)
                finally:
                    if console_theirs is not None:
                        console_theirs.close()  # QEMU holds its copy: ours would keep EOF away

            with qemu_channels(spawn) as channels:
                try:
                    outcome = await self._supervise(spec, host, channels.process, channels.uart, channels.qmp,
                                                    channels.stderr, console)
                finally:
                    await channels.process.kill_and_reap()
        report_outcome(outcome, spec, host)

    async def _el2_layer_for(self, spec: GuestSpec, machine: str) -> bytes | None:
        """The EL2 layer patched for this cell, or None to run the cell without one."""
        if not self.el2_layer or el2_machine(machine) is None:
            return None
        image = await el2_image()
        if image is None:
            return None
        from .. import el2

        return el2.patched(image, entry=spec.reset_address,
                           console_permitted=spec.extra.get("virtual_console") == "1")

    def _spawn(self, spec: GuestSpec, machine: str, uart: socket.socket, qmp: socket.socket, stderr_fd: int,
               layer: bytes | None, console: socket.socket | None) -> QemuProcess:
        cpu = spec.extra.get("qemu_cpu", self.cpu)
        with ExitStack() as stack:
            image_fds = stack.enter_context(_image_memfds(spec))
            net_fds = stack.enter_context(nic_fds(spec))
            el2 = None
            pass_fds = [*image_fds, *net_fds, uart.fileno(), qmp.fileno()]
            if layer is not None and console is not None:
                el2 = El2Boot(stack.enter_context(_memfd(f"cell-{spec.cell_id}-el2", layer)), console.fileno())
                pass_fds += [el2.image_fd, el2.console_fd]
            argv = qemu_argv(
                spec,
                binary=self.binary,
                machine=machine,
                cpu=cpu,
                image_fds=image_fds,
                uart_fd=uart.fileno(),
                qmp_fd=qmp.fileno(),
                net_fds=net_fds,
                el2=el2,
            )
            return QemuProcess.spawn(argv, pass_fds, stderr_fd, cell_name=spec.cell_name)

    async def _supervise(
        self,
        spec: GuestSpec,
        host: GuestHost,
        process: QemuProcess,
        uart: trio.SocketStream,
        qmp_stream: trio.SocketStream,
        stderr: trio.lowlevel.FdStream,
        hv_console: trio.SocketStream | None = None,
    ) -> Outcome:
        """Wire the consoles, resume the VM, and wait until the guest ended and QEMU is reaped."""
        run = GuestRun(spec, host, process, el2_layer=hv_console is not None)
        exited, qmp_done, stderr_done, output_done, hv_done = (trio.Event() for _ in range(5))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_then_set, stderr_done, run.watch_stderr, stderr)
            nursery.start_soon(run_then_set, output_done, run.pump_guest_output, uart)
            if hv_console is not None:
                nursery.start_soon(run_then_set, hv_done, run.pump_hv_console, hv_console)
            else:
                hv_done.set()
            nursery.start_soon(run.pump_guest_input, uart)
            nursery.start_soon(run.watch_exit, exited, qmp_done, stderr_done)
            await connect_and_resume(nursery, run, qmp_stream, qmp_done)
            await run.ending.decided.wait()
            # A parked guest would spin forever: stop it. A powered-off one is exiting anyway.
            if not isinstance(run.ending.outcome, PoweredOff):
                process.kill()
            await exited.wait()
            await output_done.wait()
            await hv_done.wait()
            nursery.cancel_scope.cancel()
        assert run.ending.outcome is not None
        return run.ending.outcome

