"""The node a CRI test drives, and kubelet-like helpers on top of :class:`CriClient`.

:class:`Node` owns a simulated board (or, with ``backend="kvm"``, none: runphi runs
ZICs as QEMU VMs), a private CRI containerd whose ``runphi`` handler reaches it, the
compiled CRI client and the imported images. With ``network=True`` the node has a
real pod network: a network namespace of the test's own in which containerd (and the
board's daemon) run, and a CNI bridge network there (:class:`tests.cri.node.PodNetwork`);
pods then get network namespaces and addresses of their own. :meth:`Node.teardown_pods`
stops and removes every pod (as a kubelet deleting them would) and
:meth:`Node.leftovers` reports anything that survived.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tools.testbed.containerd import WARM_PARENT, kill_processes_with_env, kvm_env, short_tempdir
from tests.cri.client import CriClient, compile_proto
from tests.cri.manifests import PodManifest, RuntimeClass, linux_resources
from tests.cri.node import (PAUSE_IMAGE, SIM_PLATFORM, CriContainerd, Leftovers, PodNetwork, busybox_image_archive,
                            cells_on, cni_bin_dir, host_architecture, kvm_cells, ledger_entries, netns_entries,
                            network_leftovers, processes_with_env, runphi_records, script_guest,
                            zic_image_archive)

#: The ZIC images every CRI test may use: name → script guest (simulator script engine;
#: same observable behaviour as the QEMU inmates of the same name, booted in milliseconds).
ZIC_GUESTS = {
    # tools/inmates/hello.c: a banner, then power off (exit 0).
    "hello": script_guest("print Hello from a ZIC\\n", "print second line\\n", "shutdown"),
    # tools/inmates/ticker.c: a line every 100 ms until shut down.
    "ticker": script_guest("print ticker up\\n", "tick 100 tick"),
    # A locked cell, ticking; tests make it refuse shutdown with Node.guests_refuse_shutdown.
    "locked": script_guest("lock", "print locked up\\n", "tick 100 tick"),
    # tools/inmates/crash.c: a data abort, the cell fails (exit 139).
    "crash": script_guest("print about to crash\\n", "fault"),
}
ZIC_TAG = "cri"
#: How much of a container's log a failed wait shows.
LOG_TAIL_LINES = 25
#: Where containerd's runc shim keeps runc's state when its handler sets no ``Root``.
RUNC_DEFAULT_ROOT = Path("/run/containerd/runc")
#: The platform of a ZIC image: the board's (the guests are aarch64).
ZIC_ARCHITECTURE = "arm64"
#: Where runphi runs ZICs: Jailhouse cells on the simulated board, or QEMU VMs on this host.
BACKENDS = ("jailhouse", "kvm")

# `<RFC3339Nano time> <stream> <P|F> <text>`: the CRI log line format kubectl logs reads.
CRI_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) "
                          r"(stdout|stderr) ([PF]) (.*)$")


def zic_image(name: str) -> str:
    return f"docker.io/library/{name}:{ZIC_TAG}"


@dataclass(frozen=True)
class LogLine:
    time: str
    stream: str
    tag: str
    text: str


def parse_cri_log(text: str) -> list[LogLine]:
    """Every line of a CRI container log; raises on a line not in the CRI format."""
    lines = []
    for raw in text.splitlines():
        match = CRI_LOG_LINE.match(raw)
        if match is None:
            raise AssertionError(f"not a CRI log line: {raw!r}")
        lines.append(LogLine(*match.groups()))
    return lines


@dataclass(frozen=True)
class Pod:
    id: str
    config: object  # the PodSandboxConfig sent with RunPodSandbox (and with every CreateContainer)
    log_directory: Path
    #: The pod's IP (PodSandboxStatus) on a networked node; "" for host-network pods.
    ip: str = ""


def make_pod_network(base: Path) -> PodNetwork:
    """A fresh network namespace ``rphi-cri-<random>`` and the node's pod network in it
    (host-local leases under ``base``); raises when this machine has no CNI plugins."""
    from pyroute2 import netns

    bin_dir = cni_bin_dir()
    if bin_dir is None:
        raise RuntimeError("no CNI plugins (bridge, host-local, loopback) found: "
                           "apt-get install containernetworking-plugins")
    network = PodNetwork(netns=f"rphi-cri-{secrets.token_hex(4)}", bin_dir=bin_dir, data_dir=base / "cni-ipam")
    netns.create(network.netns)
    return network


def remove_pod_network(network: PodNetwork | None) -> None:
    """Remove the pod network's namespace (its bridge goes with it); nothing when None."""
    from pyroute2 import netns

    if network is not None and network.netns in netns_entries():
        netns.remove(network.netns)


