"""Platform templates (`templates/<board>.toml`): a typed, validated model of one board.

A platform says what the root cell may give away (CPUs, RAM pools, UART slots,
ivshmem links, RPUs) and how cells see it (format profile, RAM layout convention,
GIC, comm region, console). The TOML is decoded once with msgspec at the edge and
validated; everything inside runphi works with `Platform`.

UART host device paths may contain `{sim_root}`, resolved at run time by
`UartSlot.host_device(placeholders)`; templates never hard-code machine paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from runphi.backends.cpulist import CpuListError, parse_cpu_list
from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.errors import PlatformError
from runphi.backends.ledger import PAGE_SIZE, MiB

_CELL_FLAGS = {name: bit for bit, name in cc.CELL_FLAG_NAMES.items()}
_CONSOLE_FLAGS = {name: bit for bit, name in cc.CONSOLE_FLAG_NAMES.items()}
_CONSOLE_TYPES = {name: value for value, name in cc.CONSOLE_TYPE_NAMES.items()} | {"SCIF": 0x0A, "LINFLEX": 0x0A}
_ARCHITECTURES = {a.name.lower(): a for a in cc.Architecture}


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every template table: unknown keys are typos and refused.

    Subclasses repeat ``frozen=True``: msgspec inherits it anyway, but type checkers
    read each class's own keywords.
    """


class RamPool(_Table, frozen=True, kw_only=True):
    """Physical RAM [start, end) the root cell can give to cells."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class MemoryLayout(_Table, frozen=True, kw_only=True):
    """Where cell RAM comes from and how a cell sees it.

    `qemu`: `low_ram_size` bytes at guest 0 (R|W|X|LOADABLE) plus the main RAM at
    `main_ram_guest` (R|W|X|DMA|LOADABLE), both carved from one allocation.
    `flat`: the main RAM alone, at `main_ram_guest` (usually 0).
    """

    pools: list[RamPool]
    convention: Literal["qemu", "flat"]
    main_ram_guest: int
    low_ram_size: int = 0
    alignment: int = 0x200000
    default_size: int = 64 * MiB


class UartSlot(_Table, frozen=True, kw_only=True):
    """One console UART a cell can own (or, with `shared`, that every cell shares).

    `irq` is the pin put in the cell's irqchip bitmap (the guest-visible one);
    `phys_irq` only documents the line behind it when the two differ.
    """

    phys: int
    guest: int
    irq: int
    size: int = 0x1000
    phys_irq: int | None = None
    console_type: str = "PL011"
    console_flags: list[str] = msgspec.field(default_factory=lambda: ["ACCESS_MMIO", "REGDIST_4"])
    device: str = ""
    baud: int = 115200
    shared: bool = False

    def host_device(self, placeholders: Mapping[str, str]) -> str:
        """The host tty behind this UART with `{name}` placeholders filled in ("" if none).

        Raises PlatformError naming the missing placeholder.
        """
        try:
            return self.device.format_map(placeholders)
        except KeyError as exc:
            raise PlatformError(
                f"UART device path {self.device!r} needs {{{exc.args[0]}}}: set RUNPHI_SIM_ROOT "
                "(or point [jailhouse] sysfs at <sim root>/sys/devices/jailhouse)"
            ) from None

    def console(self) -> cc.Console:
        """The cell's `jailhouse_console` for this UART at its guest address."""
        flags = 0
        for name in self.console_flags:
            flags |= _CONSOLE_FLAGS[name]
        return cc.Console(address=self.guest, size=self.size, type=_CONSOLE_TYPES[self.console_type], flags=flags)


class Gic(_Table, frozen=True, kw_only=True):
    """The interrupt controller as cells' irqchip entries need it."""

    version: int = 3
    gicd: int
    gicr: int = 0
    pin_base: int = 32


class Ivshmem(_Table, frozen=True, kw_only=True):
    """ivshmem virtual-ethernet links to the root: slot n uses window base + (n-1)*window.

    The root side of slot n is the net device the root's ivshmem-net driver makes for the
    virtual PCI device ``<domain>:00:<n>.0``: the one entry of ``netdev_dir`` (placeholders
    ``{domain}``, ``{slot}``, ``{sim_root}``). Its link is the n-th /30 of ``link_subnet``."""

    base: int
    window: int = 0x100000
    domain: int = 1
    vpci_irq_base: int
    slots: list[int] = msgspec.field(default_factory=lambda: [1, 2])
    netdev_dir: str = "/sys/bus/pci/devices/{domain:04x}:00:{slot:02x}.0/net"
    link_subnet: str = "169.254.101.0/24"

    @property
    def kind(self) -> str:
        return "ivshmem"

    def window_of(self, slot: int) -> int:
        """Physical start of slot `slot`'s 1 MiB shared-memory window."""
        return self.base + (slot - 1) * self.window

    def netdev_path(self, slot: int, placeholders: dict[str, str]) -> Path:
        """Where the root's net device for slot ``slot`` appears (PlatformError without a needed placeholder)."""
        try:
            return Path(self.netdev_dir.format(domain=self.domain, slot=slot, **placeholders))
        except KeyError as exc:
            raise PlatformError(f"ivshmem.netdev_dir needs {{{exc.args[0]}}}: set RUNPHI_SIM_ROOT") from None

    def intx_irq(self, slot: int) -> int:
        """The SPI a cell sees for the device in PCI slot `slot` (32 + vpci_irq_base + slot&3)."""
        return 32 + self.vpci_irq_base + (slot & 3)


