"""A networked Jailhouse ZIC's link, root side: the net device the root's ivshmem-net driver
makes for the cell's virtual PCI device (the simulator's stand-in is a tap).

The device appears when the cell is created and goes when it is destroyed; the platform
template says where it shows in sysfs (:attr:`Platform.ivshmem.netdev_dir`). runphi
configures it, depending on the container's spec:

* **No pod** (``ctr run``): the device keeps its namespace (the root's) and gets the root
  address of the link's /30; the guest has the other one.
* **A pod** (the spec names a network namespace): the device moves into the pod's namespace
  with the same /30, and the pod's address is translated to the guest's (nftables: DNAT of
  what reaches the pod's IP, masquerade of what the guest sends out). This is runPHI's
  model. The link is not L2-transparent: the guest's ivshmem-net driver picks its own MAC
  and the root's device is a separate interface, so the pod interface's frames cannot be
  handed to the guest unchanged as on KVM.

Before touching anything, ``launch`` writes a :class:`RootLink` record into
``<state_dir>/jailhouse-links/<cell>.json``; :func:`remove_root_link` undoes what the record
names, so ``delete`` (also ``--force`` after a crash at any step) leaves no address, rule or
forwarding switch behind.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import msgspec

from runphi.backends.base import BackendError
from runphi.files import atomic_write
from runphi.backends.links import LinkAddresses, PodInterface, in_namespace, ipv4_only, netlink_in

LINKS_DIR = "jailhouse-links"
#: The nftables table runphi adds to a pod's namespace (one networked ZIC per pod).
NAT_TABLE = "runphi"
#: How long the root's driver may take to register the net device after ``cell create``.
NETDEV_TIMEOUT = 5.0
_FORWARDING = "/proc/sys/net/ipv4/ip_forward"


class RootLink(msgspec.Struct, frozen=True, kw_only=True):
    """What runphi does to one cell's link root side (written before it does it)."""

    cell: str
    interface: str
    addresses: LinkAddresses
    #: The pod's interface when the link joined a pod ("namespace" "" = the root's own).
    pod: PodInterface | None = None
    #: The pod namespace's IPv4 forwarding switch before runphi turned it on ("" = unknown).
    forwarding_was: str = ""


def record_path(state_dir: str, cell: str) -> Path:
    return Path(state_dir) / LINKS_DIR / f"{cell}.json"


def find_root_netdev(directory: Path, cell: str, timeout: float = NETDEV_TIMEOUT) -> str:
    """The name of the one net device under ``directory`` (waiting up to ``timeout`` for the
    driver); BackendError naming the cell and the directory when none appears."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            names = []
        if names:
            return names[0]
        if time.monotonic() >= deadline:
            raise BackendError(f"cell {cell!r}: the root's net device for its network link did not appear "
                               f"under {directory} (is the ivshmem-net driver loaded in the root cell?)")
        time.sleep(0.02)


def write_record(state_dir: str, link: RootLink) -> None:
    """Write ``link``'s record atomically (the directory is made when missing)."""
    path = record_path(state_dir, link.cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, msgspec.json.encode(link))


def read_record(state_dir: str, cell: str) -> RootLink | None:
    """The cell's link record, or None when it has none (or only a torn one)."""
    try:
        return msgspec.json.decode(record_path(state_dir, cell).read_bytes(), type=RootLink)
    except (OSError, msgspec.ValidationError, msgspec.DecodeError):
        return None


def plan_pod_link(link: RootLink, pod: PodInterface) -> RootLink:
    """``link`` joined to ``pod``, with the pod namespace's current forwarding switch.
    BackendError when another ZIC of the pod has its address already."""
    taken, was = in_namespace(pod.namespace, lambda: (_has_nat_table(), _read_forwarding()))
    if taken:
        raise BackendError(f"cell {link.cell!r}: the pod's address {pod.ip} already goes to another ZIC "
                           "(a pod has one networked ZIC): give this one its own pod or no network")
    return msgspec.structs.replace(link, pod=pod, forwarding_was=was)


