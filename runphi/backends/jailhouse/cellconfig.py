"""Jailhouse cell configurations: typed model, binary writer and reader for every format profile.

A `.cell` file is a packed little-endian header followed by arrays in a fixed order
(CPU bitmap, [rCPU bitmap], memory regions, cache regions, irqchips, PIO regions,
PCI devices, PCI capabilities, stream ids, [QoS devices]). The profiles differ only in
the signature/revision/architecture prefix, three optional header fields and the size
of a memory region; `FormatProfile` captures exactly those differences so one writer
and one reader serve them all.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator, Mapping

import msgspec

from runphi.backends.jailhouse.errors import CellConfigError

NAME_FIELD_SIZE = 32
NAME_MAX_LEN = NAME_FIELD_SIZE - 1
QOS_NAME_SIZE = 15


class Architecture(enum.IntEnum):
    """The rev-14 `architecture` byte."""

    X86 = 0
    ARM = 1
    ARM64 = 2


# --- flag and type constants (values from Jailhouse's cell-config.h / console.h) ---

CELL_PASSIVE_COMMREG = 0x00000001
CELL_TEST_DEVICE = 0x00000002
CELL_AARCH32 = 0x00000004
CELL_VIRTUAL_CONSOLE_PERMITTED = 0x40000000
CELL_VIRTUAL_CONSOLE_ACTIVE = 0x80000000

MEM_READ = 0x0001
MEM_WRITE = 0x0002
MEM_EXECUTE = 0x0004
MEM_DMA = 0x0008
MEM_IO = 0x0010
MEM_COMM_REGION = 0x0020
MEM_LOADABLE = 0x0040
MEM_ROOTSHARED = 0x0080
MEM_NO_HUGEPAGES = 0x0100
MEM_COLORED = 0x0200
MEM_COLORED_NO_COPY = 0x0400
MEM_TMP_ROOT_REMAP = 0x0800
MEM_TCM_A = 0x1000
MEM_TCM_B = 0x2000
MEM_IO_UNALIGNED = 0x8000
MEM_IO_8 = 0x10000
MEM_IO_16 = 0x20000
MEM_IO_32 = 0x40000
MEM_IO_64 = 0x80000

CON_ACCESS_MMIO = 0x0001
CON_REGDIST_4 = 0x0002
CON_FB_1920x1080 = 0x0004
CON_INVERTED_GATE = 0x1000
CON_MDR_QUIRK = 0x2000

CON_TYPE_NONE = 0
CON_TYPE_EFIFB = 1
CON_TYPE_8250 = 2
CON_TYPE_PL011 = 3
CON_TYPE_XUARTPS = 4
CON_TYPE_MVEBU = 5
CON_TYPE_HSCIF = 6
CON_TYPE_SCIFA = 7
CON_TYPE_IMX = 8
CON_TYPE_IMX_LPUART = 9
CON_TYPE_0A = 0x0A  # SCIF upstream, LINFLEX in the runPHI/Omnivisor headers

PCI_TYPE_DEVICE = 1
PCI_TYPE_BRIDGE = 2
PCI_TYPE_IVSHMEM = 3

SHMEM_PROTO_UNDEFINED = 0x0000
SHMEM_PROTO_VETH = 0x0001
SHMEM_PROTO_CUSTOM = 0x4000
SHMEM_PROTO_VIRTIO_FRONT = 0x8000
SHMEM_PROTO_VIRTIO_BACK = 0xC000

IVSHMEM_BAR_MASK_INTX = (0xFFFFF000, 0, 0, 0, 0, 0)
IVSHMEM_BAR_MASK_MSIX = (0xFFFFF000, 0xFFFFF000, 0, 0, 0, 0)

CACHE_L3_CODE = 1
CACHE_L3_DATA = 2
CACHE_L3 = 3
CACHE_ROOTSHARED = 1

PCICAPS_WRITE = 1
PCI_EXT_CAP = 0x8000

CELL_FLAG_NAMES: Mapping[int, str] = {
    CELL_PASSIVE_COMMREG: "PASSIVE_COMMREG",
    CELL_TEST_DEVICE: "TEST_DEVICE",
    CELL_AARCH32: "AARCH32",
    CELL_VIRTUAL_CONSOLE_PERMITTED: "VIRTUAL_CONSOLE_PERMITTED",
    CELL_VIRTUAL_CONSOLE_ACTIVE: "VIRTUAL_CONSOLE_ACTIVE",
}
MEM_FLAG_NAMES: Mapping[int, str] = {
    MEM_READ: "READ",
    MEM_WRITE: "WRITE",
    MEM_EXECUTE: "EXECUTE",
    MEM_DMA: "DMA",
    MEM_IO: "IO",
    MEM_COMM_REGION: "COMM_REGION",
    MEM_LOADABLE: "LOADABLE",
    MEM_ROOTSHARED: "ROOTSHARED",
    MEM_NO_HUGEPAGES: "NO_HUGEPAGES",
    MEM_COLORED: "COLORED",
    MEM_COLORED_NO_COPY: "COLORED_NO_COPY",
    MEM_TMP_ROOT_REMAP: "TMP_ROOT_REMAP",
    MEM_TCM_A: "TCM_A",
    MEM_TCM_B: "TCM_B",
    MEM_IO_UNALIGNED: "IO_UNALIGNED",
    MEM_IO_8: "IO_8",
    MEM_IO_16: "IO_16",
    MEM_IO_32: "IO_32",
    MEM_IO_64: "IO_64",
}
CONSOLE_FLAG_NAMES: Mapping[int, str] = {
    CON_ACCESS_MMIO: "ACCESS_MMIO",
    CON_REGDIST_4: "REGDIST_4",
    CON_FB_1920x1080: "FB_1920x1080",
    CON_INVERTED_GATE: "INVERTED_GATE",
    CON_MDR_QUIRK: "MDR_QUIRK",
}
CONSOLE_TYPE_NAMES: Mapping[int, str] = {
    CON_TYPE_NONE: "NONE",
    CON_TYPE_EFIFB: "EFIFB",
    CON_TYPE_8250: "8250",
    CON_TYPE_PL011: "PL011",
    CON_TYPE_XUARTPS: "XUARTPS",
    CON_TYPE_MVEBU: "MVEBU",
    CON_TYPE_HSCIF: "HSCIF",
    CON_TYPE_SCIFA: "SCIFA",
    CON_TYPE_IMX: "IMX",
    CON_TYPE_IMX_LPUART: "IMX_LPUART",
}
PCI_TYPE_NAMES: Mapping[int, str] = {
    PCI_TYPE_DEVICE: "DEVICE",
    PCI_TYPE_BRIDGE: "BRIDGE",
    PCI_TYPE_IVSHMEM: "IVSHMEM",
}
CACHE_TYPE_NAMES: Mapping[int, str] = {CACHE_L3_CODE: "L3_CODE", CACHE_L3_DATA: "L3_DATA", CACHE_L3: "L3"}
QOS_FLAG_NAMES: Mapping[int, str] = {1: "HAS_RWQOS", 2: "HAS_REGUL", 4: "HAS_DYNQOS"}
VIRTIO_DEVICE_NAMES: Mapping[int, str] = {1: "NET", 2: "BLOCK", 3: "CONSOLE"}


def flag_names(value: int, names: Mapping[int, str]) -> list[str]:
    """Names of the bits set in `value`; bits without a name appear as one hex remainder."""
    out = [name for bit, name in names.items() if value & bit]
    rest = value & ~sum(names)
    if rest:
        out.append(f"{rest:#x}")
    return out


def format_flags(value: int, names: Mapping[int, str]) -> str:
    """`0x93 (READ|WRITE|IO|ROOTSHARED)`; `0x0` for no flags."""
    parts = flag_names(value, names)
    return f"{value:#x} ({'|'.join(parts)})" if parts else f"{value:#x}"


def shmem_protocol_name(protocol: int) -> str:
    """Human name of an ivshmem protocol (`VETH`, `VIRTIO_BACK+CONSOLE`, `CUSTOM+0x12`, ...)."""
    if protocol == SHMEM_PROTO_UNDEFINED:
        return "UNDEFINED"
    if protocol == SHMEM_PROTO_VETH:
        return "VETH"
    for base, name in ((SHMEM_PROTO_VIRTIO_BACK, "VIRTIO_BACK"), (SHMEM_PROTO_VIRTIO_FRONT, "VIRTIO_FRONT")):
        if protocol >= base:
            dev = protocol - base
            return f"{name}+{VIRTIO_DEVICE_NAMES.get(dev, hex(dev))}"
    if protocol >= SHMEM_PROTO_CUSTOM:
        return f"CUSTOM+{protocol - SHMEM_PROTO_CUSTOM:#x}"
    return f"RESERVED({protocol:#x})"


# --- the model ---


class MemoryRegion(msgspec.Struct, frozen=True, kw_only=True):
    """`struct jailhouse_memory`; `colors` exists only in 40-byte-region profiles."""

    phys_start: int
    virt_start: int
    size: int
    flags: int
    colors: int = 0


class CacheRegion(msgspec.Struct, frozen=True, kw_only=True):
    """`struct jailhouse_cache`."""

    start: int
    size: int
    type: int
    flags: int = 0


class IrqChip(msgspec.Struct, frozen=True, kw_only=True):
    """`struct jailhouse_irqchip`: bit n of word w of `pin_bitmap` is IRQ pin_base+32w+n."""

    address: int
    id: int = 0
    pin_base: int = 32
    pin_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    def irqs(self) -> list[int]:
        """The IRQ numbers this chip gives to the cell, ascending."""
        return [
            self.pin_base + 32 * word + bit
            for word, bits in enumerate(self.pin_bitmap)
            for bit in range(32)
            if bits >> bit & 1
        ]


class PioRegion(msgspec.Struct, frozen=True, kw_only=True):
    """`struct jailhouse_pio` (x86 port ranges)."""

    base: int
    length: int


class PciDevice(msgspec.Struct, frozen=True, kw_only=True):
    """`struct jailhouse_pci_device` (56 bytes in every profile)."""

    type: int
    iommu: int = 0
    domain: int = 0
    bdf: int = 0
    bar_mask: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
    caps_start: int = 0
    num_caps: int = 0
    num_msi_vectors: int = 0
    msi_64bits: bool = False
    msi_maskable: bool = False
    num_msix_vectors: int = 0
    msix_region_size: int = 0
    msix_address: int = 0
    shmem_regions_start: int = 0
    shmem_dev_id: int = 0
    shmem_peers: int = 0
    shmem_protocol: int = 0


class PciCapability(msgspec.Struct, frozen=True, kw_only=True):
    """`struct jailhouse_pci_capability`."""

    id: int
    start: int
    len: int
    flags: int = 0


class QosDevice(msgspec.Struct, frozen=True, kw_only=True):
    """`struct jailhouse_qos_device` of the runPHI/Omnivisor forks (name ≤ 15 bytes)."""

    name: str
    flags: int
    base: int


class Console(msgspec.Struct, frozen=True, kw_only=True):
    """`struct jailhouse_console`."""

    address: int = 0
    size: int = 0
    type: int = 0
    flags: int = 0
    divider: int = 0
    gate_nr: int = 0
    clock_reg: int = 0


class CellConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a `.cell` file carries, independent of the format profile.

    `architecture` is written only by profiles with an architecture byte (rev 14);
    `rcpus`/`rcpu_set_size`, `qos_devices` and region `colors` only by the forks.
    """

    name: str
    flags: int = 0
    id: int = 0
    architecture: Architecture | None = None
    cpus: frozenset[int] = frozenset()
    cpu_set_size: int = 8
    rcpus: frozenset[int] = frozenset()
    rcpu_set_size: int = 8
    memory_regions: tuple[MemoryRegion, ...] = ()
    cache_regions: tuple[CacheRegion, ...] = ()
    irqchips: tuple[IrqChip, ...] = ()
    pio_regions: tuple[PioRegion, ...] = ()
    pci_devices: tuple[PciDevice, ...] = ()
    pci_caps: tuple[PciCapability, ...] = ()
    stream_ids: tuple[int, ...] = ()
    qos_devices: tuple[QosDevice, ...] = ()
    vpci_irq_base: int = 0
    cpu_reset_address: int = 0
    msg_reply_timeout: int = 0
    console: Console = Console()


