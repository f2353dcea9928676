"""The root side of a Jailhouse ZIC's network link (runphi.backends.jailhouse.net) and the
link addressing every backend shares (runphi.backends.links).

The kernel parts run for real inside namespaces the test makes: a "root" namespace holding
a veth end in the place of the ivshmem-net driver's, and a pod (``tests.test_kvm_net.pod``:
a veth whose pod end has 169.254.60.2/24). The end-to-end paths (the simulator's tap, the
guest answering through the pod's address) are in tests/test_cri_net.py and
tests/test_sim_ivshmem_net.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from runphi.backends.base import BackendError
from runphi.backends.links import LinkAddresses, in_namespace, link_addresses, link_slots
from tests.test_kvm_net import own_namespace, pod  # noqa: F401  (fixture)

ROOT_DEVICE = "ivshmnet0"


def test_a_slots_link_is_its_30_root_first_guest_second():
    assert link_addresses("169.254.101.0/24", 1) == LinkAddresses(root="169.254.101.5", guest="169.254.101.6")
    assert link_addresses("169.254.101.0/24", 2).guest_argument() == "runphi.net=169.254.101.10/30,169.254.101.9"
    assert list(link_slots("169.254.101.0/29")) == [1]
    with pytest.raises(BackendError, match="does not fit the link subnet"):
        link_addresses("169.254.101.0/29", 2)


def test_netconf_states_the_guests_fixed_address_and_the_roots():
    stated = link_addresses("169.254.101.0/24", 1, "192.0.2.10/24, 192.0.2.1")
    assert stated == LinkAddresses(root="192.0.2.1", guest="192.0.2.10", prefix=24)
    assert stated.guest_argument() == "runphi.net=192.0.2.10/24,192.0.2.1"


def test_a_netconf_without_addresses_is_runphis_bridge_name_and_ignored():
    assert link_addresses("169.254.101.0/24", 1, "br0") == link_addresses("169.254.101.0/24", 1)


@pytest.mark.parametrize("netconf", ["192.0.2.10/24", "192.0.2.10/24,198.51.100.1", "192.0.2.1/24,192.0.2.1"])
def test_stated_addresses_that_are_not_two_of_one_network_are_one_clear_error(netconf):
    with pytest.raises(BackendError, match="netconf"):
        link_addresses("169.254.101.0/24", 1, netconf)


def test_a_platform_whose_link_subnet_cannot_hold_its_slots_is_refused():
    from runphi.backends.jailhouse.errors import PlatformError
    from runphi.backends.jailhouse.platform import parse_platform

    text = (Path(__file__).resolve().parent.parent / "templates" / "sim-qemu-arm64.toml").read_text()
    with pytest.raises(PlatformError, match="too few /30 links"):
        parse_platform(text.replace('link_subnet = "169.254.101.0/24"', 'link_subnet = "169.254.101.0/29"'), "t")


def test_no_net_device_from_the_driver_is_one_line_naming_the_cell_and_where_it_looked(tmp_path):
    from runphi.backends.jailhouse.net import find_root_netdev

    with pytest.raises(BackendError) as raised:
        find_root_netdev(tmp_path / "0001:00:01.0" / "net", "web", timeout=0.05)
    assert "'web'" in str(raised.value) and "0001:00:01.0" in str(raised.value)
    assert "ivshmem-net driver" in str(raised.value)


# ---- on the kernel, in the test's namespaces --------------------------------------------------------


@pytest.fixture
def root_namespace():
    """A namespace standing in for the root cell's, with one end of a veth where the driver's
    device would be (the other end stands for the guest's side)."""
    from pyroute2 import IPRoute

    with own_namespace("root") as name:
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("add", ifname=ROOT_DEVICE, kind="veth", peer="guestside")
        yield name


def _as_root_cell(namespace: str, work):
    """``work()`` run in the stand-in root namespace (where runphi runs on a board)."""
    return in_namespace(f"/run/netns/{namespace}", work)


def _addresses(namespace: str, device: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace, flags=0) as ipr:
        index = ipr.link_lookup(ifname=device)
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(family=2, index=index[0])] \
            if index else []


