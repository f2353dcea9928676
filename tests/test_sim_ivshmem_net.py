"""The simulator's stand-in for ivshmem-net: a cell's virtual-ethernet link to the root cell
is a tap in the simulator's network namespace, published under ``sys/bus/pci/devices``, gone
with the cell; under the QEMU engine it is the guest's virtio-net NIC.

Cells come from runphi's own planner (``net: true`` is one VETH ivshmem link). Every test
that makes a tap runs the simulator inside a network namespace it makes (``SimBoard``'s
``netns``), so no tap ever appears in the machine's own namespace, and the only addresses
used are link-local ones inside it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest

from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.allocator import Allocation, Allocator, ResourceRequest
from runphi.backends.jailhouse.plan import plan_cell
from runphi.backends.jailhouse.platform import MiB, load_platform
from tools.jailhouse_sim.engine import GuestNic, GuestSpec, LinuxBoot
from tools.jailhouse_sim.engines.qemu import qemu_argv
from tools.jailhouse_sim.engines.qemu_common import nic_fds
from tools.jailhouse_sim.engines.qemu_linux import linux_argv
from tools.jailhouse_sim.netdev import Link, guest_mac
from tools.jailhouse_sim.testing import SimBoard

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
TAP_NAME = re.compile(r"ivshmnet\d+")
FIRST_LINK, SECOND_LINK = "0001:00:01.0", "0001:00:02.0"
IFF_UP = 0x1
CAP_NET_ADMIN = 12


# ---------------------------------------------------------------- fixtures and helpers


def network_unavailable() -> str | None:
    """Why this host cannot make taps in namespaces (to skip with), or None."""
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun on this host (the kernel's tun driver)"
    found = re.search(r"^CapEff:\s*([0-9a-f]+)$", Path("/proc/self/status").read_text(), re.M)
    if found is None or not int(found.group(1), 16) >> CAP_NET_ADMIN & 1:
        return "making network namespaces and taps needs CAP_NET_ADMIN"
    return None


@contextmanager
def own_namespace(role: str) -> Iterator[str]:
    """A network namespace of the test's own (new links get no IPv6), removed afterwards."""
    from pyroute2 import netns

    name = f"rphi-simnet-{role}-{os.getpid()}"
    netns.create(name)
    try:
        if Path("/proc/sys/net/ipv6").is_dir():
            subprocess.run(["nsenter", f"--net=/run/netns/{name}", "sh", "-c",
                            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"], check=True)
        yield name
    finally:
        netns.remove(name)


@pytest.fixture
def namespace() -> Iterator[str]:
    reason = network_unavailable()
    if reason:
        pytest.skip(reason)
    with own_namespace("board") as name:
        yield name


@pytest.fixture
def sim(namespace: str, tmp_path: Path) -> Iterator[SimBoard]:
    with SimBoard.running(tmp_path / "sim", netns=namespace) as board:
        yield board


class Planner:
    """runphi's planner for the simulator's board, writing ``.cell`` files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.platform = load_platform("sim-qemu-arm64", TEMPLATES)
        sysfs = directory / "planner-sysfs"
        (sysfs / "cells" / "0").mkdir(parents=True)
        (sysfs / "cells" / "0" / "cpus_assigned_list").write_text("0-7\n")
        self.allocator = Allocator(self.platform, directory / "planner-state", sysfs)

    def cell(self, name: str, *, network: bool, memory: int = 16 * MiB, **changes) -> tuple[Path, Allocation]:
        """Plan cell ``name`` (``changes`` replace fields of the config, ``pci`` those of its one
        PCI device) and write it; its file and allocation."""
        allocation = self.allocator.allocate(name, ResourceRequest(memory=memory, network=network))
        config = plan_cell(self.platform, allocation, None, name)
        if "pci" in changes:
            (device,) = config.pci_devices
            changes["pci_devices"] = (msgspec.structs.replace(device, **changes.pop("pci")),)
        path = self.directory / f"{name}.cell"
        path.write_bytes(cc.write_cell(msgspec.structs.replace(config, **changes), self.platform.profile))
        return path, allocation


@pytest.fixture
def planner(tmp_path: Path) -> Planner:
    return Planner(tmp_path)


def taps(namespace: str) -> dict[str, dict]:
    """Every link in ``namespace`` but ``lo``: name -> index, MAC, flags and IPv4/IPv6 addresses."""
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace, flags=0) as ipr:
        found = {}
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name != "lo":
                addresses = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=link["index"])]
                found[name] = {"index": link["index"], "mac": link.get_attr("IFLA_ADDRESS"),
                               "flags": link["flags"], "addresses": addresses}
        return found


def published(sim: SimBoard) -> dict[str, tuple[str, int, str]]:
    """``sys/bus/pci/devices/<dev>/net/<if>``: device -> (interface, ifindex, address)."""
    devices = sim.layout.pci_bus / "devices"
    entries = {}
    for net in sorted(devices.glob("*/net/*")):
        entries[net.parent.parent.name] = (net.name, int((net / "ifindex").read_text()),
                                           (net / "address").read_text().removesuffix("\n"))
    return entries


def expect_published(sim: SimBoard, namespace: str, devices: list[str]) -> dict[str, dict]:
    """Exactly ``devices`` have a tap each, named from the pattern, DOWN and without addresses,
    published with its ifindex and MAC; the taps by name."""
    found = taps(namespace)
    entries = published(sim)
    assert sorted(entries) == sorted(devices)
    assert sorted(found) == sorted(name for name, _, _ in entries.values())
    for name, ifindex, address in entries.values():
        assert TAP_NAME.fullmatch(name), name
        assert (found[name]["index"], found[name]["mac"]) == (ifindex, address)
        assert not found[name]["flags"] & IFF_UP and found[name]["addresses"] == []
        assert name not in {host_name for _, host_name in socket.if_nameindex()}
    return found


# ---------------------------------------------------------------- the tap's life


def test_a_veth_link_to_the_root_is_a_tap_published_like_a_pci_netdev_until_destroy(sim, namespace, planner):
    cell, _ = planner.cell("web", network=True)
    sim.jailhouse("cell", "create", cell).check()
    expect_published(sim, namespace, [FIRST_LINK])
    assert "ivshmem-net" not in sim.kernel_log()

    sim.jailhouse("cell", "destroy", "web").check()
    assert taps(namespace) == {} and published(sim) == {}


def test_two_links_are_two_taps_and_disable_removes_both(sim, namespace, planner):
    for name in ("one", "two"):
        sim.jailhouse("cell", "create", planner.cell(name, network=True)[0]).check()
    found = expect_published(sim, namespace, [FIRST_LINK, SECOND_LINK])
    assert len({tap["index"] for tap in found.values()}) == 2

    sim.jailhouse("disable").check()
    assert taps(namespace) == {} and published(sim) == {}


@pytest.mark.parametrize("changes", [
    {"network": False},
    {"network": True, "pci": {"shmem_protocol": cc.SHMEM_PROTO_UNDEFINED}},
    {"network": True, "pci": {"bdf": 3 << 3}},  # a bdf the root cell has no endpoint at
], ids=["no-ivshmem", "not-veth", "no-root-peer"])
def test_a_cell_without_a_veth_link_to_the_root_gets_no_tap(sim, namespace, planner, changes):
    sim.jailhouse("cell", "create", planner.cell("quiet", **changes)[0]).check()
    assert sim.state(1) == "shut down"
    assert taps(namespace) == {} and published(sim) == {}
    assert "ivshmem-net" not in sim.kernel_log()


def test_a_tap_moved_to_another_namespace_still_goes_with_its_cell(sim, namespace, planner):
    from pyroute2 import IPRoute

    sim.jailhouse("cell", "create", planner.cell("moved", network=True)[0]).check()
    (name,) = expect_published(sim, namespace, [FIRST_LINK])
    with own_namespace("elsewhere") as elsewhere:
        with IPRoute(netns=namespace, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], net_ns_fd=f"/run/netns/{elsewhere}")
        assert taps(namespace) == {} and list(taps(elsewhere)) == [name]

        sim.jailhouse("cell", "destroy", "moved").check()
        assert taps(elsewhere) == {} and published(sim) == {}


def test_a_tap_that_cannot_be_made_is_one_kernel_log_line_and_the_cell_lives(namespace, planner, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("JAILHOUSE_SIM_NETDEV_NAME", "bad/name%d")  # the kernel refuses '/' in a name
    with SimBoard.running(tmp_path / "sim", netns=namespace) as sim:
        sim.jailhouse("cell", "create", planner.cell("nodriver", network=True)[0]).check()
        assert sim.state(1) == "shut down"
        assert taps(namespace) == {} and published(sim) == {}
        lines = [line for line in sim.kernel_log().splitlines() if line.startswith("ivshmem-net")]
        assert lines == [f"ivshmem-net {FIRST_LINK}: cannot register net device: Invalid argument"]
        sim.jailhouse("cell", "destroy", "nodriver").check()


def test_the_taps_go_with_the_daemon_whether_it_stops_or_is_killed(namespace, planner, tmp_path):
    cell, _ = planner.cell("orphan", network=True)
    sim = SimBoard.start(tmp_path / "sim", netns=namespace)
    try:
        sim.jailhouse("cell", "create", cell).check()
        expect_published(sim, namespace, [FIRST_LINK])
    finally:
        sim.stop()
    assert taps(namespace) == {} and not sim.layout.pci_bus.exists()

    with SimBoard.running(tmp_path / "sim", netns=namespace) as sim:
        sim.jailhouse("cell", "create", cell).check()
        expect_published(sim, namespace, [FIRST_LINK])
        sim.kill()
        assert taps(namespace) == {}  # the kernel closed the daemon's descriptor
        assert list(published(sim)) == [FIRST_LINK]  # as after a crash, until `down`
    assert not sim.layout.pci_bus.exists()


# ---------------------------------------------------------------- what QEMU is given


NIC = GuestNic(fd=0, mac=guest_mac("web", Link(1, 8)))
SPEC = GuestSpec("web", 1, (1,), 0x70000000, (), (), 0x09000000, nics=(NIC, GuestNic(fd=0, mac="02:00:00:00:00:02")))


def test_each_nic_is_a_virtio_mmio_net_device_on_its_tap_descriptor():
    expected = ["-netdev", "tap,id=net0,fd=7,vhost=off",
                "-device", f"virtio-net-device,netdev=net0,mac={NIC.mac}",
                "-netdev", "tap,id=net1,fd=9,vhost=off",
                "-device", "virtio-net-device,netdev=net1,mac=02:00:00:00:00:02"]
    raw = qemu_argv(SPEC, binary="qemu", machine="virt", cpu="a53", image_fds=[], uart_fd=3, qmp_fd=4,
                    net_fds=[7, 9])
    linux = linux_argv(SPEC, LinuxBoot(b"", None, ""), binary="qemu", machine="virt", cpu="a53", kernel_fd=5,
                       initrd_fd=None, uart_fd=3, qmp_fd=4, net_fds=[7, 9])
    for argv in (raw, linux):
        start = argv.index("-netdev")
        assert argv[start:start + 8] == expected
        assert "-nodefaults" in argv
    no_nics = GuestSpec("web", 1, (1,), 0x70000000, (), (), None)
    assert "-netdev" not in qemu_argv(no_nics, binary="qemu", machine="virt", cpu="a53", image_fds=[], uart_fd=3,
                                      qmp_fd=4)


def test_the_guest_mac_is_stable_locally_administered_unicast_and_per_link():
    mac = guest_mac("web", Link(1, 8))
    first = int(mac.split(":")[0], 16)
    assert mac == guest_mac("web", Link(1, 8)) and re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac)
    assert first & 0b10 and not first & 0b01
    assert len({mac, guest_mac("web", Link(1, 16)), guest_mac("db", Link(1, 8))}) == 3


def test_each_start_gets_its_own_duplicate_of_the_tap_closed_afterwards(tmp_path):
    with open(tmp_path / "stand-in", "w") as held:
        spec = GuestSpec("web", 1, (1,), 0, (), (), None, nics=(GuestNic(held.fileno(), NIC.mac),))
        with nic_fds(spec) as fds:
            (dup,) = fds
            assert dup != held.fileno() and os.path.samestat(os.fstat(dup), os.fstat(held.fileno()))
            assert not os.get_inheritable(dup)
        with pytest.raises(OSError):
            os.fstat(dup)
        os.fstat(held.fileno())  # the daemon's own descriptor stays open


# ---------------------------------------------------------------- a Linux guest on its link


HOST, GUEST, PREFIX = "169.254.77.1", "169.254.77.2", 30
BOOT_TIMEOUT = 120.0  # seconds: a 2-core CI machine running other QEMUs too


@pytest.fixture(scope="module")
def linux_guest():
    from tools.linux_guest.testing import guest_or_skip

    return guest_or_skip()


def read_until(port, text: str, timeout: float = BOOT_TIMEOUT) -> None:
    """Read the cell's UART until ``text`` arrives (failing with the UART's tail)."""
    port.timeout = timeout
    data = port.read_until(text.encode())
    assert data.endswith(text.encode()), f"{text!r} not seen within {timeout:g} s; UART tail:\n" \
                                          f"{data[-3000:].decode(errors='replace')}"


def open_uart(sim: SimBoard, index: int):
    """The cell's UART pty, raw (the guest echoes), opened before the guest prints."""
    import termios
    import tty

    import serial

    port = serial.Serial(str(sim.uart(index)), baudrate=115200)
    tty.setraw(port.fileno(), termios.TCSANOW)
    return port


def configure_host_end(namespace: str, name: str) -> None:
    """The root side's job: the host address on the tap, and the tap up."""
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace, flags=0) as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        ipr.addr("add", index=index, address=HOST, prefixlen=PREFIX)
        ipr.link("set", index=index, state="up")


