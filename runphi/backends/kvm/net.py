"""A networked KVM ZIC's link: a tap on the host side, a virtio-net device in the VM.

The link of ledger slot ``n`` is the ``n``-th /30 of the host template's link subnet
(link-local by default): the host side (the tap) has the first address, the guest the
second. The tap is created by ``launch`` in the network namespace runphi runs in,
persistent and up, named after its cell (so that ``destroy_cell`` finds it even after a
crash), and QEMU attaches to it by name. A Linux guest learns its address from
``runphi.net=<address>/30,<host address>`` on its kernel command line.
"""

from __future__ import annotations

import hashlib
import ipaddress

import msgspec

from runphi.backends.base import BackendError

#: The kernel command line argument a Linux guest configures its network from.
GUEST_NET_ARGUMENT = "runphi.net"
LINK_PREFIX = 30


class Link(msgspec.Struct, frozen=True, kw_only=True):
    """One ZIC's point-to-point link."""

    tap: str
    host_address: str
    guest_address: str
    #: The guest NIC's MAC (locally administered, from the cell name).
    mac: str

    def guest_argument(self) -> str:
        return f"{GUEST_NET_ARGUMENT}={self.guest_address}/{LINK_PREFIX},{self.host_address}"


def plan_link(cell_name: str, subnet: str, slot: int) -> Link:
    """The link of ledger slot ``slot`` (1-based) in ``subnet``; BackendError when it does not fit."""
    network = ipaddress.IPv4Network(subnet)
    links = list(network.subnets(new_prefix=LINK_PREFIX))
    if not 1 <= slot < len(links):
        raise BackendError(f"network link slot {slot} does not fit the link subnet {subnet}")
    hosts = list(links[slot].hosts())
    digest = hashlib.sha256(cell_name.encode()).digest()
    mac = "02:" + ":".join(f"{byte:02x}" for byte in digest[:5])
    return Link(tap=f"rphi{digest.hex()[:11]}", host_address=str(hosts[0]), guest_address=str(hosts[1]), mac=mac)


def link_slots(subnet: str) -> range:
    """The ledger slots a link subnet offers (slot 0, its first /30, is never handed out)."""
    return range(1, 2 ** (LINK_PREFIX - ipaddress.IPv4Network(subnet).prefixlen))


def tap_name(cell_name: str) -> str:
    """The tap of ``cell_name``'s link, whatever its slot."""
    return f"rphi{hashlib.sha256(cell_name.encode()).hexdigest()[:11]}"


def create_tap(link: Link) -> None:
    """Create the link's tap (persistent), give it the host address and bring it up."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=link.tap, kind="tuntap", mode="tap")
            _ipv4_only(link.tap)
            index = ipr.link_lookup(ifname=link.tap)[0]
            ipr.addr("add", index=index, address=link.host_address, prefixlen=LINK_PREFIX)
            ipr.link("set", index=index, state="up")
    except (NetlinkError, OSError) as exc:
        remove_tap(link.tap)
        raise BackendError(f"cannot make the network link's tap {link.tap}: {exc}") from None


def _ipv4_only(tap: str) -> None:
    """No IPv6 on the link (its addresses are IPv4): no router solicitations, no DAD."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6", "w") as setting:
            setting.write("1\n")
    except OSError:
        pass  # a host without IPv6 sends none anyway


def remove_tap(name: str) -> None:
    """Remove the tap ``name`` and with it its address and routes (idempotent, never raises)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)
    except (NetlinkError, OSError):
        pass