def start_board(base: Path, engine: str, network: PodNetwork | None):
    """The simulated board for a Jailhouse node, its daemon inside the pod network's namespace
    when there is one (so the links it makes stay there)."""
    from tools.jailhouse_sim.testing import SimBoard

    where = {"netns": network.netns} if network is not None else {}
    return SimBoard.start(base / "sim", board=SIM_PLATFORM, engine=engine, **where)


def runphi_env(base: Path, runphi: Path, board) -> dict[str, str]:
    """What containerd (and so every shim and runphi verb) runs with: runphi's backend
    (Jailhouse on ``board``, or KVM when ``board`` is None) and state dir under ``base``."""
    # In shim mode containerd finds containerd-shim-runphi-v2 on its PATH.
    path = {"PATH": f"{runphi.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if board is None:
        return {**kvm_env(base), **path}
    config = base / "runphi.toml"
    config.write_text('backend = "jailhouse"\n\n[jailhouse]\npoll_interval_ms = 20\n')
    return {"RUNPHI_CONFIG": str(config), "RUNPHI_BACKEND": "jailhouse",
            "RUNPHI_JAILHOUSE": str(board.jailhouse_path), "RUNPHI_SYSFS": str(board.sysfs_path()),
            "RUNPHI_PLATFORM": SIM_PLATFORM, "RUNPHI_STATE_DIR": str(base / "node"), **path}


class Node:
    """See the module docstring. Built by :meth:`start`, ended by :meth:`stop`."""

    def __init__(self, base: Path, board, daemon: CriContainerd, client: CriClient) -> None:
        self.base = base
        #: The simulated board (None on the KVM backend).
        self.board = board
        self.daemon = daemon
        self.client = client
        #: The pod network (None: host-network pods only).
        self.network = daemon.network
        self.node_dir = base / "node"
        self.pods: list[Pod] = []
        self.netns_before = netns_entries()
        self._uids = itertools.count(1)

    @classmethod
    def start(cls, runphi: Path, *, engine: str = "script", guests: dict[str, bytes] | None = None,
              mode: str = "shim", backend: str = "jailhouse", network: bool = False,
              networked_guests: bool = False) -> Node:
        """Board up (guest ``engine``; no board for ``backend="kvm"``), containerd up with the
        runphi handler in ``mode`` (inside a pod network's namespace with ``network``, the board's
        daemon too), the pause image and one ZIC image per ``guests`` entry (``<name>:cri``,
        default :data:`ZIC_GUESTS`, each asking for a network link with ``networked_guests``)
        imported, CRI answering. On failure nothing of it is left."""
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        base = short_tempdir("rphi-cri-")
        pod_network = board = daemon = client = None
        try:
            pod_network = make_pod_network(base) if network else None
            board = start_board(base, engine, pod_network) if backend == "jailhouse" else None
            daemon = CriContainerd(base, runphi, runphi_env(base, runphi, board), mode=mode, network=pod_network)
            daemon.start()
            client = CriClient(compile_proto(base / "proto"), daemon.address)
            node = cls(base, board, daemon, client)
            node._import_images(ZIC_GUESTS if guests is None else guests, networked_guests)
            return node
        except BaseException:
            stop_parts(base, client, daemon, board, pod_network)
            raise

    def _import_images(self, guests: dict[str, bytes], net: bool) -> None:
        """The pause/sidecar image for this machine's platform (its busybox runs here), the
        ZIC images as mkzic makes them for a board (``linux/arm64``, whatever the host is)."""
        arch = host_architecture()
        images = self.base / "images"
        images.mkdir()
        busybox = images / "busybox.tar"
        busybox.write_bytes(busybox_image_archive(PAUSE_IMAGE, arch))
        self.daemon.import_image(busybox, arch)
        for name, guest in guests.items():
            archive = images / f"{name}.tar"
            archive.write_bytes(zic_image_archive(f"{name}:{ZIC_TAG}", guest, images, ZIC_ARCHITECTURE, net=net))
            self.daemon.import_image(archive, ZIC_ARCHITECTURE)

    @classmethod
    @contextmanager
    def running(cls, runphi: Path, **start_options) -> Iterator[Node]:
        """:meth:`start` (with ``start_options``) for the with-block, :meth:`stop` after it."""
        node = cls.start(runphi, **start_options)
        try:
            yield node
        finally:
            node.stop()

    def stop(self) -> None:
        """Remove every pod, stop containerd and the board, delete the directory.

        Processes of this node that outlived containerd (a leak, reported by the
        tests that check :meth:`leftovers`) are killed by pid so nothing survives.
        """
        try:
            self.teardown_pods()
        finally:
            stop_parts(self.base, self.client, self.daemon, self.board, self.network)

    # ---- pods ----------------------------------------------------------------------------

    def run_pod(self, name: str, annotations: dict[str, str] | None = None, handler: str = "runphi") -> Pod:
        """RunPodSandbox with ``handler``, remembered for teardown: on the pod network (the
        pod's IP read back) when the node has one, else with host networking."""
        uid = f"uid-{name}-{next(self._uids)}"
        log_directory = self.base / "pods" / f"default_{name}_{uid}"
        config = self.client.pod_config(name, uid, log_directory, annotations=annotations,
                                        host_network=self.network is None)
        pod_id = self.client.run_pod(config, handler=handler)
        self.pods.append(Pod(pod_id, config, log_directory))  # remembered before anything else may fail
        if self.network is not None:
            self.pods[-1] = Pod(pod_id, config, log_directory, ip=self.client.pod_ip(pod_id))
        return self.pods[-1]

    def forget_pod(self, pod: Pod) -> None:
        """StopPodSandbox + RemovePodSandbox of one pod now (kubelet pod deletion)."""
        self.pods.remove(pod)
        self.client.stop_pod(pod.id)
        self.client.remove_pod(pod.id)

    def create(self, pod: Pod, name: str, image: str, **kwargs) -> str:
        """CreateContainer in ``pod``; keyword arguments go to ``CriClient.container_config``."""
        return self.client.create(pod.id, self.client.container_config(name, image, **kwargs), pod.config)

    def run_container(self, pod: Pod, name: str, image: str, **kwargs) -> str:
        """CreateContainer + StartContainer, as a kubelet does."""
        container_id = self.create(pod, name, image, **kwargs)
        self.client.start(container_id)
        return container_id

    def run_manifest(self, manifest: PodManifest, runtime_class: RuntimeClass) -> tuple[Pod, dict[str, str]]:
        """Run a pod manifest the way a kubelet does (see :mod:`tests.cri.manifests`);
        returns the pod and its container ids by container name."""
        assert manifest.spec.runtime_class_name == runtime_class.metadata.name
        pod = self.run_pod(manifest.metadata.name, annotations=manifest.metadata.annotations,
                           handler=runtime_class.handler)
        containers = {}
        for container in manifest.spec.containers:
            containers[container.name] = self.run_container(
                pod, container.name, container.image, command=container.command, args=container.args,
                resources=linux_resources(self.client, container.resources))
        return pod, containers

    def tag_image(self, source: str, target: str) -> None:
        """Give an imported image another name (what the example manifests call it)."""
        self.daemon.ctr_k8s("image", "tag", "--force", source, target)

    def teardown_pods(self) -> None:
        """StopPodSandbox + RemovePodSandbox for every pod this node ran (kubelet pod deletion)."""
        while self.pods:
            pod = self.pods.pop()
            self.client.stop_pod(pod.id)
            self.client.remove_pod(pod.id)

    @contextmanager
    def pods_deleted_and_checked(self) -> Iterator[Node]:
        """Yield the node; afterwards delete every pod it ran and assert nothing is left
        (CRI pods and containers, cells, ledger entries, runphi records, shims,
        monitors, netns)."""
        try:
            yield self
        finally:
            self.teardown_pods()
        assert self.client.pods() == [] and self.client.containers() == [], "the CRI still lists them"
        left = self.wait_clean()
        assert left.clean(), f"left behind after the pods were removed: {left}"

    # ---- observation ---------------------------------------------------------------------

    def log_lines(self, path: Path) -> list[LogLine]:
        return parse_cri_log(path.read_text(errors="replace")) if path.exists() else []

    def wait_log(self, path: Path, text: str, timeout: float = 30.0, fail_on: tuple[str, ...] = ()) -> list[LogLine]:
        """Poll the CRI log file (what kubectl logs reads) until a line's text contains ``text``;
        fails at once when a line contains one of ``fail_on`` (the guest said it cannot get
        there), and after ``timeout``, with the log's last lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(path)
            if any(text in line.text for line in lines):
                return lines
            failed = [line.text for line in lines if any(bad in line.text for bad in fail_on)]
            if failed or time.monotonic() > deadline:
                why = f"the guest logged {failed[0]!r}" if failed else f"not there after {timeout} s"
                tail = "\n".join(line.text for line in lines[-LOG_TAIL_LINES:])
                raise AssertionError(f"{text!r} not in {path}: {why}; its last lines:\n{tail}")
            time.sleep(0.05)

    @contextmanager
    def guests_refuse_shutdown(self) -> Iterator[None]:
        """Every shutdown request fails with EPERM while inside, as a non-passive guest
        denies it (the simulator's cells are passive, so refusal is injected)."""
        self.board.inject(op="shutdown", errno=errno.EPERM, count=-1)
        try:
            yield
        finally:
            self.board.inject(clear=True)

    def cells(self) -> list[str]:
        """The board's non-root cells; on KVM, the cells runphi keeps VMs for."""
        return kvm_cells(self.node_dir) if self.board is None else cells_on(self.board.sysfs_path())

    def record_dir(self, container_id: str) -> Path:
        """runphi's state directory for a container of the CRI namespace."""
        root = self.node_dir if self.daemon.mode == "shim" else self.daemon.runtime_root
        return root / "k8s.io" / container_id

    def runc_state(self, container_id: str) -> Path:
        """runc's state file for a container runphi handed over: under runphi's ``Root`` in
        runc-CLI mode; under runc's default root when runphi's shim handed it to runc's shim."""
        root = RUNC_DEFAULT_ROOT if self.daemon.mode == "shim" else self.daemon.runtime_root
        return root / "k8s.io" / container_id / "state.json"

    def leftovers(self) -> Leftovers:
        """Cells, ledger entries, runphi records, shims/monitors and netns still present; on a
        networked node also links (taps, veths) and addresses besides lo and the CNI bridge,
        nftables tables in the node's namespace, and libcni's cached results for its pods."""
        return Leftovers(
            cells=self.cells(), ledger=ledger_entries(self.node_dir),
            records=runphi_records(self.daemon.runtime_root, self.node_dir),
            processes=[line for line in processes_with_env(f"RUNPHI_STATE_DIR={self.node_dir}",
                                                           exclude={self.daemon.process.pid})
                       if not is_warm_parent(line)],
            netns=sorted(netns_entries() - self.netns_before),
            **(network_leftovers(self.network) if self.network is not None else {}))

    def wait_clean(self, timeout: float = 30.0) -> Leftovers:
        """Poll until nothing is left (a shim exits shortly after RemovePodSandbox returns)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftovers()
            if left.clean() or time.monotonic() > deadline:
                return left
            time.sleep(0.05)


def is_warm_parent(line: str) -> bool:
    """Whether the ``pid cmdline`` line is a shim's warm parent (node-level, it outlives pods):
    it runs :data:`WARM_PARENT` and leads its own session. A pod's shim server forked from it
    keeps its command line but not its session, so it still counts as a leftover."""
    pid = line.split(maxsplit=1)[0]
    try:
        # /proc/<pid>/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces.
        session = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[3]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return WARM_PARENT in line and session == pid


def stop_parts(base: Path, client: CriClient | None, daemon: CriContainerd | None, board,
               network: PodNetwork | None) -> None:
    """Close the client, stop containerd, end every process of the node that outlived it (a
    leak the tests that check leftovers report; killed by pid so nothing survives), stop the
    board, remove the pod network's namespace, delete ``base``. Any part may be None."""
    try:
        if client is not None:
            client.close()
        if daemon is not None:
            daemon.stop()
        kill_processes_with_env(f"RUNPHI_STATE_DIR={base / 'node'}")
        if board is not None:
            board.stop()
    finally:
        remove_pod_network(network)
        shutil.rmtree(base, ignore_errors=True)
