"""The QEMU engine driven directly with our own inmates under real qemu-system-aarch64.

The host below is a test harness (it records what a guest did to the hypervisor
side), not a mock: QEMU, the guests, QMP and the UART bytes are all real."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest
import trio

from tools.inmates import build as inmates
from tools.jailhouse_sim.engine import GuestSpec, LoadedImage, RamRegion
from tools.jailhouse_sim.engines.qemu import QemuEngine, paint_images, qemu_argv, ram_mib
from tools.jailhouse_sim.qmp import QmpClient, QmpError, QmpEvent

pytestmark = pytest.mark.qemu

REPO_ROOT = Path(__file__).resolve().parents[3]
QEMU = "qemu-system-aarch64"
STEP_TIMEOUT = 20  # seconds: generous for a loaded 2-core CI machine

_missing = inmates.missing_tools() or (None if shutil.which(QEMU) else f"{QEMU} not found (Debian: qemu-system-arm)")
if _missing:
    pytest.skip(f"QEMU engine tests need the real tools: {_missing}", allow_module_level=True)


def qemu_children(parent: int) -> list[int]:
    """PIDs of live (not zombie) qemu-system-aarch64 processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("Name", "").startswith("qemu-system-aar") and int(fields.get("PPid", "0")) == parent:
            if not fields.get("State", "").startswith("Z"):
                found.append(int(entry.name))
    return found


def process_is_dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (a dead process either way)."""
    try:
        state = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:")]
    except OSError:
        return True
    return bool(state) and state[0].split()[1] == "Z"


def open_fds() -> set[str]:
    """This process's open file descriptors and what they point at."""
    result = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            result.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return result


@pytest.fixture(scope="module", autouse=True)
def nothing_outlives_the_module():
    """After every test here: no QEMU child left, no descriptor leaked (sockets, pidfds, ptys)."""
    inmates.ensure_built()
    before = open_fds()
    yield
    assert qemu_children(os.getpid()) == []
    leaked = open_fds() - before
    assert not leaked, f"descriptors leaked by the QEMU engine: {sorted(leaked)}"


class RecordingHost:
    """A GuestHost that keeps everything a guest did, and lets a test type into its UART."""

    def __init__(self, cell_name: str = "inmate") -> None:
        self.cell_name = cell_name
        self.output = bytearray()
        self.states: list[str] = []
        self.parked: dict[int, str] = {}
        self.console: list[str] = []
        self.vmexits: collections.Counter[tuple[int, str]] = collections.Counter()
        self._output_grew = trio.Event()
        self._typed_send, self._typed_receive = trio.open_memory_channel[bytes](math.inf)

    async def uart_write(self, data: bytes) -> None:
        self.output += data
        self._output_grew.set()
        self._output_grew = trio.Event()

    async def uart_read(self) -> bytes:
        return await self._typed_receive.receive()

    def set_state(self, state: str) -> None:
        self.states.append(state)

    def park_cpu(self, cpu: int, reason: str) -> None:
        self.parked[cpu] = reason
        self.console += [reason, f'Parking CPU {cpu} (Cell: "{self.cell_name}")']

    def hv_print(self, line: str) -> None:
        self.console.append(line)

    def count_vmexits(self, cpu: int, kind: str, n: int = 1) -> None:
        self.vmexits[cpu, kind] += n

    def type(self, data: bytes) -> None:
        self._typed_send.send_nowait(data)

    async def wait_for_output(self, expected: bytes) -> None:
        """Wait until `expected` appears in what the guest printed."""
        with trio.fail_after(STEP_TIMEOUT):
            while expected not in self.output:
                await self._output_grew.wait()


