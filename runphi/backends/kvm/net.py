"""A networked KVM ZIC's link: a tap on the host side, a virtio-net device in the VM.

Without a pod (:class:`Link`), the link of ledger slot ``n`` is the ``n``-th /30 of the
host template's link subnet (link-local by default): the host side (the tap) has the
first address, the guest the second. The tap is created by ``launch`` in the network
namespace runphi runs in, persistent and up, named after its cell, and QEMU attaches to
it by name.

In a pod (:class:`PodLink`, the spec names the pod's network namespace), the guest takes
the pod's place: its tap is made inside the pod's namespace, reaches QEMU as an fd, and
every frame is redirected between it and the pod's interface (kata's model: the link is
L2-transparent, so no address translation is needed).

A Linux guest learns its address from ``runphi.net=<address>/<prefix>[,<gateway>]`` on
its kernel command line. ``launch`` writes the VM plan naming the link before it makes
the link, so ``destroy_cell`` removes it even after a crash.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import struct
import threading
from collections.abc import Callable

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
    return Link(tap=tap_name(cell_name), host_address=str(hosts[0]), guest_address=str(hosts[1]), mac=mac)


def link_slots(subnet: str) -> range:
    """The ledger slots a link subnet offers (slot 0, its first /30, is never handed out)."""
    return range(1, 2 ** (LINK_PREFIX - ipaddress.IPv4Network(subnet).prefixlen))


def tap_name(cell_name: str) -> str:
    """The tap of ``cell_name``'s link, whatever its slot or namespace (fits IFNAMSIZ)."""
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


# ---- a ZIC in a pod: the link joins the pod's network namespace ------------------------------

#: tun ioctl and flags (linux/if_tun.h): make or attach the tap named in the request.
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
#: tc: the ingress qdisc's handle, and "every protocol" for a u32 match-all filter.
_INGRESS = 0xFFFF0000
_ETH_P_ALL = 0x0003


class PodLink(msgspec.Struct, frozen=True, kw_only=True):
    """A ZIC's link inside its pod's network namespace: L2-transparent, so the guest *is* the
    pod's address. The tap and the pod interface redirect every frame to each other (tc
    ingress + mirred), the guest's NIC has the pod interface's MAC, and the guest is given
    the pod's address, prefix and default gateway."""

    namespace: str
    interface: str
    tap: str
    address: str
    gateway: str
    mac: str

    def guest_argument(self) -> str:
        gateway = f",{self.gateway}" if self.gateway else ""
        return f"{GUEST_NET_ARGUMENT}={self.address}{gateway}"


def read_pod_link(namespace: str, cell_name: str) -> PodLink:
    """The pod's addressing, read from its namespace: the interface of its default route (else
    its only non-loopback interface with an IPv4 address). BackendError when it has none."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute(netns=namespace, flags=0) as ipr:
            routes = [r for r in ipr.get_default_routes(family=2) if r.get_attr("RTA_OIF")]
            addresses = [a for a in ipr.get_addr(family=2) if a.get_attr("IFA_LABEL") != "lo"]
            if routes:
                index = routes[0].get_attr("RTA_OIF")
                addresses = [a for a in addresses if a["index"] == index]
            if not addresses:
                raise BackendError(f"the pod's network namespace {namespace} has no IPv4 address to give "
                                   "the ZIC (did the CNI plugin run?)")
            chosen = addresses[0]
            link = ipr.get_links(chosen["index"])[0]
    except (NetlinkError, OSError) as exc:
        raise BackendError(f"cannot read the pod's network namespace {namespace}: {exc}") from None
    gateway = (routes[0].get_attr("RTA_GATEWAY") or "") if routes else ""
    return PodLink(namespace=namespace, interface=link.get_attr("IFLA_IFNAME"), tap=tap_name(cell_name),
                   address=f"{chosen.get_attr('IFA_ADDRESS')}/{chosen['prefixlen']}", gateway=gateway,
                   mac=link.get_attr("IFLA_ADDRESS"))


def open_pod_tap(link: PodLink) -> int:
    """Make the link's tap inside the pod's namespace and wire the redirects; the tap's fd
    (QEMU's ``-netdev tap,fd=``). The tap lives as long as an fd of it is open."""
    fd = _in_namespace(link.namespace, lambda: _open_tap(link.tap))
    try:
        _redirect_both_ways(link)
    except BaseException:
        os.close(fd)
        remove_pod_redirect(link)
        raise
    return fd


def _redirect_both_ways(link: PodLink) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute(netns=link.namespace, flags=0) as ipr:
            pod = ipr.link_lookup(ifname=link.interface)[0]
            tap = ipr.link_lookup(ifname=link.tap)[0]
            ipr.link("set", index=tap, state="up")
            for source, target in ((pod, tap), (tap, pod)):
                ipr.tc("add", "ingress", index=source)
                ipr.tc("add-filter", "u32", index=source, parent=_INGRESS, protocol=_ETH_P_ALL, keys=["0x0/0x0+0"],
                       target=0x10020, action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                                                "ifindex": target}])
    except (NetlinkError, OSError, IndexError) as exc:
        raise BackendError(f"cannot join the ZIC's link to {link.interface} in {link.namespace}: {exc}") from None


def remove_pod_redirect(link: PodLink) -> None:
    """Remove the redirect from the pod interface (the tap's own goes with the tap); never raises."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute(netns=link.namespace, flags=0) as ipr:
            for index in ipr.link_lookup(ifname=link.interface):
                ipr.tc("del", "ingress", index=index)
    except (NetlinkError, OSError):
        pass  # no redirect there, or the pod's namespace is gone already


def _in_namespace(namespace: str, work: Callable[[], int]) -> int:
    """``work()`` on a thread that entered ``namespace`` (setns changes only the calling thread;
    this one ends with the work, so nothing else ever runs in the pod's namespace)."""
    from pyroute2 import netns

    results: list[int] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            netns.setns(namespace, flags=0)
            results.append(work())
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=body, name="runphi-netns")
    thread.start()
    thread.join()
    if errors:
        raise BackendError(f"cannot make the ZIC's tap in {namespace}: {errors[0]}") from None
    return results[0]


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    _ipv4_only(name)
    return fd
