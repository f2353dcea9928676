"""The hypervisor console as a console slot (#22): which ZIC leases it, what its cell gets,
and how the ring's bytes become that ZIC's console.

Ledger and planner run against the shipped templates; the ring filter against byte
streams in the hypervisor's exact formats (jailhouse.md §4.7). The simulated boards and
containerd end to end are in tests/test_e2e_hv_console.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runphi import oci
from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.allocator import Allocator
from runphi.backends.jailhouse.plan import HYPERVISOR_CONSOLE_FLAGS, plan_cell
from runphi.backends.jailhouse.platform import load_platform
from runphi.backends.ledger import AllocationError, ResourceRequest, request_from
from runphi.console.hvconsole import RingFilter
from runphi.image import BootDescription
from tests.test_allocator import make_sysfs
from tests.test_lifecycle_harness import subreaper  # noqa: F401  (fixture)

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
REAL_BOARDS = ("qemu-arm64", "zcu102", "zcu104", "kria-kv260")


def allocator_for(platform_name: str, tmp_path: Path) -> Allocator:
    platform = load_platform(platform_name, TEMPLATES)
    cpus = ",".join(str(c) for c in sorted(platform.cell_cpu_set | {0}))
    return Allocator(platform, tmp_path / "state", make_sysfs(tmp_path, cpus))


def boot(console: str = "") -> BootDescription:
    return BootDescription(source=Path("/c"), inmate=Path("/b"), console=console)


@pytest.mark.parametrize("name", REAL_BOARDS)
def test_every_real_board_offers_the_hypervisor_console_and_it_is_their_default(name):
    platform = load_platform(name, TEMPLATES)
    assert platform.offers_hypervisor_console
    assert platform.default_console == "hypervisor"  # their UARTs do not reach the root
    assert platform.hypervisor_console.host_device({}) == "/dev/jailhouse"
    assert platform.hypervisor_console.host_device({"sim_root": "/sim"}) == "/sim/dev/jailhouse"


def test_the_simulator_board_keeps_its_uart_slots_as_default():
    assert load_platform("sim-qemu-arm64", TEMPLATES).default_console == "uart"


@pytest.mark.parametrize("name", REAL_BOARDS)
def test_one_zic_at_a_time_leases_it_and_only_its_cell_gets_the_flags(name, tmp_path):
    allocator = allocator_for(name, tmp_path)
    platform = allocator.platform
    first = allocator.allocate("first", request_from(None, boot(), platform))
    assert first.hypervisor_console
    cell = plan_cell(platform, first, boot(), "first")
    assert cell.flags & HYPERVISOR_CONSOLE_FLAGS == HYPERVISOR_CONSOLE_FLAGS
    with pytest.raises(AllocationError, match="the hypervisor console is leased to container first") as refused:
        allocator.allocate("second", request_from(None, boot(), platform))
    assert "org.runphi.console-optional=true" in str(refused.value)
    quiet = allocator.allocate("quiet", request_from(None, boot("none"), platform))
    assert not quiet.hypervisor_console
    assert plan_cell(platform, quiet, boot("none"), "quiet").flags & cc.CELL_VIRTUAL_CONSOLE_ACTIVE == 0
    allocator.release("first")
    assert allocator.allocate("second", request_from(None, boot(), platform)).hypervisor_console


def test_the_optional_annotation_runs_a_second_zic_without_a_console(tmp_path):
    allocator = allocator_for("zcu102", tmp_path)
    allocator.allocate("first", request_from(None, boot(), allocator.platform))
    config = oci.Config(oci_version="1.0.2", annotations={"org.runphi.console-optional": "true"})
    second = allocator.allocate("second", request_from(config, boot(), allocator.platform))
    assert not second.hypervisor_console and second.uart_slot is None


def test_on_the_simulator_board_a_zic_asks_for_it_and_gets_no_uart_slot(tmp_path):
    allocator = allocator_for("sim-qemu-arm64", tmp_path)
    leased = allocator.allocate("hv", request_from(None, boot("hypervisor"), allocator.platform))
    assert leased.hypervisor_console and leased.uart_slot is None
    cell = plan_cell(allocator.platform, leased, boot("hypervisor"), "hv")
    uarts = {slot.phys for slot in allocator.platform.uarts}
    assert not any(region.phys_start in uarts for region in cell.memory_regions)
    assert allocator.allocate("uart", ResourceRequest()).uart_slot == 0


def test_kvm_does_not_offer_it(tmp_path):
    from runphi.backends.kvm.host import load_host
    from runphi.config import shipped_templates_dir

    host = load_host(shipped_templates_dir() / "kvm" / "kvm-host.toml")
    assert not host.offers_hypervisor_console and host.default_console == "uart"


# ---- the ring's bytes → the ZIC's console ----------------------------------------------------


def filtered(*chunks: bytes, cell: str = "web") -> tuple[bytes, int]:
    missed: list[int] = []
    ring = RingFilter(cell, missed.append)
    out = b"".join(ring.feed(chunk) for chunk in chunks) + ring.flush()
    return out, sum(missed)


def test_history_before_the_cells_creation_and_the_hypervisors_lines_are_not_the_zics():
    out, missed = filtered(
        b"\nInitializing Jailhouse hypervisor v0.12 on CPU 0\nCode location: 0x0000ffffc0200800\n",
        b'Created cell "older"\nold tenant says hi\r\nClosing cell "older"\n',
        b'Adding virtual PCI device 00:01.0 to cell "web"\nShared memory connection established, peer cells:\n',
        b' "sim-qemu-arm64"\nCreated cell "web"\nPage pool usage after cell creation: mem 234/1000, remap 40/1024\n',
        b'Cell "web" can be loaded\nStarted cell "web"\nHel', b"lo from web\r\n",
        b"Unhandled data write at 0xdead(4)\nParking CPU 2 (Cell: \"web\")\n")
    assert (out, missed) == (b"Hello from web\r\n", 0)


def test_missed_bytes_are_counted_as_dropped_and_what_follows_is_the_zics():
    out, missed = filtered(b"<missed 4096 bytes of console log>\nflood 0123\r\n")
    assert (out, missed) == (b"flood 0123\r\n", 4096)


def test_a_prompt_without_newline_is_passed_on_when_the_ring_is_quiet():
    missed: list[int] = []
    ring = RingFilter("web", missed.append)
    assert ring.feed(b'Created cell "web"\nlogin: ') == b""
    assert ring.flush() == b"login: "


def test_a_missed_note_after_a_partial_line_still_counts():
    out, missed = filtered(b'Created cell "web"\n0123456789', b"ABC<missed 70000 bytes of console log>\nxyz\r\n")
    assert (out, missed) == (b"0123456789ABCxyz\r\n", 70000)


# ---- through the runphi CLI, on the simulator's zcu102 ----------------------------------------


@pytest.fixture(scope="module")
def zcu102_board(subreaper):  # noqa: F811
    from tests.test_lifecycle_harness import board_in_tempdir

    with board_in_tempdir(model="zcu102") as board:
        yield board


@pytest.fixture
def zcu102(zcu102_board, tmp_path):
    from tests.test_lifecycle_harness import zic_on

    with zic_on(zcu102_board, tmp_path, {"RUNPHI_PLATFORM": "zcu102"}) as zic:
        yield zic


TICKING = b"#!jailhouse-sim-inmate\nconsole up\\n\ntick 100 tick\n"
AT_RESET = {"starting_vaddress": None}


def test_a_terminal_on_the_hypervisor_console_is_refused_with_one_line(zcu102):
    bundle = zcu102.bundle("tty", TICKING, terminal=True, boot=AT_RESET)
    done = zcu102.run("create", "--bundle", str(bundle), "--console-socket", str(zcu102.base / "no.sock"), "tty")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "hypervisor console, which is output only" in done.stderr
    assert zcu102.board.cells() == {}
    ledger = zcu102.node / "jailhouse-ledger.json"
    assert not ledger.exists() or '"allocations":{}' in ledger.read_text().replace(" ", "")


def test_with_the_optional_annotation_a_second_zic_runs_without_a_console_and_says_so(zcu102):
    zcu102.create("holder", zcu102.bundle("holder", TICKING, boot=AT_RESET))
    refused = zcu102.run("create", "--bundle", str(zcu102.bundle("plain", TICKING, boot=AT_RESET)), "plain")
    assert refused.returncode == 1 and "leased to container holder" in refused.stderr, refused.stderr
    optional = zcu102.bundle("optional", TICKING, boot=AT_RESET,
                             annotations={"org.runphi.console-optional": "true"})
    pid_file = zcu102.base / "optional.pid"
    done = zcu102.run("create", "--bundle", str(optional), "--pid-file", str(pid_file), "optional")
    assert done.returncode == 0, done.stderr
    zcu102.monitors.append(int(pid_file.read_text()))
    assert "optional runs without a console" in done.stderr