# --- format profiles ---


class FormatProfile(msgspec.Struct, frozen=True, kw_only=True):
    """What distinguishes one `.cell` layout from another."""

    name: str
    description: str
    signature: bytes
    revision: int
    has_architecture: bool
    has_rcpu_set: bool
    has_qos_devices: bool
    region_size: int
    console_type_0a: str  # SCIF upstream, LINFLEX in the forks' console.h

    @property
    def header_size(self) -> int:
        """Bytes of `struct jailhouse_cell_desc` in this profile."""
        return _header_struct(self).size


PROFILES: Mapping[str, FormatProfile] = {
    p.name: p
    for p in (
        FormatProfile(
            name="rev12",
            description="upstream Jailhouse v0.12 (JHCELL, revision 12)",
            signature=b"JHCELL",
            revision=12,
            has_architecture=False,
            has_rcpu_set=False,
            has_qos_devices=False,
            region_size=32,
            console_type_0a="SCIF",
        ),
        FormatProfile(
            name="rev13",
            description="upstream Jailhouse master 2020-2023 (JHCELL, revision 13)",
            signature=b"JHCELL",
            revision=13,
            has_architecture=False,
            has_rcpu_set=False,
            has_qos_devices=False,
            region_size=32,
            console_type_0a="SCIF",
        ),
        FormatProfile(
            name="rev14",
            description="upstream Jailhouse since 2023 (JHCLL + architecture, revision 14)",
            signature=b"JHCLL",
            revision=14,
            has_architecture=True,
            has_rcpu_set=False,
            has_qos_devices=False,
            region_size=32,
            console_type_0a="SCIF",
        ),
        FormatProfile(
            name="runphi-rev13",
            description="runPHI QEMU fork (JHCELL revision 13, num_qos_devices, 40-byte regions)",
            signature=b"JHCELL",
            revision=13,
            has_architecture=False,
            has_rcpu_set=False,
            has_qos_devices=True,
            region_size=40,
            console_type_0a="LINFLEX",
        ),
        FormatProfile(
            name="omnivisor-rev14",
            description="Omnivisor fork (JHCLL revision 14, rcpu_set_size, num_qos_devices, 40-byte regions)",
            signature=b"JHCLL",
            revision=14,
            has_architecture=True,
            has_rcpu_set=True,
            has_qos_devices=True,
            region_size=40,
            console_type_0a="LINFLEX",
        ),
    )
}


