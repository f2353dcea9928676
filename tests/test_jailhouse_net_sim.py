"""A networked ZIC on the simulated Jailhouse board, through the runphi CLI.

The board's daemon (and so its ivshmem-net stand-in taps) and every runphi command run
inside a network namespace the test makes, standing in for the root cell's; a pod is a
second namespace joined to a third by a veth (``tests.test_kvm_net.pod``). Guests are script
guests (the link is the root side's business: what the guest does with it is tested with
the QEMU engine in tests/test_sim_ivshmem_net.py and end to end in tests/test_cri_net.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.test_jailhouse_net import _addresses, _forwarding, _nft_tables
from tests.test_kvm_net import own_namespace, pod, taps  # noqa: F401  (fixture)
from tests.test_lifecycle_harness import (Zic, board_in_tempdir, guest_script, subreaper,  # noqa: F401
                                          wait_exit, wait_for, zic_on)

NETWORKED = {"net": "yes"}
TICKER = guest_script("tick 50 alive")


@pytest.fixture(scope="module")
def root_namespace():
    with own_namespace("jhroot") as name:
        yield name


@pytest.fixture(scope="module")
def net_board(subreaper, root_namespace):
    with board_in_tempdir(netns=root_namespace) as board:
        yield board


@pytest.fixture
def zic(net_board, tmp_path):
    with zic_on(net_board, tmp_path) as z:
        yield z


def link_devices(namespace: str) -> list[str]:
    """The simulator's ivshmem-net stand-ins present in ``namespace``."""
    return [name for name in taps(namespace) if name.startswith("ivshmnet")]


def in_pod(bundle: Path, pod_namespace: str) -> Path:
    """The bundle's spec joined to ``pod_namespace`` (as a CRI pod's container is)."""
    spec = json.loads((bundle / "config.json").read_text())
    spec.setdefault("linux", {})["namespaces"] = [{"type": "network", "path": f"/run/netns/{pod_namespace}"}]
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def assert_nothing_left(zic: Zic, *namespaces: str) -> None:
    """No link device, NAT table or link record; no cell; an empty ledger."""
    for namespace in namespaces:
        assert link_devices(namespace) == [], f"a link device was left in {namespace}"
        assert _nft_tables(namespace).strip() == "", f"an nftables table was left in {namespace}"
    records = zic.node / "jailhouse-links"
    assert not records.is_dir() or list(records.iterdir()) == [], list(records.iterdir())
    assert zic.board.cells() == {}
    ledger = zic.node / "jailhouse-ledger.json"
    assert not ledger.exists() or json.loads(ledger.read_text())["allocations"] == {}


def test_without_a_pod_the_link_gets_the_roots_address_on_the_root_and_delete_removes_it(zic, root_namespace):
    monitor = zic.create("plain", zic.bundle("plain", TICKER, boot=NETWORKED))
    [device] = link_devices(root_namespace)
    assert _addresses(root_namespace, device) == ["169.254.101.5/30"]
    zic.run("kill", "plain", "KILL", check=True)
    assert wait_exit(monitor, timeout=30) == 137
    zic.run("delete", "plain", check=True)
    assert_nothing_left(zic, root_namespace)


def test_in_a_pod_the_link_moves_in_and_the_pods_ip_goes_to_the_guest(zic, root_namespace, pod):
    _, inside = pod
    monitor = zic.create("podded", in_pod(zic.bundle("podded", TICKER, boot=NETWORKED), inside))
    assert link_devices(root_namespace) == []
    [device] = link_devices(inside)
    assert _addresses(inside, device) == ["169.254.101.5/30"] and _forwarding(inside) == "1"
    rules = subprocess.run(["nsenter", f"--net=/run/netns/{inside}", "nft", "list", "table", "ip", "runphi"],
                           capture_output=True, text=True, check=True).stdout
    assert "ip daddr 169.254.60.2 dnat to 169.254.101.6" in rules

    second = zic.run("create", "--bundle", str(in_pod(zic.bundle("second", TICKER, boot=NETWORKED), inside)),
                     "second")
    assert second.returncode == 1 and "already goes to another ZIC" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert len(link_devices(inside)) == 1, "the refused ZIC left its link in the pod"

    zic.run("kill", "podded", "KILL", check=True)
    assert wait_exit(monitor, timeout=30) == 137
    zic.run("delete", "podded", check=True)
    assert _forwarding(inside) == "0"
    assert_nothing_left(zic, root_namespace, inside)


def test_with_every_link_taken_a_networked_create_is_one_clear_line(zic, root_namespace):
    for name in ("first", "second"):
        zic.create(name, zic.bundle(name, TICKER, boot=NETWORKED))
    third = zic.run("create", "--bundle", str(zic.bundle("third", TICKER, boot=NETWORKED)), "third")
    assert third.returncode == 1 and "all 2 ivshmem links are in use" in third.stderr, third.stderr
    assert len(third.stderr.strip().splitlines()) == 1, third.stderr
    devices = link_devices(root_namespace)
    assert len(devices) == 2
    assert sorted(_addresses(root_namespace, d)[0] for d in devices) == ["169.254.101.5/30", "169.254.101.9/30"]
    for name in ("first", "second"):
        zic.run("delete", "--force", name, check=True)
    assert_nothing_left(zic, root_namespace)


