"""A networked ZIC on the KVM backend (``net: true``), its Linux guest's httpd answering:

* without a pod (the runphi CLI alone): the link is a tap with the link subnet's host
  address, the guest's virtio-net NIC gets the guest address; runphi runs inside a network
  namespace the test makes (``nsenter --net``), so the tap stays in it;
* in a pod (the spec names the pod's network namespace, as CRI does): the guest *is* the
  pod's address, reached through the pod's interface (a veth whose other end lives in a
  second namespace the test makes, standing in for the CNI bridge).

``delete`` removes the tap and every redirect. Every packet stays in namespaces the test
makes, on link-local addresses (169.254.0.0/16).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.test_kvm_backend import kvm_cli  # noqa: F401  (fixture)
from tests.test_lifecycle_harness import run_runphi, subreaper, wait_exit  # noqa: F401  (fixture)

pytestmark = pytest.mark.qemu


@contextmanager
def own_namespace(role: str) -> Iterator[str]:
    """A network namespace of the test's own, removed afterwards."""
    from pyroute2 import netns

    name = f"rphi-kvmnet-{role}-{os.getpid()}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


@pytest.fixture
def namespace():
    with own_namespace("ctr") as name:
        yield name


@pytest.fixture
def pod():
    """(outside, pod): two namespaces joined by a veth — ``vpeer`` 169.254.60.1/24 outside,
    ``eth0`` 169.254.60.2/24 in the pod with its default route via the outside end."""
    from pyroute2 import IPRoute

    with own_namespace("outside") as outside, own_namespace("pod") as inside:
        with IPRoute(netns=outside, flags=0) as ipr:
            ipr.link("add", ifname="vpeer", kind="veth", peer={"ifname": "eth0", "net_ns_fd": f"/run/netns/{inside}"})
            index = ipr.link_lookup(ifname="vpeer")[0]
            ipr.addr("add", index=index, address="169.254.60.1", prefixlen=24)
            ipr.link("set", index=index, state="up")
        with IPRoute(netns=inside, flags=0) as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address="169.254.60.2", prefixlen=24)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway="169.254.60.1")
        yield outside, inside


def networked_linux_bundle(directory: Path) -> Path:
    """The Linux ZIC, asking for a network (``net: true``)."""
    from tools.linux_guest.guest import default_cache_dir
    from tools.linux_guest.testing import guest_or_skip
    from tools.linux_guest.zic import default_dtb, mkzic_argv
    from tools.mkzic.cli import main as mkzic

    guest = guest_or_skip()
    bundle = directory / "linux-net"
    assert mkzic(mkzic_argv(guest, default_dtb(default_cache_dir()), bundle=bundle, net=True)) == 0
    return bundle


def in_namespace(namespace: str, cli, *args: str) -> subprocess.CompletedProcess[str]:
    """``runphi --root ROOT ARGS`` run inside ``namespace`` (its monitor and VM stay there)."""
    return run_runphi(cli.root, args, cli.env, cli.outputs, timeout=120,
                      prefix=("nsenter", f"--net=/run/netns/{namespace}"))


def taps(namespace: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace, flags=0) as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if link.get_attr("IFLA_IFNAME") != "lo"]


def test_networked_linux_zic_serves_its_page_on_the_links_guest_address(kvm_cli, namespace, tmp_path):  # noqa: F811
    from tools.linux_guest import HTTP_PAGE
    from tools.linux_guest.initramfs import NET_READY_MESSAGE
    from tools.linux_guest.testing import http_get_in

    bundle = networked_linux_bundle(tmp_path)
    created = in_namespace(namespace, kvm_cli, "create", "--bundle", str(bundle), "--pid-file",
                           str(tmp_path / "pid"), "web")
    assert created.returncode == 0, created.stderr
    monitor = int((tmp_path / "pid").read_text())
    kvm_cli.monitors.append(monitor)
    plan = (kvm_cli.base / "node" / "kvm-cells" / "web" / "vm.json").read_text()
    assert "runphi.net=169.254.100.6/30,169.254.100.5" in plan, plan  # slot 1 of the link subnet
    assert in_namespace(namespace, kvm_cli, "start", "web").returncode == 0
    console = kvm_cli.console_until("web", f"{NET_READY_MESSAGE} 169.254.100.6/30".encode(), timeout=120)
    assert b"network setup failed" not in console
    [tap] = taps(namespace)
    status, body = trio.run(http_get_in, namespace, "169.254.100.6")
    assert (status, body.decode()) == (200, HTTP_PAGE)
    assert in_namespace(namespace, kvm_cli, "kill", "web", "KILL").returncode == 0
    assert wait_exit(monitor, timeout=60) == 137
    deleted = in_namespace(namespace, kvm_cli, "delete", "web")
    assert deleted.returncode == 0, deleted.stderr
    assert taps(namespace) == [], f"the link's tap {tap} was left behind"