def _links(namespace: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute(netns=namespace, flags=0) as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def _nft_tables(namespace: str) -> str:
    return subprocess.run(["nsenter", f"--net=/run/netns/{namespace}", "nft", "list", "tables"],
                          capture_output=True, text=True, check=True).stdout


def _forwarding(namespace: str) -> str:
    return subprocess.run(["nsenter", f"--net=/run/netns/{namespace}", "cat", "/proc/sys/net/ipv4/ip_forward"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _link(cell: str = "web") -> "RootLink":  # noqa: F821
    from runphi.backends.jailhouse.net import RootLink

    return RootLink(cell=cell, interface=ROOT_DEVICE, addresses=link_addresses("169.254.101.0/24", 1))


def test_without_a_pod_the_root_device_gets_the_roots_address_and_delete_takes_it_off(root_namespace, tmp_path):
    from runphi.backends.jailhouse.net import make_root_link, read_record, remove_root_link, write_record

    link = _link()
    write_record(str(tmp_path), link)
    _as_root_cell(root_namespace, lambda: make_root_link(link))
    assert _addresses(root_namespace, ROOT_DEVICE) == ["169.254.101.5/30"]
    _as_root_cell(root_namespace, lambda: remove_root_link(str(tmp_path), "web"))
    assert _addresses(root_namespace, ROOT_DEVICE) == []
    assert read_record(str(tmp_path), "web") is None


def test_in_a_pod_the_device_moves_in_and_the_pods_address_is_translated_to_the_guest(root_namespace, pod, tmp_path):
    from runphi.backends.jailhouse.net import (NAT_TABLE, make_root_link, plan_pod_link, remove_root_link,
                                               write_record)
    from runphi.backends.links import read_pod_interface

    _, inside = pod
    link = plan_pod_link(_link(), read_pod_interface(f"/run/netns/{inside}"))
    assert link.pod is not None and link.pod.ip == "169.254.60.2" and link.forwarding_was == "0"
    write_record(str(tmp_path), link)
    _as_root_cell(root_namespace, lambda: make_root_link(link))

    assert _addresses(root_namespace, ROOT_DEVICE) == [], "the device stayed in the root's namespace"
    assert _addresses(inside, ROOT_DEVICE) == ["169.254.101.5/30"]
    assert f"table ip {NAT_TABLE}" in _nft_tables(inside) and _forwarding(inside) == "1"
    rules = subprocess.run(["nsenter", f"--net=/run/netns/{inside}", "nft", "list", "table", "ip", NAT_TABLE],
                           capture_output=True, text=True, check=True).stdout
    assert "ip daddr 169.254.60.2 dnat to 169.254.101.6" in rules
    assert 'oifname "eth0" ip saddr 169.254.101.6 masquerade' in rules

    with pytest.raises(BackendError, match="already goes to another ZIC"):
        plan_pod_link(_link("second"), read_pod_interface(f"/run/netns/{inside}"))

    _as_root_cell(root_namespace, lambda: remove_root_link(str(tmp_path), "web"))
    assert _nft_tables(inside).strip() == "" and _forwarding(inside) == "0"
    assert ROOT_DEVICE not in _links(inside)
    # A board's device outlives the cell (it lives from `enable` to `disable`): it goes back
    # to the root, without the address, for the next ZIC on its slot.
    assert ROOT_DEVICE in _links(root_namespace) and _addresses(root_namespace, ROOT_DEVICE) == []


def test_removing_a_pod_link_whose_pod_is_gone_is_quiet(tmp_path):
    from runphi.backends.jailhouse.net import RootLink, read_record, remove_root_link, write_record
    from runphi.backends.links import PodInterface

    gone = PodInterface(namespace=str(tmp_path / "no-such-netns"), name="eth0", address="169.254.60.2/24",
                        gateway="", mac="02:00:00:00:00:01")
    write_record(str(tmp_path), RootLink(cell="web", interface=ROOT_DEVICE,
                                         addresses=link_addresses("169.254.101.0/24", 1), pod=gone))
    remove_root_link(str(tmp_path), "web")
    assert read_record(str(tmp_path), "web") is None
