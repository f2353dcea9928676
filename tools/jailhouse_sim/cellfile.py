"""Reader for Jailhouse cell and system configuration binaries.

Written from the format description (reference/jailhouse.md §3) and kept
independent of runphi's own writer so the two cross-check each other. A board
names one *format profile*; the reader accepts exactly that profile, the way a
driver build accepts exactly one ``JAILHOUSE_CONFIG_REVISION``.
"""

from __future__ import annotations

import errno
import struct

import msgspec

ARCH_X86, ARCH_ARM, ARCH_ARM64 = 0, 1, 2
ARCH_NAMES = {"x86": ARCH_X86, "arm": ARCH_ARM, "arm64": ARCH_ARM64}

MEM_READ = 0x0001
MEM_WRITE = 0x0002
MEM_EXECUTE = 0x0004
MEM_DMA = 0x0008
MEM_IO = 0x0010
MEM_COMM_REGION = 0x0020
MEM_LOADABLE = 0x0040
MEM_ROOTSHARED = 0x0080

CELL_PASSIVE_COMMREG = 0x00000001
CELL_VIRTUAL_CONSOLE_PERMITTED = 0x40000000
CELL_VIRTUAL_CONSOLE_ACTIVE = 0x80000000

PCI_TYPE_IVSHMEM = 3
IVSHMEM_MAX_PEERS = 12

SYS_VIRTUAL_DEBUG_CONSOLE = 0x0001

_CONSOLE_FIELDS = ("con_address", "con_size", "con_type", "con_flags", "con_divider", "con_gate_nr", "con_clock_reg")
_CONSOLE_FORMAT = "QIHHIIQ"


class FormatProfile(msgspec.Struct, frozen=True):
    """One build of the Jailhouse config ABI (signature, revision, struct sizes)."""

    name: str
    cell_signature: bytes
    system_signature: bytes
    revision: int
    has_architecture: bool
    # Header count fields between cpu_set_size and the reset address, in file order.
    count_fields: tuple[str, ...]
    memory_region_size: int

    @property
    def header_format(self) -> str:
        sig = f"{len(self.cell_signature)}s" + ("B" if self.has_architecture else "")
        return "<" + sig + "H32sIII" + "I" * len(self.count_fields) + "QQ" + _CONSOLE_FORMAT

    @property
    def header_size(self) -> int:
        return struct.calcsize(self.header_format)


_UPSTREAM_COUNTS = (
    "num_memory_regions", "num_cache_regions", "num_irqchips", "num_pio_regions",
    "num_pci_devices", "num_pci_caps", "num_stream_ids", "vpci_irq_base",
)
_FORK_COUNTS = _UPSTREAM_COUNTS[:-1] + ("num_qos_devices", "vpci_irq_base")
_OMNIVISOR_COUNTS = ("rcpu_set_size",) + _FORK_COUNTS

PROFILES: dict[str, FormatProfile] = {
    p.name: p
    for p in (
        FormatProfile("rev12", b"JHCELL", b"JHSYST", 12, False, _UPSTREAM_COUNTS, 32),
        FormatProfile("rev13", b"JHCELL", b"JHSYST", 13, False, _UPSTREAM_COUNTS, 32),
        FormatProfile("rev14", b"JHCLL", b"JHSYS", 14, True, _UPSTREAM_COUNTS, 32),
        FormatProfile("runphi-fork-rev13", b"JHCELL", b"JHSYST", 13, False, _FORK_COUNTS, 40),
        FormatProfile("omnivisor-rev14", b"JHCLL", b"JHSYST", 14, True, _OMNIVISOR_COUNTS, 40),
    )
}


class MemoryRegion(msgspec.Struct, frozen=True):
    phys_start: int
    virt_start: int
    size: int
    flags: int
    colors: int = 0

    def contains_guest(self, address: int) -> bool:
        """True if the guest-physical ``address`` falls inside this region."""
        return self.size > 0 and self.virt_start <= address < self.virt_start + self.size


class IrqChip(msgspec.Struct, frozen=True):
    address: int
    id: int
    pin_base: int
    pin_bitmap: tuple[int, int, int, int]


class PciDevice(msgspec.Struct, frozen=True):
    type: int
    domain: int
    bdf: int
    num_msix_vectors: int
    shmem_regions_start: int
    shmem_dev_id: int
    shmem_peers: int
    shmem_protocol: int


class Console(msgspec.Struct, frozen=True):
    address: int
    size: int
    type: int
    flags: int


class CellConfig(msgspec.Struct, frozen=True):
    """A decoded non-root cell configuration."""

    profile: str
    architecture: int | None
    name: str
    flags: int
    cpus: frozenset[int]
    rcpus: frozenset[int]
    memory_regions: tuple[MemoryRegion, ...]
    irqchips: tuple[IrqChip, ...]
    pci_devices: tuple[PciDevice, ...]
    vpci_irq_base: int
    cpu_reset_address: int
    msg_reply_timeout: int
    console: Console
    size: int


class ConfigRejected(Exception):
    """The driver refuses the configuration: ``errno`` for the ioctl, ``log`` for dmesg."""

    def __init__(self, err: int, log: str | None = None) -> None:
        super().__init__(log or errno.errorcode.get(err, str(err)))
        self.errno = err
        self.log = log


