"""The node a CRI test drives, and kubelet-like helpers on top of :class:`CriClient`.

:class:`Node` owns a simulated board, a private CRI containerd whose ``runphi``
handler reaches that board, the compiled CRI client and the imported images.
:meth:`Node.teardown_pods` stops and removes every pod (as a kubelet deleting
them would) and :meth:`Node.leftovers` reports anything that survived.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tools.testbed.containerd import WARM_PARENT, kill_processes_with_env, short_tempdir
from tests.cri.client import CriClient, compile_proto
from tests.cri.manifests import PodManifest, RuntimeClass, linux_resources
from tests.cri.node import (PAUSE_IMAGE, SIM_PLATFORM, CriContainerd, Leftovers, busybox_image_archive,
                            cells_on, host_architecture, ledger_entries, netns_entries, processes_with_env,
                            runphi_records, script_guest, zic_image_archive)

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
#: Where containerd's runc shim keeps runc's state when its handler sets no ``Root``.
RUNC_DEFAULT_ROOT = Path("/run/containerd/runc")
#: The platform of a ZIC image: the board's (the guests are aarch64).
ZIC_ARCHITECTURE = "arm64"

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


class Node:
    """See the module docstring. Built by :meth:`start`, ended by :meth:`stop`."""

    def __init__(self, base: Path, board, daemon: CriContainerd, client: CriClient) -> None:
        self.base = base
        self.board = board
        self.daemon = daemon
        self.client = client
        self.node_dir = base / "node"
        self.pods: list[Pod] = []
        self.netns_before = netns_entries()
        self._uids = itertools.count(1)

    @classmethod
    def start(cls, runphi: Path, *, engine: str = "script", guests: dict[str, bytes] | None = None,
              mode: str = "shim") -> Node:
        """Board up (guest ``engine``), containerd up with the runphi handler in ``mode``, the
        pause image and one ZIC image per ``guests`` entry (``<name>:cri``, default
        :data:`ZIC_GUESTS`) imported, CRI answering."""
        from tools.jailhouse_sim.testing import SimBoard

        base = short_tempdir("rphi-cri-")
        board = daemon = client = None
        try:
            board = SimBoard.start(base / "sim", board=SIM_PLATFORM, engine=engine)
            config = base / "runphi.toml"
            config.write_text('backend = "jailhouse"\n\n[jailhouse]\npoll_interval_ms = 20\n')
            env = {"RUNPHI_CONFIG": str(config), "RUNPHI_BACKEND": "jailhouse",
                   "RUNPHI_JAILHOUSE": str(board.jailhouse_path), "RUNPHI_SYSFS": str(board.sysfs_path()),
                   "RUNPHI_PLATFORM": SIM_PLATFORM, "RUNPHI_STATE_DIR": str(base / "node"),
                   # In shim mode containerd finds containerd-shim-runphi-v2 on its PATH.
                   "PATH": f"{runphi.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            daemon = CriContainerd(base, runphi, env, mode=mode)
            daemon.start()
            client = CriClient(compile_proto(base / "proto"), daemon.address)
            node = cls(base, board, daemon, client)
            node._import_images(ZIC_GUESTS if guests is None else guests)
            return node
        except BaseException:
            if client is not None:
                client.close()
            if daemon is not None:
                daemon.stop()
            if board is not None:
                board.stop()
            shutil.rmtree(base, ignore_errors=True)
            raise

    def _import_images(self, guests: dict[str, bytes]) -> None:
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
            archive.write_bytes(zic_image_archive(f"{name}:{ZIC_TAG}", guest, images, ZIC_ARCHITECTURE))
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
            self.client.close()
            self.daemon.stop()
            kill_processes_with_env(f"RUNPHI_STATE_DIR={self.node_dir}")
            self.board.stop()
            shutil.rmtree(self.base, ignore_errors=True)

    # ---- pods ----------------------------------------------------------------------------

    def run_pod(self, name: str, annotations: dict[str, str] | None = None, handler: str = "runphi") -> Pod:
        """RunPodSandbox with ``handler`` (host network), remembered for teardown."""
        uid = f"uid-{name}-{next(self._uids)}"
        log_directory = self.base / "pods" / f"default_{name}_{uid}"
        config = self.client.pod_config(name, uid, log_directory, annotations=annotations)
        pod = Pod(id=self.client.run_pod(config, handler=handler), config=config, log_directory=log_directory)
        self.pods.append(pod)
        return pod

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

    def wait_log(self, path: Path, text: str, timeout: float = 30.0) -> list[LogLine]:
        """Poll the CRI log file (what kubectl logs reads) until a line's text contains ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(path)
            if any(text in line.text for line in lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in {path} after {timeout} s: {lines}")
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
        return cells_on(self.board.sysfs_path())

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
        """Cells, ledger entries, runphi records, shims/monitors and netns still present."""
        return Leftovers(
            cells=self.cells(), ledger=ledger_entries(self.node_dir),
            records=runphi_records(self.daemon.runtime_root, self.node_dir),
            processes=[line for line in processes_with_env(f"RUNPHI_STATE_DIR={self.node_dir}",
                                                           exclude={self.daemon.process.pid})
                       if WARM_PARENT not in line],
            netns=sorted(netns_entries() - self.netns_before))

    def wait_clean(self, timeout: float = 30.0) -> Leftovers:
        """Poll until nothing is left (a shim exits shortly after RemovePodSandbox returns)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftovers()
            if left.clean() or time.monotonic() > deadline:
                return left
            time.sleep(0.05)