def inmate_spec(program: str, *, cell_id: int = 1, cpus: tuple[int, ...] = (1,), name: str = "inmate") -> GuestSpec:
    """A cell shaped like runPHI's QEMU cells: 64 KiB low RAM at 0, 128 MiB at the load address."""
    return GuestSpec(
        cell_name=name,
        cell_id=cell_id,
        cpus=cpus,
        reset_address=inmates.LOAD_ADDRESS,
        images=(LoadedImage(inmates.LOAD_ADDRESS, inmates.image_path(program).read_bytes()),),
        ram=(
            RamRegion(0x0, 0x10000, 0x47),
            RamRegion(0x7000_0000, 0x800_0000, 0x4F),
            RamRegion(0x0900_0000, 0x1000, 0x93),
        ),
        uart_guest_address=0x0900_0000,
    )


async def run_to_end(program: str, **spec_args) -> RecordingHost:
    host = RecordingHost(spec_args.get("name", "inmate"))
    with trio.fail_after(STEP_TIMEOUT):
        await QemuEngine().run(inmate_spec(program, **spec_args), host)
    return host


def test_command_line_places_images_and_sizes_ram():
    spec = inmate_spec("hello", cpus=(2, 3))
    argv = qemu_argv(spec, binary=QEMU, machine="virt,gic-version=3", cpu="cortex-a53", image_fds=[7], uart_fd=5, qmp_fd=6)
    assert argv[argv.index("-smp") + 1] == "2"
    # 0x40000000 up to the end of the 128 MiB region at 0x70000000; the low RAM and the UART do not count.
    assert ram_mib(spec) == (0x7800_0000 - 0x4000_0000) >> 20
    assert "loader,file=/dev/fd/7,addr=0x70000000,force-raw=on" in argv
    assert argv[-1] == "loader,addr=0x70000000,cpu-num=0"
    assert {"-S", "-no-reboot", "guest_errors"} <= set(argv)


@hypothesis.given(st.lists(st.tuples(st.integers(0, 64), st.binary(max_size=24)), max_size=8))
def test_painted_images_are_the_memory_the_loads_leave(loads):
    memory: dict[int, int] = {}
    for address, data in loads:
        memory.update(zip(range(address, address + len(data)), data))
    painted = paint_images([LoadedImage(address, data) for address, data in loads])
    seen: dict[int, int] = {}
    for image in painted:
        assert image.data, "no empty images"
        for address, byte in zip(range(image.address, image.address + len(image.data)), image.data):
            assert address not in seen, "painted images overlap"
            seen[address] = byte
    assert seen == memory
    assert [i.address for i in painted] == sorted(i.address for i in painted)


def test_reset_address_zero_needs_no_cpu_loader():
    spec = dataclasses.replace(inmate_spec("hello"), reset_address=0)
    argv = qemu_argv(spec, binary=QEMU, machine="virt", cpu="cortex-a53", image_fds=[7], uart_fd=5, qmp_fd=6)
    assert not any("cpu-num" in arg for arg in argv)


async def test_hello_prints_and_shuts_down():
    host = await run_to_end("hello")
    text = host.output.decode()
    assert text.startswith("Hello from runphi inmate hello\r\n")
    assert text.endswith("hello: done, powering off\r\n")
    assert host.states == ["shut down"]
    assert host.parked == {}
    assert host.vmexits[1, "mmio"] == len(host.output)
    assert host.vmexits[1, "psci"] == 1


async def test_echo_round_trip_then_exit():
    host = RecordingHost()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run_engine():
            await QemuEngine().run(inmate_spec("echo"), host)
            done.set()

        nursery.start_soon(run_engine)
        await host.wait_for_output(b"> ")
        line = "ping \x01\x7f é 123".encode()
        host.type(line + b"\r")
        await host.wait_for_output(line + b"\r\n> ")
        host.type(b"exit\r")
        with trio.fail_after(STEP_TIMEOUT):
            await done.wait()
    assert host.output.endswith(b"echo: bye\r\n")
    assert host.states == ["shut down"]


