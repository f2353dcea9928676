"""net: HTTP through a pod's IP to a networked Linux ZIC vs the same to busybox httpd under runc.

    python -m tools.bench.net [--quick]      (or: python -m tools.bench net)

For each backend in one run (the KVM backend, then the Jailhouse simulator with its
QEMU engine) a private containerd in shim mode on runphi installed by
``target/install.sh`` (as the ``shim`` and ``kvm`` suites install it), and two pods on
a network the bench makes, standing in for a CNI bridge:

* a **node** network namespace holding a Linux bridge (:data:`GATEWAY`/24); containerd
  runs in it (``nsenter --net``), and on Jailhouse the simulator's daemon too, so the
  link devices they make stay there;
* per pod a network namespace whose ``eth0`` (one end of a veth, the other end on the
  bridge) has an address of :data:`SUBNET` and a default route via the bridge.

Pod A runs the networked Linux ZIC (``python -m tools.linux_guest zic --net``, imported
into containerd) by ``ctr run --with-ns network:/run/netns/<pod A>``: runphi puts its
link into the pod (KVM: a tap redirected to and from ``eth0``, the guest *is* the pod's
address; Jailhouse: the link device moved into the pod and the pod's IP NATed to the
guest). Pod B runs busybox ``httpd -f -p 80 -h /www`` in a plain runc container
(``io.containerd.runc.v2``, a busybox rootfs) joined the same way, serving the same
``index.html`` and the same CGI script as the guest
(:data:`tools.linux_guest.initramfs.HTTP_BULK_SCRIPT`), so both do the same work.

The client is a thread of this process that entered the node's namespace; like ``curl``
it opens a fresh TCP connection per request (HTTP/1.0, ``TCP_NODELAY``) and times from
before ``connect`` to the end of the body. Measured, with ZIC and runc alternating (the
order flipping every round so that drift reaches both):

* ``GET /`` (the guest's known page, 160 bytes): p50 and p99 latency of each and their
  ratios ZIC / runc;
* ``GET`` of the 10 MiB CGI body (zeros streamed from ``/dev/zero`` by busybox ``dd``):
  MiB/s of each and the ratio of the medians.

Readiness is observed, not slept on: the guest's console line (:data:`NET_READY_MESSAGE`
in the ctr log file), then a successful ``GET /`` against a deadline. No budget (issue
#20 asks for the numbers and their ratios): values are series, ratios are info lines.
Checks: every response was 200 with the exact bytes; afterwards no container, cell,
ledger entry, link record, link device or nftables table is left on either node, no
runphi process, no namespace of the bench in ``/run/netns``, and no runphi tap
(``rphi*``) or simulator link device (``ivshmnet*``) appeared in this machine's own
namespace. Every packet stays in the bench's namespaces, on 169.254.0.0/16.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from runphi.backends.links import run_in_namespace
from tools.jailhouse_sim.engines.qemu import DEFAULT_BINARY
from tools.linux_guest.initramfs import (HTTP_BULK_PATH, HTTP_BULK_SCRIPT, HTTP_BULK_SIZE, HTTP_PAGE, HTTP_PORT,
                                         NET_FAILED_MESSAGE, NET_READY_MESSAGE)

from .e2e import _containerd_fixture
from .harness import Check, Options, Series, Skip, SuiteResult, standalone
from .kvm import kvm_cells, ledger_allocations
from .shim import REPO, Installed, install_runphi, stop_node_processes, user_env
from .zic import scratch_dir

if TYPE_CHECKING:
    from tools.jailhouse_sim.testing import SimBoard
    from tools.testbed.containerd import PrivateContainerd


SUBNET = ipaddress.IPv4Network("169.254.210.0/24")
GATEWAY = "169.254.210.1"
BRIDGE = "bnbr0"
IMAGE = "docker.io/library/runphi-linux-guest:bench-net"
ZIC_RUNTIME = "io.containerd.runphi.v2"
#: backend label -> (runphi's backend, host number of its ZIC pod in SUBNET; the runc pod is the next).
BACKENDS = {"KVM backend": ("kvm", 2), "simulator (QEMU engine)": ("jailhouse", 4)}
ZIC, RUNC = "ZIC", "runc"
GUEST_TIMEOUT = 180.0  # seconds: a Linux guest boots in seconds under KVM, tens of seconds under TCG
REQUEST_TIMEOUT = 60.0
RETRY_INTERVAL = 0.05
PAGE = HTTP_PAGE.encode()
MIB = 1024 * 1024
#: Names of the link devices runphi (KVM: ``rphi<hash>`` taps) and the simulator (``ivshmnet<n>``) make.
LINK_PREFIXES = ("rphi", "ivshmnet")


def require() -> None:
    """Skip with the reason when containerd/runc/busybox, QEMU, the Linux guest, nft or tun is missing."""
    from tools.linux_guest.testing import guest_unavailable

    _containerd_fixture()
    if shutil.which(DEFAULT_BINARY) is None:
        raise Skip(f"{DEFAULT_BINARY} is not installed")
    if reason := guest_unavailable():
        raise Skip(f"Linux guest: {reason}")
    if shutil.which("nft") is None:
        raise Skip("nft is not installed (the Jailhouse backend NATs the pod's IP with nftables)")
    if not Path("/dev/net/tun").exists():
        raise Skip("no /dev/net/tun (the kernel's tun driver)")


# ---- the network: a node namespace with a bridge, pods on veths -------------------------------------


class Pod(NamedTuple):
    namespace: str
    address: str


class Network:
    """The bench's stand-in for a CNI bridge network (see the module docstring); every
    namespace it made is removed by :meth:`close` (the bridge and veths go with them)."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"rphi-bnet-{tag}-"
        self.node = f"{self.prefix}node"
        self.made: list[str] = []

    def __enter__(self) -> Network:
        from pyroute2 import IPRoute

        self._namespace(self.node)
        try:
            with IPRoute(netns=self.node, flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.link("add", ifname=BRIDGE, kind="bridge")
                index = ipr.link_lookup(ifname=BRIDGE)[0]
                ipr.addr("add", index=index, address=GATEWAY, prefixlen=SUBNET.prefixlen)
                ipr.link("set", index=index, state="up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _namespace(self, name: str) -> None:
        from pyroute2 import netns

        netns.create(name)
        self.made.append(name)

    def add_pod(self, role: str, host: int) -> Pod:
        """Namespace ``<prefix><role>`` whose ``eth0`` is host ``host`` of :data:`SUBNET`, on the bridge."""
        from pyroute2 import IPRoute

        pod = Pod(f"{self.prefix}{role}", str(SUBNET[host]))
        self._namespace(pod.namespace)
        outside = f"vbn{host}"
        with IPRoute(netns=self.node, flags=0) as ipr:
            ipr.link("add", ifname=outside, kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": f"/run/netns/{pod.namespace}"})
            index = ipr.link_lookup(ifname=outside)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")
        with IPRoute(netns=pod.namespace, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address=pod.address, prefixlen=SUBNET.prefixlen)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY)
        return pod

    def remove(self, namespace: str) -> None:
        from pyroute2 import netns

        if namespace in self.made:
            self.made.remove(namespace)
            if Path(f"/run/netns/{namespace}").exists():
                netns.remove(namespace)

    def close(self) -> None:
        for namespace in reversed(list(self.made)):
            self.remove(namespace)

    def left(self) -> list[str]:
        """Namespaces of this network still in /run/netns."""
        directory = Path("/run/netns")
        return sorted(p.name for p in directory.iterdir() if p.name.startswith(self.prefix)) \
            if directory.is_dir() else []


def links(namespace: str | None = None) -> list[str]:
    """Interface names in network namespace ``namespace`` (None: this process's own)."""
    from pyroute2 import IPRoute

    where = {"netns": namespace, "flags": 0} if namespace else {}
    with IPRoute(**where) as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def link_devices(namespace: str | None = None) -> list[str]:
    """runphi's and the simulator's link devices in ``namespace`` (None: this process's own)."""
    return sorted(name for name in links(namespace) if name.startswith(LINK_PREFIXES))


def nft_tables(namespace: str) -> str:
    """``nft list tables`` inside ``namespace``."""
    done = subprocess.run(["nsenter", f"--net=/run/netns/{namespace}", "nft", "list", "tables"],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else f"nft failed: {done.stderr.strip()}"


# ---- HTTP, as curl does it: a fresh connection per request -----------------------------------------


class Response(NamedTuple):
    status: int
    body: bytes
    seconds: float


def http_get(address: str, path: str, timeout: float = REQUEST_TIMEOUT) -> Response:
    """``GET path`` (HTTP/1.0) on a new TCP connection to ``address``:80, read to EOF; seconds from
    before ``connect`` to the last byte. ``address`` must be in :data:`SUBNET`."""
    if ipaddress.IPv4Address(address) not in SUBNET:
        raise ValueError(f"{address} is not in the bench's network {SUBNET}")
    request = f"GET {path} HTTP/1.0\r\nHost: {address}\r\nUser-Agent: runphi-bench\r\nAccept: */*\r\n\r\n"
    chunks = []
    start = time.perf_counter()
    with socket.create_connection((address, HTTP_PORT), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request.encode())
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    seconds = time.perf_counter() - start
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
        raise RuntimeError(f"not an HTTP response from {address}: {head[:200]!r}")
    return Response(int(status[1]), body, seconds)


def wait_for_page(namespace: str, address: str, deadline: float) -> None:
    """From inside ``namespace``: ``GET /`` until it answers the known page (refused or silent
    until the server listens), against ``deadline`` (``time.monotonic``)."""
    def attempt() -> None:
        while True:
            try:
                if http_get(address, "/", timeout=5.0)[:2] == (200, PAGE):
                    return
                why = "a wrong answer"
            except OSError as exc:
                why = str(exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no page from {address} before the deadline (last: {why})")
            time.sleep(RETRY_INTERVAL)

    run_in_namespace(namespace, attempt)


class Measured(NamedTuple):
    """Samples by target name: latency seconds, bulk MiB/s; and every wrong answer."""

    latency: dict[str, list[float]]
    bulk: dict[str, list[float]]
    wrong: list[str]


def measure(targets: dict[str, str], requests: int, warmup: int, bulk: int) -> Measured:
    """The interleaved rounds (run in the node's namespace): ``warmup + requests`` rounds of
    ``GET /`` per target, then ``bulk`` rounds of the bulk GET; the order flips every round."""
    measured = Measured({name: [] for name in targets}, {name: [] for name in targets}, [])
    names = list(targets)
    for number in range(warmup + requests):
        for name in names if number % 2 == 0 else names[::-1]:
            response = http_get(targets[name], "/")
            if (response.status, response.body) != (200, PAGE):
                measured.wrong.append(f"{name} GET /: {response.status}, {response.body[:80]!r}")
            if number >= warmup:
                measured.latency[name].append(response.seconds)
    for number in range(bulk):
        for name in names if number % 2 == 0 else names[::-1]:
            response = http_get(targets[name], HTTP_BULK_PATH)
            if response.status != 200 or len(response.body) != HTTP_BULK_SIZE \
                    or response.body.count(0) != HTTP_BULK_SIZE:
                measured.wrong.append(f"{name} GET {HTTP_BULK_PATH}: {response.status}, "
                                      f"{len(response.body)} bytes")
            measured.bulk[name].append(len(response.body) / MIB / response.seconds)
    return measured


# ---- what runs: the image, the runc rootfs, a node, the two containers ------------------------------


def build_image(archive: Path) -> Path:
    """``python -m tools.linux_guest zic --net``: the networked Linux ZIC as an image archive."""
    done = subprocess.run([sys.executable, "-m", "tools.linux_guest", "zic", "--net", "--archive", str(archive),
                           "--name", IMAGE], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"tools.linux_guest zic exited {done.returncode}: {done.stderr.strip()[-1000:]}")
    return archive


def httpd_rootfs(target: Path) -> Path:
    """A busybox rootfs serving what the guest serves: the page as ``/www/index.html``, the bulk
    CGI script at ``/www`` + :data:`HTTP_BULK_PATH`, with the applets they need."""
    from tools.testbed.containerd import make_busybox_rootfs

    make_busybox_rootfs(target)
    for applet in ("httpd", "dd", "printf"):
        (target / "bin" / applet).symlink_to("busybox")
    script = target / "www" / HTTP_BULK_PATH.lstrip("/")
    script.parent.mkdir(parents=True)
    (target / "www" / "index.html").write_text(HTTP_PAGE)
    script.write_text(HTTP_BULK_SCRIPT)
    script.chmod(0o755)
    return target


class Node(NamedTuple):
    """One backend's private containerd (in the network's node namespace) and its board, if any."""

    backend: str
    base: Path
    containerd: PrivateContainerd
    board: SimBoard | None
    #: Filled on the way out of :func:`running_node`: runphi processes that survived the stop.
    left: list[str]

    @property
    def state(self) -> Path:
        return self.base / "node"  # RUNPHI_STATE_DIR of the test bed's environments

    def cells(self) -> list[str]:
        if self.board is None:
            return kvm_cells(self.state)
        return sorted(p.name for p in self.board.sysfs_path("cells").iterdir() if p.name != "0")


def node_env(installed: Installed, backend: str, base: Path) -> dict[str, str]:
    """A user's environment, the test bed's ``RUNPHI_*`` for ``backend`` under ``base``, the
    installed bindir first on PATH (shim mode finds ``containerd-shim-runphi-v2`` there)."""
    from tools.testbed.containerd import kvm_env, simulator_env

    env = user_env()
    env.update(kvm_env(base) if backend == "kvm" else simulator_env(base / "sim", base))
    env["PATH"] = f"{installed.bindir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


@contextmanager
def running_node(installed: Installed, backend: str, namespace: str) -> Iterator[Node]:
    """The simulated board (Jailhouse; QEMU engine) and containerd, both inside ``namespace``; on
    the way out every container is removed, containerd, every runphi process and the board stopped."""
    from tools.jailhouse_sim.testing import SimBoard
    from tools.testbed.containerd import SIM_PLATFORM, PrivateContainerd, short_tempdir

    base = short_tempdir("rphi-bn-")
    env = node_env(installed, backend, base)
    board = daemon = None
    left: list[str] = []
    try:
        if backend == "jailhouse":
            board = SimBoard.start(base / "sim", board=SIM_PLATFORM, engine="qemu", netns=namespace)
        daemon = PrivateContainerd(base / "ctd", installed.runphi, env=env, netns=namespace)
        daemon.env = env  # exactly a user's environment, not layered over this process's
        daemon.start()
        yield Node(backend, base, daemon, board, left)
    finally:
        try:
            if daemon is not None and daemon.process is not None and daemon.process.poll() is None:
                daemon.remove_leftovers()
        finally:
            if daemon is not None:
                daemon.stop()
            left[:] = stop_node_processes(f"RUNPHI_STATE_DIR={base / 'node'}")
            if board is not None:
                board.stop()
            shutil.rmtree(base, ignore_errors=True)


def ctr(node: Node, *args: str, timeout: float = 120.0) -> str:
    """``ctr ARGS`` on the node's containerd; its stdout, or RuntimeError with its stderr."""
    done = node.containerd.ctr(*args, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args[:2])} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()[-1000:]}")
    return done.stdout.decode(errors="replace")


def start_zic(node: Node, pod: Pod, cid: str, log: Path) -> None:
    """``ctr run -d`` of the networked Linux ZIC in shim mode, joined to ``pod``; console to ``log``."""
    ctr(node, "run", "-d", "--log-uri", f"file://{log}", "--with-ns", f"network:/run/netns/{pod.namespace}",
        "--runtime", ZIC_RUNTIME, "--env", "PATH=/bin", IMAGE, cid)


def start_runc(node: Node, pod: Pod, cid: str, rootfs: Path, log: Path) -> None:
    """``ctr run -d`` of busybox httpd in the foreground under plain runc, joined to ``pod``."""
    ctr(node, "run", "-d", "--log-uri", f"file://{log}", "--with-ns", f"network:/run/netns/{pod.namespace}",
        *node.containerd.runtime_flags("runc"), "--rootfs", str(rootfs), cid,
        "httpd", "-f", "-p", str(HTTP_PORT), "-h", "/www")


def wait_for_console(log: Path, deadline: float) -> None:
    """Poll the ZIC's log file (the shim writes the console there) for the guest's ready line."""
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if NET_READY_MESSAGE in text:
            return
        if NET_FAILED_MESSAGE in text or time.monotonic() > deadline:
            raise RuntimeError(f"the guest did not bring its network up; console tail:\n{text[-1500:]}")
        time.sleep(RETRY_INTERVAL)


def remove_container(node: Node, cid: str) -> None:
    """Kill the task (SIGKILL), delete it and the container; quiet when there is none."""
    node.containerd.ctr("task", "kill", "--signal", "SIGKILL", cid, timeout=60)
    node.containerd.ctr("task", "delete", "--force", cid, timeout=120)
    node.containerd.ctr("containers", "delete", cid, timeout=60)


def node_leftovers(label: str, node: Node, network: Network, pods: list[Pod]) -> Check:
    """After the containers' removal: no container, cell, ledger entry or link record on the node,
    no link device and no nftables table in the node's namespace or the pods'."""
    namespaces = (network.node, *(p.namespace for p in pods))
    problems = {
        "containers": ctr(node, "containers", "list", "--quiet").split(),
        "cells": node.cells(),
        "ledger": sorted(ledger_allocations(node.state)),
        "link records": sorted(p.name for p in (node.state / "jailhouse-links").glob("*")),
        "link devices": [f"{ns}: {name}" for ns in namespaces for name in link_devices(ns)],
        "nft tables": [f"{ns}: {tables}" for ns in namespaces if (tables := nft_tables(ns))],
    }
    found = {what: items for what, items in problems.items() if items}
    return Check(f"{label}: nothing left after the removal (containers, cells, ledger, links, NAT)", not found,
                 "; ".join(f"{what} {items}" for what, items in found.items()))


# ---- one backend, the suite -------------------------------------------------------------------------


class Setup(NamedTuple):
    """What every backend's round uses: runphi installed, the image archive, the runc rootfs."""

    installed: Installed
    archive: Path
    rootfs: Path
    logs: Path


def serve_and_measure(node: Node, setup: Setup, pods: dict[str, Pod], namespace: str,
                      options: Options) -> tuple[Measured, list[str]]:
    """Both servers started and seen ready, the rounds run from the node's namespace ``namespace``;
    also the link devices in the ZIC's pod while it served."""
    deadline = time.monotonic() + GUEST_TIMEOUT
    zic_log = setup.logs / f"{node.backend}-zic.log"
    start_zic(node, pods[ZIC], "bench-net-zic", zic_log)
    start_runc(node, pods[RUNC], "bench-net-runc", setup.rootfs, setup.logs / f"{node.backend}-runc.log")
    wait_for_console(zic_log, deadline)
    for pod in pods.values():
        wait_for_page(namespace, pod.address, deadline)
    targets = {name: pod.address for name, pod in pods.items()}
    measured = run_in_namespace(namespace, lambda: measure(
        targets, options.count(200, 10), options.count(10, 0), options.count(5, 1)))
    return measured, link_devices(pods[ZIC].namespace)


def measure_backend(label: str, backend: str, host: int, network: Network, setup: Setup, options: Options,
                    result: SuiteResult) -> Measured:
    """One backend: its pods, its node, both servers, the rounds; checks into ``result``."""
    pods = {ZIC: network.add_pod(f"{backend}-zic", host), RUNC: network.add_pod(f"{backend}-runc", host + 1)}
    try:
        with running_node(setup.installed, backend, network.node) as node:
            ctr(node, "images", "import", "--platform", "linux/arm64", str(setup.archive), timeout=300)
            try:
                measured, devices = serve_and_measure(node, setup, pods, network.node, options)
            finally:
                for cid in ("bench-net-zic", "bench-net-runc"):
                    remove_container(node, cid)
            result.checks.append(node_leftovers(label, node, network, list(pods.values())))
        result.checks.append(Check(f"{label}: no runphi process left after the node stopped", not node.left,
                                   "; ".join(node.left)))
    finally:
        for pod in pods.values():
            network.remove(pod.namespace)
    result.checks.append(Check(f"{label}: while serving, the ZIC's link device was in its pod", bool(devices),
                               ", ".join(devices) or "none there"))
    result.checks.append(Check(f"{label}: every response 200 with the exact body", not measured.wrong,
                               "; ".join(measured.wrong[:5])))
    return measured


def report(label: str, measured: Measured, result: SuiteResult) -> None:
    """Series of the samples; p50 / p99 and the ZIC / runc ratios as info lines."""
    latency = {name: result.add(Series(f"{label}: GET / latency, {name}", tuple(samples)))
               for name, samples in measured.latency.items()}
    bulk = {name: result.add(Series(f"{label}: GET 10 MiB, {name}", tuple(samples), "MiB/s"))
            for name, samples in measured.bulk.items()}
    for name, fraction in (("p50", 0.5), ("p99", 0.99)):
        zic, runc = latency[ZIC].percentile(fraction), latency[RUNC].percentile(fraction)
        result.info[f"{label}: GET / {name}, ZIC / runc"] = (f"{zic * 1e3:.2f} ms / {runc * 1e3:.2f} ms = "
                                                             f"{zic / runc:.2f}x")
    zic, runc = bulk[ZIC].median, bulk[RUNC].median
    result.info[f"{label}: 10 MiB GET throughput (median), ZIC / runc"] = (f"{zic:.3g} / {runc:.3g} MiB/s = "
                                                                         f"{zic / runc:.3f}x")


def run(options: Options) -> SuiteResult:
    require()
    result = SuiteResult("net")
    network = Network(str(os.getpid()))
    base = Path(tempfile.mkdtemp(prefix="rphi-bench-net-", dir=scratch_dir()))
    machine_before = set(link_devices())
    try:
        (base / "logs").mkdir()
        setup = Setup(install_runphi(base / "install"), build_image(base / "linux-net.tar"),
                      httpd_rootfs(base / "httpd"), base / "logs")
        with network:
            for label, (backend, host) in BACKENDS.items():
                report(label, measure_backend(label, backend, host, network, setup, options, result), result)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        appeared = sorted(set(link_devices()) - machine_before)
        result.checks.append(Check("nothing left in this machine's namespace: no bench namespace in /run/netns, "
                                   "no runphi tap or ivshmnet device", not network.left() and not appeared,
                                   f"namespaces {network.left()}, devices {appeared}"
                                   if network.left() or appeared else ""))
    result.info["guest"] = (f"the networked Linux ZIC (tools.linux_guest zic --net), one vCPU, under "
                            f"{DEFAULT_BINARY} (TCG on a non-arm64 host)")
    result.info["server / client"] = ("busybox httpd in the guest and in a runc container (same page, same CGI "
                                      "script); client in the node namespace, a new TCP connection per request")
    result.info["nodes"] = "shim mode, runphi from target/install.sh, containerd inside the node namespace"
    return result


if __name__ == "__main__":
    sys.exit(standalone("net", run))