def get_profile(name: str) -> FormatProfile:
    """The profile called `name`, or a CellConfigError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(PROFILES)
        raise CellConfigError(f"unknown cell format profile {name!r}: use one of {known}") from None


_CONSOLE_FMT = "QIHHIIQ"
_CACHE = struct.Struct("<IIBBH")
_IRQCHIP = struct.Struct("<QII4I")
_PIO = struct.Struct("<HH")
_PCI = struct.Struct("<BBHH6IHHBBHHQIBBH")
_PCI_CAP = struct.Struct("<HHHH")
_STREAM_ID = struct.Struct("<I")
_QOS = struct.Struct(f"<{QOS_NAME_SIZE}sBI")
_REGION = {32: struct.Struct("<QQQQ"), 40: struct.Struct("<QQQQQ")}
_HEADER_CACHE: dict[str, tuple[struct.Struct, tuple[str, ...]]] = {}


_COUNT_FIELDS = (
    "num_memory_regions", "num_cache_regions", "num_irqchips", "num_pio_regions",
    "num_pci_devices", "num_pci_caps", "num_stream_ids",
)  # fmt: skip
_CONSOLE_FIELDS = ("con_address", "con_size", "con_type", "con_flags", "con_divider", "con_gate_nr", "con_clock_reg")


def _header_layout(profile: FormatProfile) -> tuple[struct.Struct, tuple[str, ...]]:
    """The packed header of `profile` and its field names in order (cached)."""
    cached = _HEADER_CACHE.get(profile.name)
    if cached is None:
        fields: list[tuple[str, str]] = [("signature", f"{len(profile.signature)}s")]
        if profile.has_architecture:
            fields.append(("architecture", "B"))
        fields += [("revision", "H"), ("name", f"{NAME_FIELD_SIZE}s"), ("id", "I"), ("flags", "I"), ("cpu_set_size", "I")]
        if profile.has_rcpu_set:
            fields.append(("rcpu_set_size", "I"))
        fields += [(name, "I") for name in _COUNT_FIELDS]
        if profile.has_qos_devices:
            fields.append(("num_qos_devices", "I"))
        fields += [("vpci_irq_base", "I"), ("cpu_reset_address", "Q"), ("msg_reply_timeout", "Q")]
        fields += list(zip(_CONSOLE_FIELDS, _CONSOLE_FMT))
        layout = struct.Struct("<" + "".join(fmt for _, fmt in fields))
        cached = _HEADER_CACHE[profile.name] = (layout, tuple(name for name, _ in fields))
    return cached


def _header_struct(profile: FormatProfile) -> struct.Struct:
    """The packed header layout of `profile`."""
    return _header_layout(profile)[0]


# --- writer ---


def _bitmap(cpus: Iterable[int], size: int, what: str, cell: str) -> bytes:
    """Little-endian bitmap of `size` bytes with bit n set for each n in `cpus`."""
    mask = 0
    for cpu in cpus:
        if not 0 <= cpu < size * 8:
            raise CellConfigError(
                f"cell {cell!r}: {what} {cpu} does not fit a {size}-byte set; raise the set size or drop the {what}"
            )
        mask |= 1 << cpu
    return mask.to_bytes(size, "little")


def _encode_name(name: str) -> bytes:
    """The cell name as the NUL-padded 32-byte field, or CellConfigError."""
    raw = name.encode()
    if not raw or len(raw) > NAME_MAX_LEN or b"\0" in raw:
        raise CellConfigError(
            f"cell name {name!r} cannot be encoded: it must be 1 to {NAME_MAX_LEN} bytes without NUL"
        )
    return raw


def _check_profile_fits(config: CellConfig, profile: FormatProfile) -> None:
    """Refuse fields the profile cannot carry (no silent loss)."""
    lost = []
    if profile.has_architecture and config.architecture is None:
        raise CellConfigError(
            f"cell {config.name!r}: profile {profile.name} needs an architecture (x86, arm or arm64)"
        )
    if not profile.has_rcpu_set and config.rcpus:
        lost.append("rcpus")
    if not profile.has_qos_devices and config.qos_devices:
        lost.append("qos_devices")
    if profile.region_size < 40 and any(r.colors for r in config.memory_regions):
        lost.append("memory region colors")
    if lost:
        fits = "omnivisor-rev14" if "rcpus" in lost else "runphi-rev13 or omnivisor-rev14"
        raise CellConfigError(
            f"cell {config.name!r}: profile {profile.name} cannot carry {', '.join(lost)}; use {fits}"
        )


def write_cell(config: CellConfig, profile: FormatProfile) -> bytes:
    """Encode `config` in `profile`; the bytes are exactly what gcc+objcopy would produce.

    Raises CellConfigError if a value does not fit its field or the profile cannot carry it.
    """
    _check_profile_fits(config, profile)
    name = _encode_name(config.name)
    try:
        return b"".join(layout.pack(*values) for layout, values, _ in _records(config, profile, name))
    except struct.error:
        for layout, values, (what, index) in _records(config, profile, name):
            try:
                layout.pack(*values)
            except struct.error as exc:
                where = what if index is None else f"{what} {index}"
                raise CellConfigError(
                    f"cell {config.name!r}: {where} cannot be encoded ({exc}); check its values"
                ) from None
        raise


_Record = tuple[struct.Struct, tuple, tuple[str, "int | None"]]


def _records(config: CellConfig, profile: FormatProfile, name: bytes) -> Iterator[_Record]:
    """Every packed record of the file in order: layout, values, and (kind, index) for errors."""
    c = config.console
    values = {
        "signature": profile.signature, "architecture": int(config.architecture or 0), "revision": profile.revision,
        "name": name, "id": config.id, "flags": config.flags, "cpu_set_size": config.cpu_set_size,
        "rcpu_set_size": config.rcpu_set_size, "num_memory_regions": len(config.memory_regions),
        "num_cache_regions": len(config.cache_regions), "num_irqchips": len(config.irqchips),
        "num_pio_regions": len(config.pio_regions), "num_pci_devices": len(config.pci_devices),
        "num_pci_caps": len(config.pci_caps), "num_stream_ids": len(config.stream_ids),
        "num_qos_devices": len(config.qos_devices), "vpci_irq_base": config.vpci_irq_base,
        "cpu_reset_address": config.cpu_reset_address, "msg_reply_timeout": config.msg_reply_timeout,
        "con_address": c.address, "con_size": c.size, "con_type": c.type, "con_flags": c.flags,
        "con_divider": c.divider, "con_gate_nr": c.gate_nr, "con_clock_reg": c.clock_reg,
    }  # fmt: skip
    layout, fields = _header_layout(profile)
    yield layout, tuple(values[f] for f in fields), ("header", None)
    yield _raw(config.cpu_set_size), (_bitmap(config.cpus, config.cpu_set_size, "CPU", config.name),), ("CPU set", None)
    if profile.has_rcpu_set:
        bitmap = _bitmap(config.rcpus, config.rcpu_set_size, "rCPU", config.name)
        yield _raw(config.rcpu_set_size), (bitmap,), ("rCPU set", None)
    if profile.region_size == 40:
        for i, r in enumerate(config.memory_regions):
            yield _REGION[40], (r.phys_start, r.virt_start, r.size, r.flags, r.colors), ("memory region", i)
    else:
        for i, r in enumerate(config.memory_regions):
            yield _REGION[32], (r.phys_start, r.virt_start, r.size, r.flags), ("memory region", i)
    for i, cr in enumerate(config.cache_regions):
        yield _CACHE, (cr.start, cr.size, cr.type, 0, cr.flags), ("cache region", i)
    for i, ic in enumerate(config.irqchips):
        yield _IRQCHIP, (ic.address, ic.id, ic.pin_base, *ic.pin_bitmap), ("irqchip", i)
    for i, pio in enumerate(config.pio_regions):
        yield _PIO, (pio.base, pio.length), ("pio region", i)
    for i, d in enumerate(config.pci_devices):
        yield _PCI, _pci_values(d), ("pci device", i)
    for i, cap in enumerate(config.pci_caps):
        yield _PCI_CAP, (cap.id, cap.start, cap.len, cap.flags), ("pci capability", i)
    for i, sid in enumerate(config.stream_ids):
        yield _STREAM_ID, (sid,), ("stream id", i)
    for i, q in enumerate(config.qos_devices):
        qname = q.name.encode()
        if len(qname) > QOS_NAME_SIZE or b"\0" in qname:
            raise CellConfigError(
                f"cell {config.name!r}: qos device {i} name {q.name!r} must be at most {QOS_NAME_SIZE} bytes without NUL"
            )
        yield _QOS, (qname, q.flags, q.base), ("qos device", i)


_RAW_CACHE: dict[int, struct.Struct] = {}


def _raw(size: int) -> struct.Struct:
    """A struct of `size` raw bytes (for bitmaps)."""
    layout = _RAW_CACHE.get(size)
    if layout is None:
        layout = _RAW_CACHE[size] = struct.Struct(f"{size}s")
    return layout


def _pci_values(d: PciDevice) -> tuple:
    """Field values of one PCI device in `_PCI` order."""
    msi_bits = int(d.msi_64bits) | int(d.msi_maskable) << 1
    return (
        d.type, d.iommu, d.domain, d.bdf, *d.bar_mask, d.caps_start, d.num_caps, d.num_msi_vectors,
        msi_bits, d.num_msix_vectors, d.msix_region_size, d.msix_address, d.shmem_regions_start,
        d.shmem_dev_id, d.shmem_peers, d.shmem_protocol,
    )  # fmt: skip


# --- reader ---


class _Cursor:
    """Sequential unpacking over the file with precise truncation messages."""

    def __init__(self, data: bytes, profile: FormatProfile) -> None:
        self.data = data
        self.offset = 0
        self.profile = profile

    def take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise CellConfigError(
                f"truncated {self.profile.name} cell configuration: {what} needs bytes "
                f"{self.offset}..{end} but the file has {len(self.data)} bytes"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what))

    def array(self, layout: struct.Struct, count: int) -> Iterator[tuple]:
        """`count` consecutive records (the caller has checked the file is long enough)."""
        return layout.iter_unpack(self.take(layout.size * count, "an array"))


def _decode_name(field: bytes, what: str) -> str:
    """The NUL-terminated name in `field`; garbage after the NUL or bad UTF-8 is refused."""
    raw, nul, rest = field.partition(b"\0")
    if not nul or rest.strip(b"\0"):
        raise CellConfigError(f"garbled cell configuration: {what} is not a NUL-terminated, NUL-padded string")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise CellConfigError(f"garbled cell configuration: {what} is not UTF-8 ({raw!r})") from None


def _decode_cpus(bitmap: bytes) -> frozenset[int]:
    """The bit numbers set in a little-endian bitmap."""
    mask = int.from_bytes(bitmap, "little")
    cpus = []
    while mask:
        low = mask & -mask
        cpus.append(low.bit_length() - 1)
        mask ^= low
    return frozenset(cpus)


def _read_with(data: bytes, profile: FormatProfile) -> CellConfig:
    """Decode `data` strictly as `profile` (every byte accounted for)."""
    cur = _Cursor(data, profile)
    layout, fields = _header_layout(profile)
    h = dict(zip(fields, cur.unpack(layout, "the header")))
    arch = _check_header(h, profile)
    name = _decode_name(h["name"], "the cell name")
    counts = _Counts.of(h)
    _check_length(data, profile, name, h, counts)
    # the length check above guarantees every array below is complete
    cpus = _decode_cpus(cur.take(counts.cpu_set, "the CPU set"))
    rcpus = _decode_cpus(cur.take(counts.rcpu_set, "the rCPU set")) if profile.has_rcpu_set else frozenset()
    region = _REGION[profile.region_size]
    regions = [
        MemoryRegion(phys_start=v[0], virt_start=v[1], size=v[2], flags=v[3], colors=v[4] if len(v) > 4 else 0)
        for v in cur.array(region, counts.mem)
    ]
    caches = _read_caches(cur, counts.cache, name)
    irqchips = [
        IrqChip(address=v[0], id=v[1], pin_base=v[2], pin_bitmap=v[3:7]) for v in cur.array(_IRQCHIP, counts.irq)
    ]
    pios = [PioRegion(base=b, length=n) for b, n in cur.array(_PIO, counts.pio)]
    pcis = [_pci_from(v, name, i) for i, v in enumerate(cur.array(_PCI, counts.pci))]
    caps = [PciCapability(id=v[0], start=v[1], len=v[2], flags=v[3]) for v in cur.array(_PCI_CAP, counts.caps)]
    sids = tuple(v[0] for v in cur.array(_STREAM_ID, counts.sids))
    qos = [
        QosDevice(name=_decode_qos_name(qname, name, i), flags=qflags, base=qbase)
        for i, (qname, qflags, qbase) in enumerate(cur.array(_QOS, counts.qos))
    ]
    return CellConfig(
        name=name, flags=h["flags"], id=h["id"], architecture=arch, cpus=cpus, cpu_set_size=counts.cpu_set,
        rcpus=rcpus, rcpu_set_size=counts.rcpu_set, memory_regions=tuple(regions), cache_regions=tuple(caches),
        irqchips=tuple(irqchips), pio_regions=tuple(pios), pci_devices=tuple(pcis), pci_caps=tuple(caps),
        stream_ids=sids, qos_devices=tuple(qos), vpci_irq_base=h["vpci_irq_base"],
        cpu_reset_address=h["cpu_reset_address"], msg_reply_timeout=h["msg_reply_timeout"], console=_console_from(h),
    )  # fmt: skip


class _Counts(msgspec.Struct, frozen=True):
    """The sizes and counts a header announces (the fork-only ones default as upstream has none)."""

    cpu_set: int
    rcpu_set: int
    mem: int
    cache: int
    irq: int
    pio: int
    pci: int
    caps: int
    sids: int
    qos: int

    @classmethod
    def of(cls, h: dict) -> _Counts:
        mem, cache, irq, pio, pci, caps, sids = (h[f] for f in _COUNT_FIELDS)
        return cls(cpu_set=h["cpu_set_size"], rcpu_set=h.get("rcpu_set_size", 8), mem=mem, cache=cache, irq=irq,
                   pio=pio, pci=pci, caps=caps, sids=sids, qos=h.get("num_qos_devices", 0))


def _check_header(h: dict, profile: FormatProfile) -> Architecture | None:
    """Refuse a foreign signature, architecture byte or revision; the architecture (None if the profile has none)."""
    if h["signature"] != profile.signature:
        raise CellConfigError(
            f"not a {profile.name} cell configuration: signature {h['signature']!r}, expected {profile.signature!r}"
        )
    arch: Architecture | None = None
    if profile.has_architecture:
        try:
            arch = Architecture(h["architecture"])
        except ValueError:
            raise CellConfigError(
                f"unsupported architecture byte {h['architecture']} in {profile.name} cell configuration"
            ) from None
    if h["revision"] != profile.revision:
        raise CellConfigError(
            f"cell configuration revision {h['revision']}, profile {profile.name} is {profile.revision}"
        )
    return arch


def _check_length(data: bytes, profile: FormatProfile, name: str, h: dict, counts: _Counts) -> None:
    """The file must be exactly as long as its header says: no truncation, no trailing bytes."""
    expected = (
        profile.header_size + counts.cpu_set + (counts.rcpu_set if profile.has_rcpu_set else 0)
        + counts.mem * profile.region_size + counts.cache * _CACHE.size + counts.irq * _IRQCHIP.size
        + counts.pio * _PIO.size + counts.pci * _PCI.size + counts.caps * _PCI_CAP.size
        + counts.sids * _STREAM_ID.size + counts.qos * _QOS.size
    )  # fmt: skip
    if expected != len(data):
        raise CellConfigError(
            f"{profile.name} cell configuration {name!r}: its header describes {expected} bytes "
            f"but the file has {len(data)} bytes (truncated, trailing data, or another profile)"
        )


def _console_from(h: dict) -> Console:
    return Console(
        address=h["con_address"], size=h["con_size"], type=h["con_type"], flags=h["con_flags"],
        divider=h["con_divider"], gate_nr=h["con_gate_nr"], clock_reg=h["con_clock_reg"],
    )  # fmt: skip


def _read_caches(cur: _Cursor, count: int, name: str) -> list[CacheRegion]:
    """Cache regions; a non-zero padding byte is refused (it would not survive a rewrite)."""
    caches = []
    for i, (start, size, ctype, pad, cflags) in enumerate(cur.array(_CACHE, count)):
        if pad:
            raise CellConfigError(f"garbled cell configuration {name!r}: cache region {i} has a non-zero padding byte")
        caches.append(CacheRegion(start=start, size=size, type=ctype, flags=cflags))
    return caches


def _decode_qos_name(field: bytes, cell: str, index: int) -> str:
    """A QoS device name: up to 15 bytes, NUL-padded, NUL terminator optional."""
    raw, _, rest = field.partition(b"\0")
    if rest.strip(b"\0"):
        raise CellConfigError(f"garbled cell configuration {cell!r}: qos device {index} name has bytes after its NUL")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise CellConfigError(f"garbled cell configuration {cell!r}: qos device {index} name is not UTF-8") from None


def _pci_from(v: tuple, cell: str, index: int) -> PciDevice:
    """One PCI device from its `_PCI` field tuple; reserved MSI flag bits are refused."""
    msi_bits = v[13]
    if msi_bits & ~0x3:
        raise CellConfigError(
            f"garbled cell configuration {cell!r}: pci device {index} has reserved MSI flag bits {msi_bits:#x}"
        )
    return PciDevice(
        type=v[0], iommu=v[1], domain=v[2], bdf=v[3], bar_mask=tuple(v[4:10]), caps_start=v[10],
        num_caps=v[11], num_msi_vectors=v[12], msi_64bits=bool(msi_bits & 1), msi_maskable=bool(msi_bits & 2),
        num_msix_vectors=v[14], msix_region_size=v[15], msix_address=v[16], shmem_regions_start=v[17],
        shmem_dev_id=v[18], shmem_peers=v[19], shmem_protocol=v[20],
    )  # fmt: skip


def candidate_profiles(data: bytes) -> list[FormatProfile]:
    """Profiles whose signature and revision match the start of `data`."""
    out = []
    for profile in PROFILES.values():
        sig = profile.signature
        rev_at = len(sig) + (1 if profile.has_architecture else 0)
        if data[: len(sig)] == sig and data[rev_at : rev_at + 2] == profile.revision.to_bytes(2, "little"):
            out.append(profile)
    return out


class AmbiguousCellConfigError(CellConfigError):
    """The bytes decode strictly under more than one profile, to different configurations."""

    def __init__(self, message: str, profiles: tuple[FormatProfile, ...]) -> None:
        super().__init__(message)
        self.profiles = profiles


def read_cell(data: bytes, profile: FormatProfile | None = None) -> tuple[FormatProfile, CellConfig]:
    """Decode a `.cell` file; with `profile=None` the profile is detected.

    Detection returns the one profile whose signature and revision match and under which
    the whole file decodes strictly (exact length, every array, no reserved bits). If
    none does it raises CellConfigError with each profile's reason; if two do it raises
    AmbiguousCellConfigError naming both, and the caller must name the profile: there is
    no tie-break, because the two readings are always different configurations (both
    account for every byte, so neither is more faithful to the file).

    Only upstream rev14 and omnivisor-rev14 (both JHCLL revision 14) can share bytes.
    The fork's `rcpu_set_size` sits before the counts, so every header field after
    `cpu_set_size` is read 4 bytes apart (upstream's num_memory_regions is the fork's
    rcpu_set_size, upstream's num_cache_regions the fork's num_memory_regions, ...).
    With the fork's counts R (rcpu_set_size), M, C, I, P, D, K, S, Q (regions, caches,
    irqchips, pios, pci devices, caps, stream ids, qos) the two lengths agree iff
    31R + 20C + 52P == 8 + 28M + 28I + 48D + 4K + 4S + 20Q, and the arrays must then
    pass both strict checks too. That needs no fork-only content (R = Q = 0, C = 1,
    K = 2, S = 1 is one case), and equal readings would need all counts equal, which
    the equation rules out. Upstream rev13 and runphi-rev13 never share bytes: their
    counts share offsets and for equal counts the fork's file is 4 + 8M + 20Q longer.
    """
    if profile is not None:
        return profile, _read_with(data, profile)
    shortest = min(_header_struct(p).size for p in PROFILES.values())
    if len(data) < shortest:
        raise CellConfigError(
            f"not a Jailhouse cell configuration: {len(data)} bytes, shorter than any cell header ({shortest} bytes)"
        )
    candidates = candidate_profiles(data)
    if not candidates:
        raise CellConfigError(
            f"not a Jailhouse cell configuration: starts with {bytes(data[:8])!r}; "
            "expected JHCELL (revision 12/13) or JHCLL (revision 14)"
        )
    decoded, errors = [], []
    for candidate in candidates:
        try:
            decoded.append((candidate, _read_with(data, candidate)))
        except CellConfigError as exc:
            errors.append(str(exc))
    if len(decoded) == 1:
        return decoded[0]
    if not decoded:
        raise CellConfigError("; ".join(errors))
    names = " and ".join(p.name for p, _ in decoded)
    raise AmbiguousCellConfigError(
        f"cell configuration is valid as both {names}, which read it as different configurations; "
        "name the profile explicitly",
        tuple(p for p, _ in decoded),
    )