async def test_ticker_stops_when_cancelled_and_qemu_is_reaped():
    host = RecordingHost()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(QemuEngine().run, inmate_spec("ticker"), host)
        await host.wait_for_output(b"tick 3\r\n")
        [qemu] = qemu_children(os.getpid())
        nursery.cancel_scope.cancel()
    # Cancellation finished only after QEMU was killed and reaped: no zombie either.
    assert not Path(f"/proc/{qemu}").exists()
    lines = host.output.decode().splitlines()
    assert lines[0] == "Hello from runphi inmate ticker"
    assert lines[1:4] == ["tick 1", "tick 2", "tick 3"]
    assert host.states == [] and host.parked == {}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_waiting_guest_sleeps_instead_of_spinning():
    host = RecordingHost()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(QemuEngine().run, inmate_spec("ticker"), host)
        await host.wait_for_output(b"tick 2\r\n")
        [qemu] = qemu_children(os.getpid())
        cpu_before, wall_before = cpu_seconds(qemu), time.monotonic()
        # Ten more ticks: one second of guest time spent mostly in WFI.
        await host.wait_for_output(b"tick 12\r\n")
        cpu_used, wall = cpu_seconds(qemu) - cpu_before, time.monotonic() - wall_before
        nursery.cancel_scope.cancel()
    assert cpu_used < 0.5 * wall, f"ticker's QEMU used {cpu_used:.2f}s of CPU in {wall:.2f}s"


async def test_crash_parks_every_cpu_with_the_faulting_address():
    host = await run_to_end("crash", cpus=(2, 3), name="crasher")
    assert host.output.decode() == (
        "Hello from runphi inmate crash\r\ncrash: storing to 0x0c000000 (unassigned)\r\n"
    )
    assert host.parked == {2: "Unhandled data write at 0xc000000(4)", 3: "Unhandled data write at 0xc000000(4)"}
    assert host.console[:2] == ["Unhandled data write at 0xc000000(4)", 'Parking CPU 2 (Cell: "crasher")']
    assert host.states == []
    assert qemu_children(os.getpid()) == []


async def test_guest_reset_fails_the_cell():
    host = await run_to_end("reset", cpus=(0, 1))
    assert host.output.decode().endswith("reset: requesting a system reset\r\n")
    assert host.parked == {0: "Unhandled guest system reset request", 1: "Unhandled guest system reset request"}
    assert host.states == []


