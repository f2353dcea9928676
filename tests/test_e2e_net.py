"""``ctr run`` of a networked ZIC without a pod, end to end on both backends and in both modes:
the guest's page is reachable from the node on the link's guest address.

containerd (and on Jailhouse the simulator's daemon, the root cell's stand-in) runs inside a
network namespace the test makes, so the link — the simulator's ivshmem-net stand-in, or
the KVM backend's tap — and its addresses stay there. After ``ctr task rm`` the namespace
holds no link device and no address but the loopback's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.test_e2e_zic import assert_nothing_left, wait_for_text
from tests.test_kvm_net import own_namespace, taps
from tests.test_linux_guest_containerd import imported_linux_image
from tools.testbed.containerd import MODES

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

NET_IMAGE = "docker.io/library/runphi-linux-guest:e2e-net"
COMBOS = [(backend, mode) for backend in ("jailhouse", "kvm") for mode in MODES]
#: The guest's end of slot 1's link: the 2nd address of the 2nd /30 of each backend's link subnet.
GUEST_ADDRESS = {"jailhouse": "169.254.101.6", "kvm": "169.254.100.6"}


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{b}-{m}" for b, m in COMBOS])
def net_node(request, runphi_bin: Path, built_inmates: Path):
    """A private containerd (and board) inside a namespace of the test's own."""
    from tools.testbed.containerd import missing_requirements, running_zic_node

    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    backend, mode = request.param
    with own_namespace(f"e2e-{backend[:3]}-{mode[:3]}") as namespace:
        with running_zic_node(runphi_bin, mode=mode, prefix="rphi-net-", backend=backend, netns=namespace) as node:
            yield node


@pytest.fixture(scope="module")
def networked_image(net_node, tmp_path_factory) -> str:
    with imported_linux_image(net_node, tmp_path_factory.mktemp("net-image"), NET_IMAGE, "--net") as image:
        yield image


def addresses(namespace: str) -> list[str]:
    """IPv4 addresses in ``namespace`` other than the loopback's."""
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace, flags=0) as ipr:
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2) if a.get_attr("IFA_LABEL") != "lo"]


def test_ctr_run_serves_the_page_on_the_links_guest_address(net_node, networked_image, tmp_path):
    from tools.linux_guest import HTTP_PAGE
    from tools.linux_guest.initramfs import NET_READY_MESSAGE
    from tools.linux_guest.testing import http_get_in

    namespace, guest = net_node.netns, GUEST_ADDRESS[net_node.backend]
    log = tmp_path / "web.log"
    ctr = net_node.containerd.ctr
    started = ctr("run", "-d", "--log-uri", f"file://{log}", *net_node.zic_flags(), networked_image, "net-web")
    assert started.returncode == 0, started.stderr
    try:
        wait_for_text(log, f"{NET_READY_MESSAGE} {guest}/30")
        assert len(taps(namespace)) == 1, taps(namespace)  # the link's root side, in the node's namespace
        status, body = trio.run(http_get_in, namespace, guest)
        assert (status, body.decode()) == (200, HTTP_PAGE)
        assert ctr("task", "kill", "--signal", "SIGKILL", "net-web").returncode == 0
    finally:
        ctr("task", "rm", "--force", "net-web")
        ctr("containers", "rm", "net-web")
    assert_nothing_left(net_node, "net-web")
    assert taps(namespace) == [] and addresses(namespace) == [], "the link was left behind"
