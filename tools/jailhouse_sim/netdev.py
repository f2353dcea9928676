"""The simulator's stand-in for ivshmem-net: one Linux tap per virtual-ethernet link to the root.

On a board, a cell's ivshmem PCI device with protocol ``JAILHOUSE_SHMEM_PROTO_VETH`` whose
``bdf`` the root cell also has an endpoint at is a point-to-point Ethernet link: the root's
``ivshmem-net`` driver gives it a netdev on the root side, the cell's own ivshmem-net driver
the other end. The simulator models the root's netdev with a tap:

* **Made** when the cell is created (after it was admitted), one per such link, with
  ``TUNSETIFF`` (``IFF_TAP | IFF_NO_PI``) and the name pattern ``ivshmnet%d`` (environment
  ``JAILHOUSE_SIM_NETDEV_NAME``), so the kernel picks the number as it does for a driver's
  netdev. It is made in the daemon's network namespace, DOWN and without addresses: the
  root side (runphi) configures it, and may move it into another namespace.
* **Not persistent**: the daemon's descriptor is the tap's only anchor; closing it (cell
  destroy, ``disable``, daemon exit, or the kernel when the daemon dies) removes the tap
  wherever it is by then. Engines receive it for a guest run (``GuestSpec.nics``) and hand
  QEMU a duplicate, which is closed when that QEMU exits.
* **Published** like a PCI netdev in the kernel's sysfs:
  ``<sim root>/sys/bus/pci/devices/<domain:04x>:<bus:02x>:<slot:02x>.<fn:x>/net/<ifname>/``
  with ``ifindex`` and ``address``, appearing whole at creation and gone at close.
* **Failure** to make the tap (no ``/dev/net/tun``, ``EPERM``, a bad name pattern) does not
  fail the cell, as on a root without the driver: the caller logs one kernel-log line and
  nothing is published.

Only the standard library is used, so the simulator needs no netlink package.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .cellfile import PCI_TYPE_IVSHMEM, PciDevice
from .sysfs import publish_dir, withdraw_dir

SHMEM_PROTO_VETH = 0x0001
TUN_DEVICE = "/dev/net/tun"
NAME_PATTERN_ENV = "JAILHOUSE_SIM_NETDEV_NAME"
DEFAULT_NAME_PATTERN = "ivshmnet%d"

_TUNSETIFF = 0x400454CA
_SIOCGIFHWADDR = 0x8927
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFNAMSIZ = 16
_IFREQ = "16sH22x"  # struct ifreq: name, then a 24-byte union (here: flags, or a sockaddr)


@dataclass(frozen=True)
class Link:
    """A cell's VETH ivshmem device whose peer is the root cell (PCI domain and bdf)."""

    domain: int
    bdf: int

    @property
    def pci_name(self) -> str:
        """The kernel's PCI device name: ``dddd:bb:ss.f``."""
        bdf = self.bdf
        return f"{self.domain:04x}:{bdf >> 8:02x}:{bdf >> 3 & 0x1f:02x}.{bdf & 7:x}"


@dataclass(frozen=True)
class Tap:
    """An open, non-persistent tap: closing ``fd`` removes the interface."""

    fd: int
    name: str
    ifindex: int
    address: str  # the root side's MAC, "aa:bb:cc:dd:ee:ff"


@dataclass(frozen=True)
class Netdev:
    """One link's root-side tap, and the MAC the guest's end of the link uses."""

    link: Link
    tap: Tap
    guest_mac: str


def veth_links(devices: Iterable[PciDevice], root_bdfs: Iterable[int]) -> tuple[Link, ...]:
    """The devices that are ivshmem-net links to the root: type IVSHMEM, protocol VETH, and a
    ``bdf`` the root has an endpoint at (peers are matched by bdf only, as in the hypervisor)."""
    root = set(root_bdfs)
    return tuple(Link(d.domain, d.bdf) for d in devices
                 if d.type == PCI_TYPE_IVSHMEM and d.shmem_protocol == SHMEM_PROTO_VETH and d.bdf in root)