@pytest.mark.qemu
def test_a_linux_cell_serves_its_page_over_the_tap_across_restarts(namespace, planner, tmp_path, monkeypatch,
                                                                   linux_guest):
    import trio

    from tools.jailhouse_sim.cell_linux import INMATE_DTB_PATH
    from tools.linux_guest import HTTP_PAGE, net_argument, net_ready_line
    from tools.linux_guest.testing import http_get_in

    monkeypatch.setenv("JAILHOUSE_SIM_LINUX_POWERDOWN_S", "20")
    cell, allocation = planner.cell("linux-web", network=True, memory=128 * MiB, cpu_reset_address=0)
    cmdline = f"console=ttyAMA0 {net_argument(f'{GUEST}/{PREFIX}', HOST)}"
    with SimBoard.running(tmp_path / "sim", engine="qemu", netns=namespace) as sim, \
            open_uart(sim, allocation.uart_slot + 1) as port:
        booted = sim.jailhouse("cell", "linux", cell, linux_guest.kernel, "-d", sim.layout.root / INMATE_DTB_PATH,
                               "-i", linux_guest.initrd, "-c", cmdline, timeout=60)
        assert (booted.returncode, booted.stderr) == (0, "")
        (tap,) = expect_published(sim, namespace, [FIRST_LINK])
        configure_host_end(namespace, tap)
        for start in ("first", "second"):
            read_until(port, net_ready_line(f"{GUEST}/{PREFIX}"))
            assert trio.run(http_get_in, namespace, GUEST) == (200, HTTP_PAGE.encode()), start
            if start == "first":
                # QEMU starts again on the same tap: its copy went with the first QEMU.
                sim.jailhouse("cell", "shutdown", "linux-web", timeout=60).check()
                assert list(taps(namespace)) == [tap]
                sim.jailhouse("cell", "start", "linux-web").check()
        sim.jailhouse("cell", "destroy", "linux-web", timeout=60).check()
        assert taps(namespace) == {} and published(sim) == {}