def ingress_filters(namespace: str, interface: str) -> int:
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace, flags=0) as ipr:
        index = ipr.link_lookup(ifname=interface)[0]
        return len(ipr.get_filters(index=index, parent=0xFFFF0000))


def test_networked_linux_zic_in_a_pod_answers_on_the_pods_address(kvm_cli, pod, tmp_path):  # noqa: F811
    from tools.linux_guest import HTTP_PAGE
    from tools.linux_guest.initramfs import NET_READY_MESSAGE
    from tools.linux_guest.testing import http_get_in

    outside, inside = pod
    bundle = networked_linux_bundle(tmp_path)
    spec = json.loads((bundle / "config.json").read_text())
    spec.setdefault("linux", {})["namespaces"] = [{"type": "network", "path": f"/run/netns/{inside}"}]
    (bundle / "config.json").write_text(json.dumps(spec))
    monitor = kvm_cli.started("in-pod", bundle)
    console = kvm_cli.console_until("in-pod", f"{NET_READY_MESSAGE} 169.254.60.2/24".encode(), timeout=120)
    assert b"network setup failed" not in console
    [tap] = [name for name in taps(inside) if name != "eth0"]
    assert tap.startswith("rphi"), taps(inside)  # the ZIC's tap lives in the pod
    status, body = trio.run(http_get_in, outside, "169.254.60.2")
    assert (status, body.decode()) == (200, HTTP_PAGE)  # the pod's address is the guest
    kvm_cli.run("kill", "in-pod", "KILL", check=True)
    assert wait_exit(monitor, timeout=60) == 137
    kvm_cli.run("delete", "in-pod", check=True)
    assert taps(inside) == ["eth0"], "the ZIC's tap was left in the pod"
    assert ingress_filters(inside, "eth0") == 0, "the redirect from the pod's interface was left behind"


@pytest.mark.parametrize("step", ["create:allocated", "create:linked", "create:launched", "create:recorded"])
def test_a_create_killed_at_any_step_leaves_no_tap_or_redirect_after_delete_force(kvm_cli, pod, tmp_path, step):  # noqa: F811
    """kill -9 of a networked create wherever it is; ``delete --force`` then leaves nothing in the
    pod (no tap, no redirect), no cell and no ledger entry."""
    from runphi.procfs import process_state
    from tests.test_lifecycle_harness import RUNPHI, wait_for

    _, inside = pod
    bundle = networked_linux_bundle(tmp_path)
    spec = json.loads((bundle / "config.json").read_text())
    spec.setdefault("linux", {})["namespaces"] = [{"type": "network", "path": f"/run/netns/{inside}"}]
    (bundle / "config.json").write_text(json.dumps(spec))
    with open(tmp_path / "create.out", "wb") as out:
        create = subprocess.Popen([str(RUNPHI), "--root", str(kvm_cli.root), "create", "--bundle", str(bundle),
                                   "crashed"], env={**kvm_cli.env, "RUNPHI_TEST_PAUSE_AT": step},
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for(lambda: create.poll() is not None or process_state(create.pid) == "T", timeout=60,
                 what=f"create to stop at {step}")
        assert create.poll() is None, (tmp_path / "create.out").read_text()
    finally:
        create.kill()
        create.wait()
    deleted = kvm_cli.run("delete", "--force", "crashed")
    assert deleted.returncode == 0 and "Traceback" not in deleted.stderr, deleted.stderr
    wait_for(lambda: taps(inside) == ["eth0"], timeout=30, what="the ZIC's tap to go")
    assert ingress_filters(inside, "eth0") == 0, "a redirect from the pod's interface was left behind"
    node = kvm_cli.base / "node"
    cells = node / "kvm-cells"
    left = [p.name for p in cells.iterdir() if not p.name.startswith(".")] if cells.is_dir() else []
    assert left == [], f"cells left behind: {left}"
    assert json.loads((node / "jailhouse-ledger.json").read_text())["allocations"] == {}