class HypervisorConsole(_Table, frozen=True, kw_only=True):
    """The hypervisor's debug console as a ZIC's console: one 2 KiB ring the root reads, with
    no tag of who wrote what — so it is leased to one ZIC at a time, whose cell gets the
    virtual-console flags. ``device`` is where the root reads it: ``{sim_root}`` is the
    simulator's root there, and nothing on a board, so one template serves both."""

    device: str = "{sim_root}/dev/jailhouse"

    def host_device(self, placeholders: Mapping[str, str]) -> str:
        try:
            return self.device.format_map({"sim_root": "", **placeholders})
        except KeyError as exc:
            raise PlatformError(f"hypervisor_console.device needs {{{exc.args[0]}}}") from None


class TcmRegion(_Table, frozen=True, kw_only=True):
    """A tightly coupled memory bank mapped into an RPU cell."""

    phys: int
    guest: int
    size: int
    flag: Literal["TCM_A", "TCM_B"]


class Rpu(_Table, frozen=True, kw_only=True):
    """A real-time core (Omnivisor rCPU) and the TCM banks its cell maps."""

    id: int
    tcm: list[TcmRegion] = []


class CommRegion(_Table, frozen=True, kw_only=True):
    """Where cells see their communication page."""

    guest: int = 0x80000000
    size: int = 0x1000


class Platform(_Table, frozen=True, kw_only=True):
    """One board as runphi sees it; built by `load_platform`."""

    name: str
    description: str = ""
    format: str
    architecture: str = "arm64"
    root_cell: str
    cell_cpus: str
    cell_flags: list[str] = []
    default_reset_address: int
    memory: MemoryLayout
    gic: Gic
    comm_region: CommRegion = CommRegion()
    uarts: list[UartSlot] = []
    ivshmem: Ivshmem | None = None
    #: The hypervisor console slot (``[hypervisor_console]``), when the platform offers it.
    hypervisor_console: HypervisorConsole | None = None
    rpus: list[Rpu] = []
    #: Device tree for Linux guests whose image names none: a path on this node,
    #: `{sim_root}` allowed as in UART device paths ("" = images must bring their own).
    linux_dtb: str = ""

    @property
    def profile(self) -> cc.FormatProfile:
        return cc.PROFILES[self.format]

    @property
    def arch(self) -> cc.Architecture:
        return _ARCHITECTURES[self.architecture]

    @property
    def cell_cpu_set(self) -> frozenset[int]:
        """CPUs the root may give to cells."""
        return parse_cpu_list(self.cell_cpus)

    @property
    def cell_flag_bits(self) -> int:
        bits = 0
        for name in self.cell_flags:
            bits |= _CELL_FLAGS[name]
        return bits

    @property
    def per_cell_uarts(self) -> bool:
        """Whether each cell gets a UART slot of its own (else all share `uarts[0]`)."""
        return bool(self.uarts) and not self.uarts[0].shared

    @property
    def root_keeps_cpus(self) -> int:
        """CPUs the root cell always keeps: Jailhouse's root cell never gives away its last one."""
        return 1

    @property
    def offers_hypervisor_console(self) -> bool:
        return self.hypervisor_console is not None

    @property
    def default_console(self) -> str:
        """A ZIC's console when its image does not say: a UART slot the root can read, else the
        hypervisor console when offered (the only one that streams), else the cell's UART."""
        if any(slot.device for slot in self.uarts) or self.hypervisor_console is None:
            return "uart"
        return "hypervisor"


def _problems(p: Platform) -> list[str]:
    """Everything wrong with a decoded platform, one phrase each."""
    out = []
    if p.format not in cc.PROFILES:
        out.append(f"format {p.format!r} is not one of {', '.join(cc.PROFILES)}")
    if p.architecture not in _ARCHITECTURES:
        out.append(f"architecture {p.architecture!r} is not one of {', '.join(_ARCHITECTURES)}")
    try:
        if not parse_cpu_list(p.cell_cpus):
            out.append("cell_cpus is empty")
    except CpuListError as exc:
        out.append(f"cell_cpus: {exc}")
    out += [f"cell_flags: unknown flag {f!r}" for f in p.cell_flags if f not in _CELL_FLAGS]
    if not p.root_cell or len(p.root_cell.encode()) > cc.NAME_MAX_LEN:
        out.append(f"root_cell must be 1 to {cc.NAME_MAX_LEN} bytes")
    out += _memory_problems(p.memory)
    out += _uart_problems(p.uarts)
    if p.gic.pin_base % 32:
        out.append(f"gic.pin_base {p.gic.pin_base} is not a multiple of 32")
    if p.ivshmem is not None:
        bad = [s for s in p.ivshmem.slots if not 1 <= s <= 31]
        if bad or len(set(p.ivshmem.slots)) != len(p.ivshmem.slots):
            out.append(f"ivshmem.slots {p.ivshmem.slots} must be distinct PCI slots 1..31")
        out += _link_subnet_problems(p.ivshmem)
    if p.rpus and p.format in cc.PROFILES and not cc.PROFILES[p.format].has_rcpu_set:
        out.append(f"rpus need a format with an rCPU set (omnivisor-rev14), not {p.format}")
    return out


