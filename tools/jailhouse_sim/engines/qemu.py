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

Linux cells (``spec.linux``, from ``cell linux``) are booted by :mod:`.qemu_linux`;
the process, its channels and the guest run both use are in :mod:`.qemu_common`.

UART address: the guest always sees QEMU's single PL011 at 0x09000000, whatever
UART address the board gives the cell; the bytes go to that cell's UART pty.

Network: each ivshmem-net link of the cell (``spec.nics``) is a ``virtio-net-device``
on the link's tap (see :mod:`.qemu_common`); a bare-metal guest needs a virtio-mmio
network driver to use it.

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

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

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
    net_fds: Sequence[int] = (),
) -> list[str]:
    """The QEMU command line for one cell; painted image i is read from /dev/fd/image_fds[i],
    NIC i (``spec.nics``) uses the tap at net_fds[i]."""
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
    argv += nic_argv(spec.nics, net_fds)
    for image, fd in zip(paint_images(spec.images), image_fds, strict=True):
        argv += ["-device", f"loader,file=/dev/fd/{fd},addr={image.address:#x},force-raw=on"]
    if spec.reset_address != 0:
        # QEMU's loader rejects addr=0 without a file; a firmware-less virt CPU resets to 0 anyway.
        argv += ["-device", f"loader,addr={spec.reset_address:#x},cpu-num=0"]
    return argv


@contextmanager
def _image_memfds(spec: GuestSpec) -> Iterator[list[int]]:
    """One memfd per painted image (see paint_images) holding its bytes, closed on exit."""
    with ExitStack() as stack:
        fds = []
        for index, image in enumerate(paint_images(spec.images)):
            fd = os.memfd_create(f"cell-{spec.cell_id}-image-{index}")
            stack.callback(os.close, fd)
            write_all(fd, image.data)
            fds.append(fd)
        yield fds


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
        with _image_memfds(spec) as image_fds, nic_fds(spec) as net_fds:
            argv = qemu_argv(
                spec,
                binary=self.binary,
                machine=machine,
                cpu=cpu,
                image_fds=image_fds,
                uart_fd=uart.fileno(),
                qmp_fd=qmp.fileno(),
                net_fds=net_fds,
            )
            return QemuProcess.spawn(argv, [*image_fds, *net_fds, uart.fileno(), qmp.fileno()], stderr_fd,
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
        run = GuestRun(spec, host, process)
        exited, qmp_done, stderr_done, output_done = (trio.Event() for _ in range(4))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_then_set, stderr_done, run.watch_stderr, stderr)
            nursery.start_soon(run_then_set, output_done, run.pump_guest_output, uart)
            nursery.start_soon(run.pump_guest_input, uart)
            nursery.start_soon(run.watch_exit, exited, qmp_done, stderr_done)
            await connect_and_resume(nursery, run, qmp_stream, qmp_done)
            await run.ending.decided.wait()
            # A parked guest would spin forever: stop it. A powered-off one is exiting anyway.
            if not isinstance(run.ending.outcome, PoweredOff):
                process.kill()
            await exited.wait()
            await output_done.wait()
            nursery.cancel_scope.cancel()
        assert run.ending.outcome is not None
        return run.ending.outcome

