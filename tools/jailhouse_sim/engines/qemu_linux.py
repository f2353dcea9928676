"""Linux cells (``jailhouse cell linux``) under the QEMU engine.

The kernel, initrd and command line the cell's loader would use
(:class:`~..engine.LinuxBoot`) are booted with QEMU's own Linux
boot (``-kernel``/``-initrd``/``-append``, bytes from memfds). The guest therefore
runs with **QEMU's generated device tree**, not the DTB given to ``cell linux``:
its RAM starts at 0x40000000 with the size of the cell's RAM regions, and the
cell's UART is QEMU's PL011 (``ttyAMA0``) as for every QEMU guest. The UART, QMP,
stderr and exit handling are those of :mod:`.qemu_common`, except that QEMU's
``guest_errors`` log is not watched (a Linux guest's device probing is not a fault).
Each ivshmem-net link of the cell (``spec.nics``) is the guest's ``virtio-net-device``
(``virtio_mmio`` + ``virtio_net`` in the guest, ``eth0`` for the first) on the link's
tap, as :mod:`.qemu_common` describes.

Stopping with ``cell shutdown`` (or a ``load``/``start`` of the running cell) is a
**graceful request first**: QMP ``system_powerdown`` presses the ``virt`` power
button (a GPIO key the guest sees as ``KEY_POWER``); if the guest has not powered
off within ``JAILHOUSE_SIM_LINUX_POWERDOWN_S`` seconds (default 5), QEMU is killed.
``cell destroy`` and ``disable`` kill it at once. Real
Jailhouse stops a passive cell at once; the simulator gives Linux guests the
chance for an orderly shutdown that runphi's graceful stop is meant to give.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from contextlib import ExitStack

import trio

from ..cellfile import MEM_COMM_REGION, MEM_DMA, MEM_EXECUTE, MEM_IO, MEM_READ, MEM_WRITE
from ..engine import GuestHost, GuestSpec, LinuxBoot
from ..qmp import QmpClient, QmpError
from .qemu_common import (DEFAULT_RAM_MIB, GuestRun, PoweredOff, QemuProcess, connect_and_resume, nic_argv, nic_fds,
                          qemu_channels, report_outcome, run_then_set, write_all)

POWERDOWN_TIMEOUT_ENV = "JAILHOUSE_SIM_LINUX_POWERDOWN_S"
DEFAULT_POWERDOWN_TIMEOUT_S = 5.0
MIN_LINUX_RAM_MIB = 32
_RAM_MASK = MEM_READ | MEM_WRITE | MEM_EXECUTE | MEM_DMA | MEM_IO | MEM_COMM_REGION
_RAM_FLAGS = MEM_READ | MEM_WRITE | MEM_EXECUTE | MEM_DMA


def powerdown_timeout() -> float:
    """Seconds a Linux guest gets to power off after the power button (environment override)."""
    try:
        return max(0.0, float(os.environ.get(POWERDOWN_TIMEOUT_ENV, DEFAULT_POWERDOWN_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_POWERDOWN_TIMEOUT_S


def linux_ram_mib(spec: GuestSpec) -> int:
    """The guest's RAM: the cell regions `cell linux` puts in ``/memory/reg``, in MiB."""
    total = sum(r.size for r in spec.ram
                if r.flags & _RAM_MASK == _RAM_FLAGS and (r.guest_address > 0 or r.size > 0x10000))
    if total == 0:
        return DEFAULT_RAM_MIB
    return max(MIN_LINUX_RAM_MIB, -(-total // (1 << 20)))


def linux_argv(spec: GuestSpec, linux: LinuxBoot, *, binary: str, machine: str, cpu: str, kernel_fd: int,
               initrd_fd: int | None, uart_fd: int, qmp_fd: int, net_fds: Sequence[int] = ()) -> list[str]:
    """QEMU's command line booting the cell's kernel (read from /dev/fd/kernel_fd); NIC i
    (``spec.nics``) uses the tap at net_fds[i]."""
    argv = [
        binary, "-M", machine, "-cpu", cpu,
        "-smp", str(max(1, len(spec.cpus))), "-m", f"{linux_ram_mib(spec)}M",
        "-nodefaults", "-display", "none", "-no-reboot", "-S",
        "-chardev", f"socket,id=uart,fd={uart_fd}", "-serial", "chardev:uart",
        "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
        "-kernel", f"/dev/fd/{kernel_fd}", "-append", linux.cmdline,
    ]  # fmt: skip
    if initrd_fd is not None:
        argv += ["-initrd", f"/dev/fd/{initrd_fd}"]
    return argv + nic_argv(spec.nics, net_fds)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    write_all(fd, data)
    return fd


def _spawn(engine, spec: GuestSpec, linux: LinuxBoot, uart: socket.socket, qmp: socket.socket,
           stderr_fd: int) -> QemuProcess:
    with ExitStack() as fds:
        kernel_fd = _memfd(f"cell-{spec.cell_id}-kernel", linux.kernel)
        fds.callback(os.close, kernel_fd)
        initrd_fd = None
        if linux.initrd is not None:
            initrd_fd = _memfd(f"cell-{spec.cell_id}-initrd", linux.initrd)
            fds.callback(os.close, initrd_fd)
        net_fds = fds.enter_context(nic_fds(spec))
        argv = linux_argv(spec, linux, binary=engine.binary, machine=spec.extra.get("qemu_machine", engine.machine),
                          cpu=spec.extra.get("qemu_cpu", engine.cpu), kernel_fd=kernel_fd, initrd_fd=initrd_fd,
                          uart_fd=uart.fileno(), qmp_fd=qmp.fileno(), net_fds=net_fds)
        passed: Sequence[int] = [kernel_fd, *([initrd_fd] if initrd_fd is not None else []), *net_fds,
                                 uart.fileno(), qmp.fileno()]
        return QemuProcess.spawn(argv, passed, stderr_fd, cell_name=spec.cell_name)


async def _power_button_on_request(run: GuestRun, qmp: QmpClient | None, requested: trio.Event,
                                   timeout: float) -> None:
    """Once a stop is requested: press the power button, and kill QEMU if the guest is not off in time.

    A destroy is not a request: QEMU is killed at once."""
    await requested.wait()
    if run.ending.decided.is_set():
        return
    if qmp is not None and run.host.graceful_stop:
        try:
            await qmp.execute("system_powerdown")
        except QmpError:
            pass
        with trio.move_on_after(timeout):
            await run.ending.decided.wait()
            return
    run.process.kill()


async def _supervise(run: GuestRun, uart: trio.SocketStream, qmp_stream: trio.SocketStream,
                     stderr: trio.lowlevel.FdStream, stop_requested: trio.Event) -> None:
    """Wire console and QMP, resume the VM, and stay until QEMU is gone.

    Shielded: cancelling the cell becomes ``stop_requested`` (the power button), so the
    UART and QMP keep being served while the guest shuts itself down."""
    exited, qmp_done, stderr_done, output_done = (trio.Event() for _ in range(4))
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_then_set, stderr_done, run.watch_stderr, stderr)
            nursery.start_soon(run_then_set, output_done, run.pump_guest_output, uart)
            nursery.start_soon(run.pump_guest_input, uart)
            nursery.start_soon(run.watch_exit, exited, qmp_done, stderr_done)
            qmp = await connect_and_resume(nursery, run, qmp_stream, qmp_done)
            nursery.start_soon(_power_button_on_request, run, qmp, stop_requested, powerdown_timeout())
            await run.ending.decided.wait()
            if not isinstance(run.ending.outcome, PoweredOff):
                run.process.kill()
            await exited.wait()
            await output_done.wait()
            nursery.cancel_scope.cancel()


async def run_linux_guest(engine, spec: GuestSpec, host: GuestHost) -> None:
    """Boot ``spec.linux`` under QEMU until the guest ends or the cell is stopped (see the module docstring)."""
    assert spec.linux is not None
    linux = spec.linux
    with qemu_channels(lambda uart, qmp, stderr_fd: _spawn(engine, spec, linux, uart, qmp, stderr_fd)) as channels:
        run = GuestRun(spec, host, channels.process)
        stop_requested = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_supervise, run, channels.uart, channels.qmp, channels.stderr, stop_requested)
                try:
                    await run.ending.decided.wait()
                finally:
                    # A cancelled wait is a stop request: the shielded supervisor presses the button.
                    stop_requested.set()
        finally:
            await channels.process.kill_and_reap()
    assert run.ending.outcome is not None
    report_outcome(run.ending.outcome, spec, host)