# ---------------------------------------------------------------- raw images: which QEMU holds which tap


IDLE_LOOP = bytes.fromhex("7f2003d5ffffff17")  # aarch64: wfi; b .-4


def qemus_holding_taps(parent: int) -> dict[int, list[str]]:
    """Live QEMU children of ``parent``: pid -> the taps it holds (tun's fdinfo ``iff:`` line)."""
    held = {}
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if not fields.get("Name", "").startswith("qemu-system") or fields.get("PPid") != str(parent):
                continue
            if fields["State"].startswith(("Z", "X")):
                continue
            infos = [info.read_text() for info in (entry / "fdinfo").iterdir()]
        except OSError:  # the process ended while we looked
            continue
        held[int(entry.name)] = sorted(line.split("\t", 1)[1] for info in infos for line in info.splitlines()
                                       if line.startswith("iff:\t"))
    return held


def wait_for_qemus(sim: SimBoard, count: int, timeout: float = 20.0) -> dict[int, list[str]]:
    """Poll until the daemon has ``count`` QEMU children that hold their taps; them."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        held = qemus_holding_taps(sim.pid)
        if len(held) == count and all(held.values()):
            return held
        assert time.monotonic() < deadline, f"QEMUs of the daemon after {timeout:g} s: {held}"
        time.sleep(0.02)


@pytest.mark.qemu
def test_each_cells_qemu_holds_its_own_tap_only_and_a_restart_holds_it_again(namespace, planner, tmp_path):
    import shutil

    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 not found (Debian: qemu-system-arm)")
    image = tmp_path / "idle.bin"
    image.write_bytes(IDLE_LOOP)
    with SimBoard.running(tmp_path / "sim", engine="qemu", netns=namespace) as sim:
        for name in ("one", "two"):
            sim.jailhouse("cell", "create", planner.cell(name, network=True)[0]).check()
            sim.jailhouse("cell", "load", name, image, "-a", "0x70000000").check()
            sim.jailhouse("cell", "start", name).check()
        found = expect_published(sim, namespace, [FIRST_LINK, SECOND_LINK])
        first, second = (published(sim)[device][0] for device in (FIRST_LINK, SECOND_LINK))
        assert sorted(held[0] for held in wait_for_qemus(sim, 2).values()) == sorted(found) == sorted([first, second])
        assert all(len(held) == 1 for held in qemus_holding_taps(sim.pid).values())

        sim.jailhouse("cell", "load", "one", image, "-a", "0x70000000").check()  # stops its QEMU
        sim.jailhouse("cell", "start", "one").check()
        assert sorted(held[0] for held in wait_for_qemus(sim, 2).values()) == sorted([first, second])
        assert sim.state(1) == "running"

        sim.jailhouse("cell", "destroy", "one").check()
        assert list(taps(namespace)) == [second] and list(published(sim)) == [SECOND_LINK]
        assert list(wait_for_qemus(sim, 1).values()) == [[second]]