def make_root_link(link: RootLink) -> None:
    """Configure the root side as :class:`RootLink` says; BackendError when the kernel refuses."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        if link.pod is None:
            ipv4_only(link.interface)
            netlink_in("", lambda ipr: _address_and_up(ipr, link))
            return
        pod = link.pod
        netlink_in("", lambda ipr: ipr.link("set", index=_index(ipr, link.interface), net_ns_fd=pod.namespace))
        in_namespace(pod.namespace, lambda: _forwarding_on(link.interface))
        netlink_in(pod.namespace, lambda ipr: _address_and_up(ipr, link))
        in_namespace(pod.namespace, lambda: _nft(_nat_rules(link, pod)))
    except (NetlinkError, OSError, IndexError) as exc:
        raise BackendError(f"cell {link.cell!r}: cannot set up its network link {link.interface}: {exc}") from None


def _address_and_up(ipr, link: RootLink) -> None:
    index = _index(ipr, link.interface)
    ipr.addr("add", index=index, address=link.addresses.root, prefixlen=link.addresses.prefix)
    ipr.link("set", index=index, state="up")


def _index(ipr, interface: str) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise BackendError(f"the net device {interface} is gone")
    return found[0]


def _read_forwarding() -> str:
    with open(_FORWARDING) as setting:
        return setting.read().strip()


def _forwarding_on(interface: str) -> None:
    ipv4_only(interface)
    with open(_FORWARDING, "w") as setting:
        setting.write("1\n")


def _nat_rules(link: RootLink, pod: PodInterface) -> str:
    """The pod's address is the guest's: DNAT what reaches it (from outside and from the pod
    itself), masquerade what the guest sends out of the pod."""
    guest = link.addresses.guest
    return f"""table ip {NAT_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{pod.name}" ip daddr {pod.ip} dnat to {guest}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr {pod.ip} dnat to {guest}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{pod.name}" ip saddr {guest} masquerade
  }}
}}
"""


def _nft(script: str) -> None:
    """Run an nft script in the calling thread's namespace; BackendError with nft's line."""
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise BackendError("nft is not installed (apt-get install nftables)") from None
    if done.returncode != 0:
        problem = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit {done.returncode}"
        raise BackendError(f"nft refused the pod's NAT rules: {problem}")


def remove_root_link(state_dir: str, cell: str) -> None:
    """Undo what the cell's link record names, then drop the record. Idempotent; never raises
    for a part already gone (the cell's device, the pod's namespace)."""
    link = read_record(state_dir, cell)
    if link is not None:
        if link.pod is not None:
            _unjoin_pod(link, link.pod)
        else:
            _remove_address(link, namespace="")
    record_path(state_dir, cell).unlink(missing_ok=True)


def _unjoin_pod(link: RootLink, pod: PodInterface) -> None:
    if not os.path.exists(pod.namespace):
        return  # the pod's namespace is gone, and everything runphi added in it with it
    try:
        in_namespace(pod.namespace, lambda: _undo_nat(link.forwarding_was))
    except BackendError:
        pass  # the namespace went while we worked in it
    _remove_address(link, namespace=pod.namespace)
    _return_to_root(link, pod)


def _undo_nat(forwarding_was: str) -> None:
    """In the pod's namespace: drop runphi's NAT table, and put the forwarding switch back
    when runphi turned it on."""
    if _has_nat_table():
        _nft(f"delete table ip {NAT_TABLE}\n")
    if forwarding_was and forwarding_was != "1":
        _restore_forwarding(forwarding_was)


def _return_to_root(link: RootLink, pod: PodInterface) -> None:
    """Move the device back to runphi's namespace if it outlived the cell: on a board the root's
    ivshmem-net device lives from ``enable`` to ``disable``, and the next ZIC on its slot
    looks for it in the root's sysfs."""
    from pyroute2.netlink.exceptions import NetlinkError

    def move_back(ipr) -> None:
        for index in ipr.link_lookup(ifname=link.interface):
            ipr.link("set", index=index, state="down")
            ipr.link("set", index=index, net_ns_fd=ours)

    try:
        ours = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        netlink_in(pod.namespace, move_back)
    except (NetlinkError, OSError):
        pass  # gone with its cell or its pod
    finally:
        os.close(ours)


def _has_nat_table() -> bool:
    """Whether the calling thread's namespace has runphi's NAT table."""
    try:
        listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return False
    return f"table ip {NAT_TABLE}" in listed.stdout.splitlines()


def _restore_forwarding(value: str) -> None:
    with open(_FORWARDING, "w") as setting:
        setting.write(f"{value}\n")


def _remove_address(link: RootLink, namespace: str) -> None:
    """Take the link's root address off its device, if the device is still there."""
    from pyroute2.netlink.exceptions import NetlinkError

    def remove(ipr) -> None:
        for index in ipr.link_lookup(ifname=link.interface):
            ipr.addr("del", index=index, address=link.addresses.root, prefixlen=link.addresses.prefix)

    try:
        netlink_in(namespace, remove)
    except (NetlinkError, OSError):
        pass  # the device went with its cell