@pytest.mark.parametrize("step", ["create:allocated", "create:cell-created", "create:linked", "create:loaded",
                                  "create:launched", "create:recorded"])
def test_a_create_killed_at_any_step_leaves_no_link_rule_or_address_after_delete_force(zic, root_namespace, pod,
                                                                                      step):
    """kill -9 of a networked create in a pod wherever it is; ``delete --force`` then leaves no
    device, NAT table or forwarding switch in the pod, no cell and no ledger entry."""
    from runphi.procfs import process_state
    from tests.test_lifecycle_harness import RUNPHI

    _, inside = pod
    bundle = in_pod(zic.bundle("crashed", TICKER, boot=NETWORKED), inside)
    with open(zic.base / "create.out", "wb") as out:
        create = subprocess.Popen([*zic.prefix, str(RUNPHI), "--root", str(zic.root), "create", "--bundle",
                                   str(bundle), "crashed"], env={**zic.env, "RUNPHI_TEST_PAUSE_AT": step},
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for(lambda: create.poll() is not None or process_state(create.pid) == "T", timeout=30,
                 what=f"create to stop at {step}")
        assert create.poll() is None, (zic.base / "create.out").read_text()
    finally:
        create.kill()
        create.wait()
    deleted = zic.run("delete", "--force", "crashed")
    assert deleted.returncode == 0 and "Traceback" not in deleted.stderr, deleted.stderr
    assert _forwarding(inside) == "0"
    assert_nothing_left(zic, root_namespace, inside)


# ---- a real guest: the networked Linux ZIC under the simulator's QEMU engine ----------------------------


@pytest.fixture(scope="module")
def qemu_root_namespace():
    with own_namespace("jhqemu") as name:
        yield name


@pytest.fixture(scope="module")
def qemu_net_board(subreaper, qemu_root_namespace):
    import shutil

    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 not found (apt-get install qemu-system-arm)")
    with board_in_tempdir(engine="qemu", netns=qemu_root_namespace) as board:
        yield board


@pytest.fixture
def qemu_zic(qemu_net_board, tmp_path):
    with zic_on(qemu_net_board, tmp_path) as z:
        yield z


def zic_console_until(zic: Zic, container_id: str, marker: bytes, timeout: float = 120) -> bytes:
    """The ZIC's console from its first byte until ``marker`` (``runphi logs -f``)."""
    from tests.backend_contract.contract import console_until as follow

    return follow(zic.root, zic.env, container_id, marker, timeout)


def served_page(namespace: str, address: str) -> tuple[int, str]:
    import trio

    from tools.linux_guest.testing import http_get_in

    status, body = trio.run(http_get_in, namespace, address)
    return status, body.decode()


@pytest.mark.qemu
def test_the_linux_guest_serves_its_page_on_the_links_guest_address(qemu_zic, qemu_root_namespace, tmp_path):
    from tests.test_kvm_net import networked_linux_bundle
    from tools.linux_guest import HTTP_PAGE
    from tools.linux_guest.initramfs import NET_READY_MESSAGE

    monitor = qemu_zic.create("web", networked_linux_bundle(tmp_path))
    qemu_zic.run("start", "web", check=True)
    console = zic_console_until(qemu_zic, "web", f"{NET_READY_MESSAGE} 169.254.101.6/30".encode())
    assert b"network setup failed" not in console
    assert served_page(qemu_root_namespace, "169.254.101.6") == (200, HTTP_PAGE)
    qemu_zic.run("kill", "web", "KILL", check=True)
    assert wait_exit(monitor, timeout=60) == 137
    qemu_zic.run("delete", "web", check=True)
    assert_nothing_left(qemu_zic, qemu_root_namespace)


@pytest.mark.qemu
def test_in_a_pod_the_linux_guest_answers_on_the_pods_address_through_nat(qemu_zic, qemu_root_namespace, pod,
                                                                          tmp_path):
    from tests.test_kvm_net import networked_linux_bundle
    from tools.linux_guest import HTTP_PAGE
    from tools.linux_guest.initramfs import NET_READY_MESSAGE

    outside, inside = pod
    monitor = qemu_zic.create("podweb", in_pod(networked_linux_bundle(tmp_path), inside))
    qemu_zic.run("start", "podweb", check=True)
    zic_console_until(qemu_zic, "podweb", f"{NET_READY_MESSAGE} 169.254.101.6/30".encode())
    assert served_page(outside, "169.254.60.2") == (200, HTTP_PAGE)
    qemu_zic.run("kill", "podweb", "KILL", check=True)
    assert wait_exit(monitor, timeout=60) == 137
    qemu_zic.run("delete", "podweb", check=True)
    assert _forwarding(inside) == "0"
    assert_nothing_left(qemu_zic, qemu_root_namespace, inside)
