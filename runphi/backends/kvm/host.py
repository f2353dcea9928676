"""The KVM host template (``templates/kvm-host.toml``): what a host lends to ZICs.

Decoded once with msgspec at the edge and validated. A :class:`KvmHost` is what the
node's resource ledger (:mod:`runphi.backends.ledger`) plans with: the host CPUs
that may be lent (``cpus``, else every CPU this process may run on), how many the
host keeps, and one pool of lent RAM. Guest RAM is an amount, not a physical range,
so the pool starts at 0 and an allocation's segment is bookkeeping only.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import msgspec

from runphi.backends.base import BackendError
from runphi.backends.cpulist import CpuListError, parse_cpu_list
from runphi.backends.ledger import MiB, PAGE_SIZE


class HostTemplateError(BackendError):
    """The host template is missing or invalid."""


class QemuSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[qemu]``: which QEMU, which machine and vCPU model under TCG and under KVM."""

    binary: str = "qemu-system-aarch64"
    guest_arch: str = "aarch64"
    machine: str = "virt,gic-version=3"
    #: Where the machine's RAM starts in guest-physical memory (QEMU ``virt``: 1 GiB).
    ram_base: int = 0x4000_0000
    cpu: str = "cortex-a53"
    kvm_machine: str = "virt,gic-version=host"
    kvm_cpu: str = "host"
    preallocate: bool = False
    lock_memory: bool = False
    #: Boot a Linux guest with the device tree its image carries. Off: QEMU generates the
    #: VM's own (an image's tree describes the Jailhouse cell it was made for, not this VM).
    image_dtb: bool = False


class RamPool(msgspec.Struct, frozen=True):
    """The lent RAM as the ledger sees it: [start, end)."""

    start: int
    end: int


class LentMemory(msgspec.Struct, frozen=True, kw_only=True):
    """The ledger's view of the lent RAM (one pool from 0, page-aligned pieces)."""

    pools: list[RamPool]
    default_size: int
    low_ram_size: int = 0
    alignment: int = MiB


class TapLinks(msgspec.Struct, frozen=True):
    """The ledger's view of the network links: slots of the link subnet, each a tap."""

    slots: list[int]
    kind: str = "tap"


class KvmHost(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One host template."""

    name: str
    description: str = ""
    backend: str = "kvm"
    cpus: str = ""
    host_keeps: int = 0
    memory_mib: int
    default_memory_mib: int = 64
    #: Networked ZICs' point-to-point links: one /30 each (host side, guest side).
    link_subnet: str = "169.254.100.0/24"
    qemu: QemuSettings = QemuSettings()

    # ---- what the node ledger plans with (runphi.backends.ledger.LedgerPlatform) ----

    @property
    def memory(self) -> LentMemory:
        return LentMemory(pools=[RamPool(0, self.memory_mib * MiB)], default_size=self.default_memory_mib * MiB)

    @property
    def cell_cpu_set(self) -> frozenset[int]:
        return parse_cpu_list(self.cpus) if self.cpus else host_cpus()

    @property
    def root_keeps_cpus(self) -> int:
        return self.host_keeps

    @property
    def default_console(self) -> str:
        return "uart"  # the VM's PL011, streamed over a socket

    @property
    def offers_hypervisor_console(self) -> bool:
        return False

    @property
    def ivshmem(self) -> TapLinks:
        from runphi.backends.links import link_slots

        return TapLinks(slots=list(link_slots(self.link_subnet)))

    per_cell_uarts = False
    uarts: tuple[()] = ()
    rpus: tuple[()] = ()


def host_cpus() -> frozenset[int]:
    """The CPUs this process (and so every QEMU it starts) may run on."""
    return frozenset(os.sched_getaffinity(0))


def load_host(path: Path) -> KvmHost:
    """The template at ``path``, validated; HostTemplateError naming the file and the problem."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HostTemplateError(f"KVM host template {path} does not exist "
                                "(set [kvm] host in runphi.toml to a template name or a .toml path)") from None
    except OSError as exc:
        raise HostTemplateError(f"cannot read the KVM host template {path}: {exc.strerror}") from None
    import tomllib

    try:
        host = msgspec.convert(tomllib.loads(text), KvmHost)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise HostTemplateError(f"KVM host template {path} is invalid: {exc}") from None
    problems = _problems(host)
    if problems:
        raise HostTemplateError(f"KVM host template {path} is invalid: " + "; ".join(problems))
    return host


def _problems(host: KvmHost) -> list[str]:
    problems = []
    if host.backend != "kvm":
        problems.append(f"backend = {host.backend!r}, expected \"kvm\"")
    if host.cpus:
        try:
            parse_cpu_list(host.cpus)
        except CpuListError as exc:
            problems.append(f"cpus: {exc}")
    if host.host_keeps < 0:
        problems.append("host_keeps must not be negative")
    try:
        subnet = ipaddress.IPv4Network(host.link_subnet)
        if subnet.prefixlen > 29:
            problems.append(f"link_subnet {host.link_subnet} holds no link: give it /29 or more")
    except ValueError as exc:
        problems.append(f"link_subnet: {exc}")
    if host.memory_mib <= 0 or host.default_memory_mib <= 0:
        problems.append("memory_mib and default_memory_mib must be positive")
    if (host.default_memory_mib * MiB) % PAGE_SIZE:
        problems.append("default_memory_mib must be whole pages")
    return problems