def guest_mac(cell_name: str, link: Link) -> str:
    """A locally administered unicast MAC for the guest's end, the same for every start of the cell."""
    digest = hashlib.sha256(f"{cell_name}\0{link.pci_name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def name_pattern() -> str:
    """The tap name pattern (``%d`` is replaced by the kernel with the lowest free number)."""
    return os.environ.get(NAME_PATTERN_ENV) or DEFAULT_NAME_PATTERN


def open_tap(pattern: str) -> Tap:
    """Make a tap named after ``pattern`` in this thread's network namespace, DOWN, no addresses.

    The descriptor is close-on-exec. Raises OSError (with the kernel's errno) if it cannot be made."""
    name = pattern.encode()
    if not name or len(name) >= _IFNAMSIZ:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifreq = fcntl.ioctl(fd, _TUNSETIFF, struct.pack(_IFREQ, name, _IFF_TAP | _IFF_NO_PI))
        made = ifreq[:_IFNAMSIZ]
        hwaddr = fcntl.ioctl(fd, _SIOCGIFHWADDR, struct.pack(_IFREQ, made, 0))
        ifname = made.split(b"\0", 1)[0].decode()
        return Tap(fd, ifname, socket.if_nametoindex(ifname), ":".join(f"{b:02x}" for b in hwaddr[18:24]))
    except BaseException:
        os.close(fd)
        raise


class IvshmemNet:
    """The taps of every live cell's links, and their entries under ``<pci_bus>/devices``."""

    def __init__(self, pci_bus: Path, pattern: str | None = None) -> None:
        self.pci_bus = pci_bus
        self.devices = pci_bus / "devices"
        self.staging = pci_bus / ".staging"
        self.pattern = pattern or name_pattern()
        self.cells: dict[int, list[Netdev]] = {}

    def reset(self) -> None:
        """Start with an empty PCI device tree (removing what a killed daemon left)."""
        shutil.rmtree(self.pci_bus, ignore_errors=True)
        self.devices.mkdir(parents=True)
        self.staging.mkdir()

    def attach(self, cell_id: int, cell_name: str, links: Iterable[Link]) -> list[tuple[Link, OSError]]:
        """Make and publish a tap for each link of a new cell; the links that got none, and why.

        The root has one device per bdf, hence one netdev: a link at a bdf that already has a
        tap (a third peer on the same device) gets none, and no error."""
        in_use = {netdev.link.bdf for netdevs in self.cells.values() for netdev in netdevs}
        made = self.cells.setdefault(cell_id, [])
        failed = []
        for link in links:
            if link.bdf in in_use:
                continue
            in_use.add(link.bdf)
            try:
                tap = open_tap(self.pattern)
            except OSError as error:
                failed.append((link, error))
                continue
            netdev = Netdev(link, tap, guest_mac(cell_name, link))
            made.append(netdev)
            self._publish(netdev)
        return failed

    def of(self, cell_id: int) -> tuple[Netdev, ...]:
        """The cell's links that have a tap, in config order (empty for an unknown cell)."""
        return tuple(self.cells.get(cell_id, ()))

    def detach(self, cell_id: int) -> None:
        """Withdraw the cell's sysfs entries and close its taps (they are gone when this returns)."""
        for netdev in self.cells.pop(cell_id, []):
            withdraw_dir(self.devices / netdev.link.pci_name, self.staging / f"gone-{netdev.link.pci_name}")
            os.close(netdev.tap.fd)

    def close_all(self) -> None:
        """Detach every cell."""
        for cell_id in list(self.cells):
            self.detach(cell_id)

    def remove(self) -> None:
        """Close every tap and remove the whole PCI tree (the daemon is going away)."""
        self.close_all()
        shutil.rmtree(self.pci_bus, ignore_errors=True)

    def _publish(self, netdev: Netdev) -> None:
        tap, name = netdev.tap, netdev.link.pci_name
        files = {f"net/{tap.name}/ifindex": f"{tap.ifindex}\n", f"net/{tap.name}/address": f"{tap.address}\n"}
        publish_dir(self.staging / name, self.devices / name, files)
