"""What every backend's network link shares: its addresses, what the guest is told, the pod's
interface, and work done inside another network namespace.

A networked ZIC has one point-to-point link to the root (DESIGN §15). Without a pod, the
link of ledger slot ``n`` is the ``n``-th /30 of a link subnet (link-local by default): the
root side has the first address, the guest the second. A guest that cannot be told its
address (a bare-metal or RTOS image with a fixed one) states it in the boot description's
``netconf`` as ``<guest address>/<prefix>,<root address>``; runphi then gives the root side
that address instead. Any other ``netconf`` (runPHI's root-side bridge name) is ignored:
runphi has no bridge on the root side.

A Linux guest learns its address from ``runphi.net=<address>/<prefix>[,<gateway>]`` on its
kernel command line (Debian's arm64 kernel has no ``ip=`` autoconfiguration).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import msgspec

from runphi.backends.base import BackendError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

    from runphi.oci import Config

T = TypeVar("T")

#: The kernel command line argument a Linux guest configures its network from.
GUEST_NET_ARGUMENT = "runphi.net"
LINK_PREFIX = 30


class LinkAddresses(msgspec.Struct, frozen=True, kw_only=True):
    """The two ends of a point-to-point link."""

    root: str
    guest: str
    prefix: int = LINK_PREFIX

    def guest_argument(self) -> str:
        """The kernel argument that gives a Linux guest its end, the root's being its gateway."""
        return f"{GUEST_NET_ARGUMENT}={self.guest}/{self.prefix},{self.root}"


def link_addresses(subnet: str, slot: int, netconf: str = "") -> LinkAddresses:
    """The addresses of ledger slot ``slot``'s link (1-based) in ``subnet``, or those the image
    states in ``netconf`` when it holds addresses (runPHI's bridge names do not: ignored).
    BackendError when the slot does not fit or the stated addresses cannot be read."""
    if "/" in netconf:
        return _stated_addresses(netconf)
    network = ipaddress.IPv4Network(subnet)
    links = list(network.subnets(new_prefix=LINK_PREFIX))
    if not 1 <= slot < len(links):
        raise BackendError(f"network link slot {slot} does not fit the link subnet {subnet}")
    hosts = list(links[slot].hosts())
    return LinkAddresses(root=str(hosts[0]), guest=str(hosts[1]))


def _stated_addresses(netconf: str) -> LinkAddresses:
    """``<guest address>/<prefix>,<root address>``, both in one network."""
    try:
        guest_text, root_text = (part.strip() for part in netconf.split(","))
        guest = ipaddress.IPv4Interface(guest_text)
        root = ipaddress.IPv4Address(root_text)
    except ValueError:
        raise BackendError(f"the image's netconf {netconf!r} is not "
                           "'<guest address>/<prefix>,<root address>' (IPv4)") from None
    if root not in guest.network or root == guest.ip:
        raise BackendError(f"the image's netconf {netconf!r}: the root address must be another "
                           f"address of {guest.network}")
    return LinkAddresses(root=str(root), guest=str(guest.ip), prefix=guest.network.prefixlen)


def link_slots(subnet: str) -> range:
    """The ledger slots a link subnet offers (slot 0, its first /30, is never handed out)."""
    return range(1, 2 ** (LINK_PREFIX - ipaddress.IPv4Network(subnet).prefixlen))


# ---- a CRI pod's network namespace ----------------------------------------------------------


def pod_namespace(config: Config) -> str:
    """The network namespace the spec joins (a CRI pod's), or "" when it names none."""
    namespaces = config.linux.namespaces if config.linux else []
    return next((ns.path for ns in namespaces if ns.type == "network" and ns.path), "")


class PodInterface(msgspec.Struct, frozen=True, kw_only=True):
    """The interface a pod's IP lives on (inside the pod's network namespace)."""

    namespace: str
    name: str
    #: ``<address>/<prefix>``
    address: str
    gateway: str
    mac: str

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


def read_pod_interface(namespace: str) -> PodInterface:
    """The pod's addressing, read from its namespace: the interface of its default route (else
    its only non-loopback interface with an IPv4 address). BackendError when it has none."""
    from pyroute2.netlink.exceptions import NetlinkError

    def read(ipr: IPRoute) -> PodInterface:
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
        gateway = (routes[0].get_attr("RTA_GATEWAY") or "") if routes else ""
        return PodInterface(namespace=namespace, name=link.get_attr("IFLA_IFNAME"),
                            address=f"{chosen.get_attr('IFA_ADDRESS')}/{chosen['prefixlen']}", gateway=gateway,
                            mac=link.get_attr("IFLA_ADDRESS"))

    try:
        return netlink_in(namespace, read)
    except (NetlinkError, OSError) as exc:
        raise BackendError(f"cannot read the pod's network namespace {namespace}: {exc}") from None


def in_namespace(namespace: str, work: Callable[[], T]) -> T:
    """``work()`` run inside ``namespace``; BackendError when the namespace cannot be entered or
    the work fails (a BackendError of the work's own passes unchanged)."""
    try:
        return run_in_namespace(namespace, work)
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"in the network namespace {namespace}: {exc}") from None


def netlink_in(namespace: str, work: Callable[[IPRoute], T]) -> T:
    """``work(ipr)`` with a netlink socket of ``namespace`` ("": the caller's own). The socket is
    opened by a thread that entered the namespace, never by pyroute2's ``netns=`` helper, which
    forks a process that would inherit the caller's signal handlers. The work's exceptions
    (NetlinkError, OSError) pass unchanged."""
    from pyroute2 import IPRoute

    def run() -> T:
        with IPRoute() as ipr:
            return work(ipr)

    return run_in_namespace(namespace, run) if namespace else run()


def run_in_namespace(namespace: str, work: Callable[[], T]) -> T:
    """``work()`` on a thread that entered network namespace ``namespace`` (a name under
    /run/netns or a path; setns changes only the calling thread, and this one ends with the
    work, so nothing else ever runs in that namespace). Its exception, if any, is re-raised
    here unchanged."""
    from pyroute2 import netns

    results: list[T] = []
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
        raise errors[0]
    return results[0]


def ipv4_only(interface: str) -> None:
    """No IPv6 on ``interface`` of the calling thread's namespace (a link's addresses are IPv4):
    no router solicitations, no DAD."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6", "w") as setting:
            setting.write("1\n")
    except OSError:
        pass  # a host without IPv6 sends none anyway