async def test_flood_delivers_every_byte_in_order():
    host = await run_to_end("flood")
    header = f"Hello from runphi inmate flood\r\nflood: sending {inmates.FLOOD_BYTES} bytes\r\n".encode()
    trailer = f"\r\nflood: done {inmates.FLOOD_BYTES} bytes\r\n".encode()
    pattern = inmates.FLOOD_PATTERN * (inmates.FLOOD_BYTES // len(inmates.FLOOD_PATTERN) + 1)
    assert bytes(host.output) == header + pattern[: inmates.FLOOD_BYTES] + trailer
    assert host.states == ["shut down"]


async def test_four_cells_at_once_have_no_cross_talk():
    programs = ("hello", "echo", "ticker", "flood")
    hosts = {program: RecordingHost(program) for program in programs}
    finished: dict[str, trio.Event] = {program: trio.Event() for program in programs}

    async def run_cell(index: int, program: str, task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await QemuEngine().run(inmate_spec(program, cell_id=index + 1, cpus=(index,), name=program), hosts[program])
        finished[program].set()

    async with trio.open_nursery() as nursery:
        scopes = {p: await nursery.start(run_cell, i, p) for i, p in enumerate(programs)}
        await hosts["echo"].wait_for_output(b"> ")
        hosts["echo"].type(b"only for echo\r")
        await hosts["echo"].wait_for_output(b"only for echo\r\n")
        await hosts["ticker"].wait_for_output(b"tick 2\r\n")
        hosts["echo"].type(b"exit\r")
        with trio.fail_after(STEP_TIMEOUT):
            for program in ("hello", "echo", "flood"):
                await finished[program].wait()
        scopes["ticker"].cancel()

    for program, host in hosts.items():
        banners = [line for line in host.output.split(b"\r\n") if line.startswith(b"Hello from runphi inmate")]
        assert banners == [f"Hello from runphi inmate {program}".encode()]
    assert b"only for echo" not in hosts["ticker"].output + hosts["hello"].output + hosts["flood"].output
    assert [hosts[p].states for p in ("hello", "echo", "flood")] == [["shut down"]] * 3
    assert {cpu for (cpu, _kind) in hosts["flood"].vmexits} == {3}


async def test_bad_machine_fails_the_cell_with_qemus_reason():
    host = RecordingHost()
    with trio.fail_after(STEP_TIMEOUT):
        await QemuEngine(machine="no-such-machine").run(inmate_spec("hello", cpus=(1, 2)), host)
    assert set(host.parked) == {1, 2}
    assert "exited unexpectedly (status 1)" in host.parked[1]
    assert host.parked[1].endswith("qemu-system-aarch64: unsupported machine type")


async def test_missing_qemu_binary_is_one_clear_error():
    from tools.jailhouse_sim.engines.qemu_common import QemuEngineError

    with pytest.raises(QemuEngineError, match=r'cell "inmate": cannot run /nonexistent/qemu: .*JAILHOUSE_SIM_QEMU'):
        await QemuEngine(binary="/nonexistent/qemu").run(inmate_spec("hello"), RecordingHost())


async def test_qmp_client_commands_errors_and_events_against_real_qemu():
    ours, theirs = socket.socketpair()
    qemu = subprocess.Popen(
        [QEMU, "-M", "virt", "-nodefaults", "-display", "none", "-S",
         "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"],
        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    try:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        with trio.fail_after(STEP_TIMEOUT):
            client = await QmpClient.connect(stream)
            assert client.greeting.QMP.version.qemu["major"] >= 7
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.serve)
                status = await client.execute("query-status")
                assert status["running"] is False
                with pytest.raises(QmpError, match="CommandNotFound"):
                    await client.execute("no-such-command")
                await client.execute("quit")
                events = [event async for event in client.events]
        assert QmpEvent("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}) in events
        with pytest.raises(QmpError, match="closed"):
            await client.execute("query-status")
    finally:
        qemu.kill()
        qemu.wait()
        ours.close()


HOSTING_SCRIPT = textwrap.dedent(
    """
    import sys, trio
    sys.path.insert(0, sys.argv[1])
    from tools.jailhouse_sim.engine import GuestSpec, LoadedImage, RamRegion
    from tools.jailhouse_sim.engines.qemu import QemuEngine

    class PrintingHost:
        async def uart_write(self, data):
            sys.stdout.buffer.write(data); sys.stdout.flush()
        async def uart_read(self):
            await trio.sleep_forever()
        def set_state(self, state): pass
        def park_cpu(self, cpu, reason): pass
        def hv_print(self, line): pass
        def count_vmexits(self, cpu, kind, n=1): pass

    spec = GuestSpec("victim", 1, (1,), 0x70000000,
                     (LoadedImage(0x70000000, open(sys.argv[2], "rb").read()),),
                     (RamRegion(0x70000000, 0x8000000, 0x4f),), 0x09000000)
    trio.run(QemuEngine().run, spec, PrintingHost())
    """
)


def test_qemu_dies_with_the_process_hosting_the_engine():
    host = subprocess.Popen(
        [sys.executable, "-c", HOSTING_SCRIPT, str(REPO_ROOT), str(inmates.image_path("ticker"))],
        stdout=subprocess.PIPE,
    )
    try:
        # Wait for the guest's first tick: QEMU is running by then.
        seen = b""
        while b"tick 1" not in seen:
            chunk = host.stdout.read1(4096)
            assert chunk, f"engine host exited early: {host.wait()}"
            seen += chunk
        [qemu] = qemu_children(host.pid)
        host.send_signal(signal.SIGKILL)
        host.wait()
        # The kernel delivers the death signal asynchronously: watch /proc with a deadline.
        deadline = time.monotonic() + STEP_TIMEOUT
        while not process_is_dead(qemu):
            assert time.monotonic() < deadline, f"QEMU {qemu} outlived the process hosting its engine"
            time.sleep(0.01)
    finally:
        host.kill()
        host.wait()
        host.stdout.close()
