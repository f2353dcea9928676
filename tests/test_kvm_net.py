"""A networked ZIC on the KVM backend, without a pod (``net: true`` under the runphi CLI): its
link is a tap with the link subnet's host address, the guest's virtio-net NIC gets the
guest address, and the Linux guest's httpd answers on it. ``delete`` removes the tap.

runphi runs inside a network namespace the test makes (``nsenter --net``), so the tap,
and every packet, stay in it; the addresses are link-local (169.254.0.0/16).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from tests.test_kvm_backend import kvm_cli  # noqa: F401  (fixture)
from tests.test_lifecycle_harness import run_runphi, subreaper, wait_exit  # noqa: F401  (fixture)

pytestmark = pytest.mark.qemu


@pytest.fixture
def namespace():
    """A network namespace of the test's own, removed afterwards."""
    from pyroute2 import netns

    name = f"rphi-kvmnet-{os.getpid()}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


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