def _link_subnet_problems(ivshmem: Ivshmem) -> list[str]:
    from runphi.backends.links import link_slots

    try:
        offered = link_slots(ivshmem.link_subnet)
    except ValueError as exc:
        return [f"ivshmem.link_subnet: {exc}"]
    if any(slot not in offered for slot in ivshmem.slots):
        return [f"ivshmem.link_subnet {ivshmem.link_subnet} has too few /30 links for slots {ivshmem.slots}"]
    return []


def _memory_problems(m: MemoryLayout) -> list[str]:
    out = []
    if not m.pools:
        out.append("memory.pools is empty")
    for i, pool in enumerate(m.pools):
        if pool.start >= pool.end or pool.start % PAGE_SIZE or pool.end % PAGE_SIZE:
            out.append(f"memory.pools[{i}] [{pool.start:#x}, {pool.end:#x}) must be non-empty and page aligned")
    ordered = sorted(m.pools, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:
            out.append(f"memory pools [{a.start:#x}, {a.end:#x}) and [{b.start:#x}, {b.end:#x}) overlap")
    if m.alignment < PAGE_SIZE or m.alignment & (m.alignment - 1):
        out.append(f"memory.alignment {m.alignment:#x} must be a power of two >= {PAGE_SIZE:#x}")
    if m.low_ram_size % PAGE_SIZE or (m.convention == "qemu") != (m.low_ram_size > 0):
        out.append("memory.low_ram_size must be a page multiple, > 0 exactly for convention 'qemu'")
    if m.default_size <= 0:
        out.append("memory.default_size must be positive")
    return out


def _uart_problems(uarts: list[UartSlot]) -> list[str]:
    out = []
    for i, u in enumerate(uarts):
        if u.console_type not in _CONSOLE_TYPES:
            out.append(f"uarts[{i}].console_type {u.console_type!r} is not one of {', '.join(_CONSOLE_TYPES)}")
        out += [f"uarts[{i}].console_flags: unknown flag {f!r}" for f in u.console_flags if f not in _CONSOLE_FLAGS]
    if len({u.shared for u in uarts}) > 1:
        out.append("uarts: either one shared UART or per-cell UARTs, not both")
    if uarts and uarts[0].shared and len(uarts) != 1:
        out.append("uarts: a shared UART must be the only entry")
    return out


def parse_platform(text: str, source: str) -> Platform:
    """Decode and validate one template's TOML text; `source` names it in errors."""
    import tomllib

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlatformError(f"platform template {source} is not valid TOML: {exc}") from None
    try:
        platform = msgspec.convert(raw, Platform)
    except msgspec.ValidationError as exc:
        raise PlatformError(f"platform template {source} is invalid: {exc}") from None
    problems = _problems(platform)
    if problems:
        raise PlatformError(f"platform template {source} is invalid: {'; '.join(problems)}")
    return platform


def platform_path(name_or_path: str, templates_dir: Path) -> Path:
    """The file for a template name (`zcu102`) or an explicit path (`./board.toml`)."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        return Path(name_or_path)
    return templates_dir / f"{name_or_path}.toml"


def available_platforms(templates_dir: Path) -> list[str]:
    """Names of the templates in `templates_dir`."""
    return sorted(p.stem for p in templates_dir.glob("*.toml"))


def load_platform(name_or_path: str, templates_dir: Path) -> Platform:
    """Read and validate a platform template; PlatformError says which and why."""
    path = platform_path(name_or_path, templates_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        known = ", ".join(available_platforms(templates_dir)) or "none"
        raise PlatformError(
            f"platform template {path} does not exist (templates in {templates_dir}: {known}); "
            "set [jailhouse] platform in runphi.toml or RUNPHI_PLATFORM"
        ) from None
    except OSError as exc:
        raise PlatformError(f"cannot read platform template {path}: {exc.strerror}") from None
    return parse_platform(text, str(path))


def default_placeholders(sysfs: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Values for `{...}` in UART device paths: `sim_root` from RUNPHI_SIM_ROOT, else from sysfs.

    A simulator's sysfs lives at `<sim root>/sys/devices/jailhouse`, so that suffix gives
    the root when the variable is unset.
    """
    env = os.environ.get("RUNPHI_SIM_ROOT")
    if env:
        return {"sim_root": env}
    if sysfs is not None:
        path = Path(sysfs)
        if path.parts[-3:] == ("sys", "devices", "jailhouse") and len(path.parts) > 3:
            return {"sim_root": str(path.parent.parent.parent)}
    return {}
