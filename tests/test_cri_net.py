"""Networked ZICs in real pods: containerd's CRI with a real CNI network, as a kubelet drives it.

The node (``tests/cri/kubelet.py`` with ``network=True``) is a private containerd whose
CRI plugin runs Debian's CNI plugins (``bridge`` + ``host-local`` on 169.254.200.0/24);
containerd, and on Jailhouse the simulator's daemon, run inside a network namespace the
test made, so the CNI bridge, the pods' veths and every tap stay in it. Pods use the
CRI's ``POD`` network mode: containerd makes each pod a network namespace and CNI gives
it an address. A networked ZIC (boot description ``net: true``) started in the pod
answers on the pod's IP.

Parametrised over where runphi runs ZICs (the simulated Jailhouse board with its QEMU
engine, or QEMU VMs on the KVM backend) and how containerd runs runphi (its own shim, or
runc's shim with runphi as its runc). After the pods are deleted the node must hold no
cell, ledger entry, record, shim or monitor, no pod netns, and, in the node's namespace,
no link or address besides lo and the bridge and no nftables table.
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest
import trio

from tools.testbed.containerd import MODES, missing_requirements
from tests.cri.client import CONTAINER_RUNNING
from tests.cri.kubelet import BACKENDS, ZIC_ARCHITECTURE, Node, Pod, zic_image
from tests.cri.node import cni_bin_dir, namespace_links

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

COMBOS = [(backend, mode) for backend in BACKENDS for mode in MODES]
NET_LINUX_IMAGE = "docker.io/library/runphi-linux-guest:cri-net"
#: A Linux guest boots in seconds under KVM, tens of seconds under TCG (an x86 host).
GUEST_TIMEOUT = 180.0
CYCLES = 20


def missing_network_requirements() -> str | None:
    """Why a pod-network CRI test cannot run here, or None when it can."""
    if reason := missing_requirements():
        return reason
    if shutil.which("qemu-system-aarch64") is None:
        return "qemu-system-aarch64 not found (apt-get install qemu-system-arm)"
    if cni_bin_dir() is None:
        return "no CNI plugins bridge, host-local and loopback (apt-get install containernetworking-plugins)"
    if shutil.which("nft") is None:
        return "nft not found (apt-get install nftables)"
    return None


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{backend}-{mode}" for backend, mode in COMBOS])
def node(request, runphi_bin: Path, built_inmates: Path):
    """A node with a pod network, once per (backend, mode); its ``ticker:cri`` image is the
    real ticker inmate asking for a network link."""
    reason = missing_network_requirements()
    if reason:
        pytest.skip(f"CRI with a pod network: {reason}")
    backend, mode = request.param
    guests = {"ticker": (built_inmates / "ticker.bin").read_bytes()}
    with Node.running(runphi_bin, engine="qemu", guests=guests, mode=mode, backend=backend, network=True,
                      networked_guests=True) as started:
        yield started


@pytest.fixture
def kubelet(node: Node):
    """The node, with every pod the test ran deleted afterwards and the node checked clean."""
    with node.pods_deleted_and_checked():
        yield node


@pytest.fixture(scope="session")
def net_linux_archive(tmp_path_factory) -> Path:
    """The Linux ZIC asking for a network (``tools.linux_guest zic --net``), as an image archive."""
    from tools.linux_guest.guest import default_cache_dir
    from tools.linux_guest.testing import guest_or_skip
    from tools.linux_guest.zic import default_dtb, mkzic_argv
    from tools.mkzic.cli import main as mkzic

    guest = guest_or_skip()
    archive = tmp_path_factory.mktemp("cri-net-linux") / "linux-net.tar"
    argv = mkzic_argv(guest, default_dtb(default_cache_dir()), archive=archive, name=NET_LINUX_IMAGE, net=True)
    assert mkzic(argv) == 0
    return archive


@pytest.fixture(scope="module")
def net_linux_image(node: Node, net_linux_archive: Path) -> str:
    """The networked Linux ZIC imported into the node's CRI namespace."""
    node.daemon.import_image(net_linux_archive, ZIC_ARCHITECTURE)
    return NET_LINUX_IMAGE


def assert_on_the_pod_network(node: Node, pod: Pod) -> None:
    """The CRI reports an IP for ``pod``, inside the node's CNI subnet (not the gateway's), and
    the CNI bridge is in the node's namespace, not in the machine's own."""
    subnet = ipaddress.ip_network(node.network.subnet)
    assert pod.ip and ipaddress.ip_address(pod.ip) in subnet, f"pod IP {pod.ip!r} not in {subnet}"
    assert pod.ip != node.network.gateway
    assert node.network.bridge in namespace_links(node.network.netns)
    assert node.network.bridge not in namespace_links(None), "the CNI bridge is in the machine's namespace"


def test_a_networked_linux_zic_serves_http_on_its_pods_ip(kubelet: Node, net_linux_image: str):
    """RunPodSandbox → a pod IP from CNI; the networked Linux ZIC started in it comes up and its
    httpd answers a GET sent from the node's namespace to that IP."""
    from tools.linux_guest import HTTP_PAGE
    from tools.linux_guest.initramfs import NET_FAILED_MESSAGE, NET_READY_MESSAGE
    from tools.linux_guest.testing import http_get_in

    pod = kubelet.run_pod("web")
    assert_on_the_pod_network(kubelet, pod)
    container = kubelet.run_container(pod, "web", net_linux_image)
    kubelet.client.wait_state(container, CONTAINER_RUNNING, timeout=GUEST_TIMEOUT)
    kubelet.wait_log(pod.log_directory / "web" / "0.log", NET_READY_MESSAGE, timeout=GUEST_TIMEOUT,
                     fail_on=(NET_FAILED_MESSAGE,))
    status, body = trio.run(http_get_in, kubelet.network.netns, pod.ip)
    assert (status, body.decode()) == (200, HTTP_PAGE)


def test_twenty_pod_cycles_leave_nothing_behind(kubelet: Node):
    """20 × (RunPodSandbox, create + start a networked ticker, see it tick, StopPodSandbox,
    RemovePodSandbox): after every cycle the node is clean again."""
    for cycle in range(CYCLES):
        try:
            one_pod_cycle(kubelet, f"cycle-{cycle}")
        except Exception as exc:
            exc.add_note(f"in pod cycle {cycle} of {CYCLES}")
            raise


def one_pod_cycle(kubelet: Node, name: str) -> None:
    """RunPodSandbox, a networked ticker created, started and seen ticking, StopPodSandbox,
    RemovePodSandbox; returns once nothing of the pod is left."""
    pod = kubelet.run_pod(name)
    assert_on_the_pod_network(kubelet, pod)
    container = kubelet.run_container(pod, "ticker", zic_image("ticker"))
    kubelet.client.wait_state(container, CONTAINER_RUNNING, timeout=GUEST_TIMEOUT)
    kubelet.wait_log(pod.log_directory / "ticker" / "0.log", "tick 1", timeout=GUEST_TIMEOUT)
    kubelet.forget_pod(pod)
    left = kubelet.wait_clean()
    assert left.clean(), f"left behind: {left}"