class ArchitectureMismatch(Exception):
    """Rev-14 architecture byte differs from the board (the driver's silent exit-0 quirk)."""


def _bitmap_to_set(data: bytes) -> frozenset[int]:
    value = int.from_bytes(data, "little")
    return frozenset(bit for bit in range(len(data) * 8) if value >> bit & 1)


def _decode_header(data: bytes, profile: FormatProfile) -> dict[str, int | bytes]:
    names = ["signature"] + (["architecture"] if profile.has_architecture else [])
    names += ["revision", "name", "id", "flags", "cpu_set_size", *profile.count_fields]
    names += ["cpu_reset_address", "msg_reply_timeout", *_CONSOLE_FIELDS]
    return dict(zip(names, struct.unpack_from(profile.header_format, data)))


def check_signature(data: bytes, profile: FormatProfile, board_arch: int, *, system: bool) -> None:
    """Run the driver's header checks in its order: size+signature, revision, architecture.

    Raises :class:`ConfigRejected` (EINVAL) or :class:`ArchitectureMismatch`.
    """
    signature = profile.system_signature if system else profile.cell_signature
    minimum = len(signature) + (1 if profile.has_architecture else 0) + 2
    if len(data) < (minimum if system else profile.header_size) or not data.startswith(signature):
        raise ConfigRejected(errno.EINVAL, "Not a system configuration" if system else "Not a cell configuration")
    offset = len(signature) + (1 if profile.has_architecture else 0)
    (revision,) = struct.unpack_from("<H", data, offset)
    if revision != profile.revision:
        raise ConfigRejected(errno.EINVAL, "Configuration revision mismatch")
    if profile.has_architecture and data[len(signature)] != board_arch:
        raise ArchitectureMismatch("Configuration architecture mismatch")


def parse_cell(data: bytes, profile: FormatProfile) -> CellConfig:
    """Decode a cell config whose header already passed :func:`check_signature`.

    Raises ConfigRejected(EINVAL) when the arrays announced by the header run past
    the end of the data (the simulator's stand-in for the HV reading garbage).
    """
    h = _decode_header(data, profile)
    region_format = "<QQQQ" + ("Q" if profile.memory_region_size == 40 else "")
    offset = profile.header_size
    sections = {
        "cpus": h["cpu_set_size"],
        "rcpus": h.get("rcpu_set_size", 0),
        "regions": h["num_memory_regions"] * profile.memory_region_size,
        "caches": h["num_cache_regions"] * 12,
        "irqchips": h["num_irqchips"] * 32,
        "pio": h["num_pio_regions"] * 4,
        "pci": h["num_pci_devices"] * 56,
        "caps": h["num_pci_caps"] * 8,
        "streams": h["num_stream_ids"] * 4,
        "qos": h.get("num_qos_devices", 0) * 20,
    }
    spans: dict[str, bytes] = {}
    for section, length in sections.items():
        spans[section] = data[offset : offset + length]
        offset += length
    if offset > len(data):
        raise ConfigRejected(errno.EINVAL, "Configuration size exceeds the data passed")
    regions = tuple(
        MemoryRegion(*struct.unpack_from(region_format, spans["regions"], i))
        for i in range(0, len(spans["regions"]), profile.memory_region_size)
    )
    irqchips = tuple(
        IrqChip(address, chip_id, pin_base, tuple(bitmap))
        for address, chip_id, pin_base, *bitmap in (
            struct.unpack_from("<QII4I", spans["irqchips"], i) for i in range(0, len(spans["irqchips"]), 32)
        )
    )
    pci = []
    for i in range(0, len(spans["pci"]), 56):
        f = struct.unpack_from("<BBHH6IHHBBHHQIBBH", spans["pci"], i)
        pci.append(PciDevice(type=f[0], domain=f[2], bdf=f[3], num_msix_vectors=f[14],
                             shmem_regions_start=f[17], shmem_dev_id=f[18], shmem_peers=f[19],
                             shmem_protocol=f[20]))
    return CellConfig(
        profile=profile.name,
        architecture=h.get("architecture"),
        # The driver forces byte 31 to NUL, so a name is at most 31 characters.
        name=h["name"][:31].split(b"\0", 1)[0].decode("latin-1"),
        flags=h["flags"],
        cpus=_bitmap_to_set(spans["cpus"]),
        rcpus=_bitmap_to_set(spans["rcpus"]),
        memory_regions=regions,
        irqchips=irqchips,
        pci_devices=tuple(pci),
        vpci_irq_base=h["vpci_irq_base"],
        cpu_reset_address=h["cpu_reset_address"],
        msg_reply_timeout=h["msg_reply_timeout"],
        console=Console(h["con_address"], h["con_size"], h["con_type"], h["con_flags"]),
        size=offset,
    )


def minimal_system_config(profile: FormatProfile, architecture: int) -> bytes:
    """The system-config stub the simulator installs for ``jailhouse enable``.

    Only the fields the simulated driver checks are meaningful (signature,
    architecture, revision, flags); the root cell layout comes from the board.
    """
    head = profile.system_signature + (bytes([architecture]) if profile.has_architecture else b"")
    return head + struct.pack("<HI", profile.revision, SYS_VIRTUAL_DEBUG_CONSOLE)
