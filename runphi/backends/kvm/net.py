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
import os
import struct

import msgspec

from runphi.backends.base import BackendError
from runphi.backends.links import (GUEST_NET_ARGUMENT, LINK_PREFIX, LinkAddresses, PodInterface, in_namespace,
                                   ipv4_only, link_addresses, netlink_in, read_pod_interface)


class Link(msgspec.Struct, frozen=True, kw_only=True):
    """One ZIC's point-to-point link."""

    tap: str
    host_address: str
    guest_address: str
    #: The guest NIC's MAC (locally administered, from the cell name).
    mac: str
    prefix: int = LINK_PREFIX

    def guest_argument(self) -> str:
        return LinkAddresses(root=self.host_address, guest=self.guest_address, prefix=self.prefix).guest_argument()


def plan_link(cell_name: str, subnet: str, slot: int, netconf: str = "") -> Link:
    """The link of ledger slot ``slot`` (1-based) in ``subnet`` (or as the image's ``netconf``
    states it); BackendError when it does not fit."""
    addresses = link_addresses(subnet, slot, netconf)
    digest = hashlib.sha256(cell_name.encode()).digest()
    mac = "02:" + ":".join(f"{byte:02x}" for byte in digest[:5])
    return Link(tap=tap_name(cell_name), host_address=addresses.root, guest_address=addresses.guest, mac=mac,
                prefix=addresses.prefix)


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
            ipv4_only(link.tap)
            index = ipr.link_lookup(ifname=link.tap)[0]
            ipr.addr("add", index=index, address=link.host_address, prefixlen=link.prefix)
            ipr.link("set", index=index, state="up")
    except (NetlinkError, OSError) as exc:
        remove_tap(link.tap)
        raise BackendError(f"cannot make the network link's tap {link.tap}: {exc}") from None


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
    """The pod's link for ``cell_name``: the guest takes the pod interface's address, MAC and gateway."""
    pod: PodInterface = read_pod_interface(namespace)
    return PodLink(namespace=namespace, interface=pod.name, tap=tap_name(cell_name), address=pod.address,
                   gateway=pod.gateway, mac=pod.mac)


def open_pod_tap(link: PodLink) -> int:
    """Make the link's tap inside the pod's namespace and wire the redirects; the tap's fd
    (QEMU's ``-netdev tap,fd=``). The tap lives as long as an fd of it is open."""
    fd = in_namespace(link.namespace, lambda: _open_tap(link.tap))
    try:
        _redirect_both_ways(link)
    except BaseException:
        os.close(fd)
        remove_pod_redirect(link)
        raise
    return fd


def _redirect_both_ways(link: PodLink) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    def redirect(ipr) -> None:
        pod = ipr.link_lookup(ifname=link.interface)[0]
        tap = ipr.link_lookup(ifname=link.tap)[0]
        ipr.link("set", index=tap, state="up")
        for source, target in ((pod, tap), (tap, pod)):
            ipr.tc("add", "ingress", index=source)
            ipr.tc("add-filter", "u32", index=source, parent=_INGRESS, protocol=_ETH_P_ALL, keys=["0x0/0x0+0"],
                   target=0x10020, action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                                            "ifindex": target}])

    try:
        netlink_in(link.namespace, redirect)
    except (NetlinkError, OSError, IndexError) as exc:
        raise BackendError(f"cannot join the ZIC's link to {link.interface} in {link.namespace}: {exc}") from None


def remove_pod_redirect(link: PodLink) -> None:
    """Remove the redirect from the pod interface (the tap's own goes with the tap); never raises."""
    from pyroute2.netlink.exceptions import NetlinkError

    def remove(ipr) -> None:
        for index in ipr.link_lookup(ifname=link.interface):
            ipr.tc("del", "ingress", index=index)

    try:
        netlink_in(link.namespace, remove)
    except (NetlinkError, OSError):
        pass  # no redirect there, or the pod's namespace is gone already


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    ipv4_only(name)
    return fd
