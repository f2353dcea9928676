"""Human renderings of a cell configuration: a readable decode and a self-contained C source.

The C source uses its own packed struct definitions (no Jailhouse headers) laid out
exactly like `write_cell`'s output for the same profile, so

    gcc -c -o cell.o cell.c && objcopy -O binary -j .data cell.o cell.cell

produces the same bytes as the writer (tests check this with the installed gcc).
"""

from __future__ import annotations

from runphi.backends.cpulist import format_cpu_list
from runphi.backends.jailhouse.cellconfig import (
    CACHE_TYPE_NAMES,
    CELL_FLAG_NAMES,
    CONSOLE_FLAG_NAMES,
    CONSOLE_TYPE_NAMES,
    MEM_FLAG_NAMES,
    PCI_TYPE_NAMES,
    QOS_FLAG_NAMES,
    CacheRegion,
    CellConfig,
    FormatProfile,
    IrqChip,
    MemoryRegion,
    PciCapability,
    PciDevice,
    PioRegion,
    QosDevice,
    format_flags,
    shmem_protocol_name,
    write_cell,
)


def cpu_list(cpus: frozenset[int]) -> str:
    """Kernel list syntax for a CPU set (`0-1,4`); `none` when empty."""
    return format_cpu_list(cpus) or "none"


def console_type_name(value: int, profile: FormatProfile) -> str:
    """Name of a console type; 0x0a depends on the profile's console.h."""
    if value == 0x0A:
        return profile.console_type_0a
    return CONSOLE_TYPE_NAMES.get(value, "unknown")


def bdf_text(bdf: int) -> str:
    """`bb:dd.f` as Jailhouse prints it."""
    return f"{bdf >> 8:02x}:{bdf >> 3 & 0x1F:02x}.{bdf & 7:x}"


def describe_cell(config: CellConfig, profile: FormatProfile, size: int | None = None) -> str:
    """Every field of `config` as readable text, flags with their names."""
    sections = (
        _describe_header(config, profile, size),
        _describe_console(config, profile),
        _describe_memory_regions(config, profile),
        _describe_cache_regions(config),
        _describe_irqchips(config),
        _describe_pio_regions(config),
        _describe_pci_devices(config),
        _describe_pci_caps(config),
        _describe_stream_ids(config),
        _describe_qos_devices(config, profile),
    )
    return "\n".join(line for section in sections for line in section) + "\n"


def _architecture_text(config: CellConfig, profile: FormatProfile) -> str:
    """The architecture name, saying when the file has none or the profile drops it."""
    if config.architecture is None:
        return "not recorded (no architecture byte)"
    return config.architecture.name.lower() + ("" if profile.has_architecture else " (not written by this profile)")


def _cpu_set_text(cpus: frozenset[int]) -> str:
    """A CPU set as list syntax and bitmask: `0-1 (mask 0x3)`."""
    return f"{cpu_list(cpus)} (mask {sum(1 << n for n in cpus):#x})"


def _describe_header(config: CellConfig, profile: FormatProfile, size: int | None) -> list[str]:
    """Format, identity and CPU lines of the header; `size:` only when `size` is given."""
    c = config
    lines = [
        f"profile:           {profile.name} ({profile.description})",
        f"signature:         {profile.signature.decode()} revision {profile.revision}",
        f"architecture:      {_architecture_text(c, profile)}",
    ]
    if size is not None:
        lines.append(f"size:              {size} bytes (header {profile.header_size})")
    lines += [
        f"name:              {c.name}",
        f"id:                {c.id}",
        f"flags:             {format_flags(c.flags, CELL_FLAG_NAMES)}",
        f"cpu_set_size:      {c.cpu_set_size}",
        f"cpus:              {_cpu_set_text(c.cpus)}",
    ]
    if profile.has_rcpu_set:
        lines += [
            f"rcpu_set_size:     {c.rcpu_set_size}",
            f"rcpus:             {_cpu_set_text(c.rcpus)}",
        ]
    return lines + [
        f"vpci_irq_base:     {c.vpci_irq_base}",
        f"cpu_reset_address: {c.cpu_reset_address:#x}",
        f"msg_reply_timeout: {c.msg_reply_timeout}",
    ]


def _describe_console(config: CellConfig, profile: FormatProfile) -> list[str]:
    """The `console:` block: every field, type and flags named."""
    con = config.console
    return [
        "console:",
        f"  address {con.address:#x} size {con.size:#x} "
        f"type {con.type} ({console_type_name(con.type, profile)}) "
        f"flags {format_flags(con.flags, CONSOLE_FLAG_NAMES)}",
        f"  divider {con.divider} gate_nr {con.gate_nr} clock_reg {con.clock_reg:#x}",
    ]


def _describe_memory_regions(config: CellConfig, profile: FormatProfile) -> list[str]:
    """One line per memory region; `colors` only in 40-byte-region profiles."""
    lines = [f"memory regions ({len(config.memory_regions)}):"]
    for i, r in enumerate(config.memory_regions):
        colors = f" colors {r.colors:#x}" if profile.region_size == 40 else ""
        lines.append(
            f"  [{i:2}] phys {r.phys_start:#012x} -> virt {r.virt_start:#012x} size {r.size:#010x}"
            f" flags {format_flags(r.flags, MEM_FLAG_NAMES)}{colors}"
        )
    return lines


def _describe_cache_regions(config: CellConfig) -> list[str]:
    """One line per cache region, its type named."""
    lines = [f"cache regions ({len(config.cache_regions)}):"]
    for i, cr in enumerate(config.cache_regions):
        lines.append(
            f"  [{i}] start {cr.start} size {cr.size} type {cr.type} ({CACHE_TYPE_NAMES.get(cr.type, 'unknown')})"
            f" flags {format_flags(cr.flags, {1: 'ROOTSHARED'})}"
        )
    return lines


def _describe_irqchips(config: CellConfig) -> list[str]:
    """Two lines per irqchip: its raw fields, then the IRQ numbers its bitmap grants."""
    lines = [f"irqchips ({len(config.irqchips)}):"]
    for i, ic in enumerate(config.irqchips):
        bitmap = ", ".join(f"{w:#x}" for w in ic.pin_bitmap)
        irqs = ", ".join(str(n) for n in ic.irqs()) or "none"
        lines.append(f"  [{i}] address {ic.address:#x} id {ic.id} pin_base {ic.pin_base} bitmap {{{bitmap}}}")
        lines.append(f"      irqs: {irqs}")
    return lines


def _describe_pio_regions(config: CellConfig) -> list[str]:
    """One line per port-I/O region."""
    lines = [f"pio regions ({len(config.pio_regions)}):"]
    lines += [f"  [{i}] base {pio.base:#x} length {pio.length:#x}" for i, pio in enumerate(config.pio_regions)]
    return lines


def _describe_pci_devices(config: CellConfig) -> list[str]:
    """Five lines per PCI device: every field, type, BDF and shmem protocol named."""
    lines = [f"pci devices ({len(config.pci_devices)}):"]
    for i, d in enumerate(config.pci_devices):
        lines += [
            f"  [{i}] type {d.type} ({PCI_TYPE_NAMES.get(d.type, 'unknown')}) domain {d.domain} "
            f"bdf {d.bdf:#x} ({bdf_text(d.bdf)}) iommu {d.iommu}",
            f"      bar_mask {{{', '.join(f'{m:#x}' for m in d.bar_mask)}}}",
            f"      caps_start {d.caps_start} num_caps {d.num_caps} num_msi_vectors {d.num_msi_vectors} "
            f"msi_64bits {int(d.msi_64bits)} msi_maskable {int(d.msi_maskable)}",
            f"      num_msix_vectors {d.num_msix_vectors} msix_region_size {d.msix_region_size:#x} "
            f"msix_address {d.msix_address:#x}",
            f"      shmem_regions_start {d.shmem_regions_start} shmem_dev_id {d.shmem_dev_id} "
            f"shmem_peers {d.shmem_peers} shmem_protocol {d.shmem_protocol:#x} ({shmem_protocol_name(d.shmem_protocol)})",
        ]
    return lines


def _describe_pci_caps(config: CellConfig) -> list[str]:
    """One line per PCI capability, extended ones marked."""
    lines = [f"pci capabilities ({len(config.pci_caps)}):"]
    for i, cap in enumerate(config.pci_caps):
        ext = " (extended)" if cap.id & 0x8000 else ""
        lines.append(
            f"  [{i}] id {cap.id:#x}{ext} start {cap.start:#x} len {cap.len} "
            f"flags {format_flags(cap.flags, {1: 'WRITE'})}"
        )
    return lines


def _describe_stream_ids(config: CellConfig) -> list[str]:
    """All stream IDs on one line (`none` when there are none)."""
    ids = ", ".join(f"{s:#x}" for s in config.stream_ids) or "none"
    return [f"stream ids ({len(config.stream_ids)}): {ids}"]


def _describe_qos_devices(config: CellConfig, profile: FormatProfile) -> list[str]:
    """One line per QoS device; nothing at all in profiles without them."""
    if not profile.has_qos_devices:
        return []
    lines = [f"qos devices ({len(config.qos_devices)}):"]
    for i, q in enumerate(config.qos_devices):
        lines.append(f"  [{i}] name {q.name!r} flags {format_flags(q.flags, QOS_FLAG_NAMES)} base {q.base:#x}")
    return lines


# --- C source ---


def _c_string(raw: bytes) -> str:
    """A C string literal for `raw`, every non-alnum byte escaped in octal (never ambiguous)."""
    return '"' + "".join(chr(b) if chr(b).isalnum() or chr(b) in "-_. " else f"\\{b:03o}" for b in raw) + '"'


def _c_struct_defs(profile: FormatProfile) -> str:
    """Packed C structs laid out like `profile` (our own definitions, no Jailhouse headers)."""
    arch = "\tuint8_t architecture;\n" if profile.has_architecture else ""
    rcpu = "\tuint32_t rcpu_set_size;\n" if profile.has_rcpu_set else ""
    qos = "\tuint32_t num_qos_devices;\n" if profile.has_qos_devices else ""
    colors = "\tuint64_t colors;\n" if profile.region_size == 40 else ""
    return f"""#define PACKED __attribute__((packed))

struct console {{
\tuint64_t address;
\tuint32_t size;
\tuint16_t type;
\tuint16_t flags;
\tuint32_t divider;
\tuint32_t gate_nr;
\tuint64_t clock_reg;
}} PACKED;

struct cell_desc {{
\tchar signature[{len(profile.signature)}];
{arch}\tuint16_t revision;
\tchar name[32];
\tuint32_t id;
\tuint32_t flags;
\tuint32_t cpu_set_size;
{rcpu}\tuint32_t num_memory_regions;
\tuint32_t num_cache_regions;
\tuint32_t num_irqchips;
\tuint32_t num_pio_regions;
\tuint32_t num_pci_devices;
\tuint32_t num_pci_caps;
\tuint32_t num_stream_ids;
{qos}\tuint32_t vpci_irq_base;
\tuint64_t cpu_reset_address;
\tuint64_t msg_reply_timeout;
\tstruct console console;
}} PACKED;

struct memory {{
\tuint64_t phys_start;
\tuint64_t virt_start;
\tuint64_t size;
\tuint64_t flags;
{colors}}} PACKED;

struct cache {{
\tuint32_t start;
\tuint32_t size;
\tuint8_t type;
\tuint8_t padding;
\tuint16_t flags;
}} PACKED;

struct irqchip {{
\tuint64_t address;
\tuint32_t id;
\tuint32_t pin_base;
\tuint32_t pin_bitmap[4];
}} PACKED;

struct pio {{
\tuint16_t base;
\tuint16_t length;
}} PACKED;

struct pci_device {{
\tuint8_t type;
\tuint8_t iommu;
\tuint16_t domain;
\tuint16_t bdf;
\tuint32_t bar_mask[6];
\tuint16_t caps_start;
\tuint16_t num_caps;
\tuint8_t num_msi_vectors;
\tuint8_t msi_flags; /* bit 0 msi_64bits, bit 1 msi_maskable */
\tuint16_t num_msix_vectors;
\tuint16_t msix_region_size;
\tuint64_t msix_address;
\tuint32_t shmem_regions_start;
\tuint8_t shmem_dev_id;
\tuint8_t shmem_peers;
\tuint16_t shmem_protocol;
}} PACKED;

struct pci_capability {{
\tuint16_t id;
\tuint16_t start;
\tuint16_t len;
\tuint16_t flags;
}} PACKED;

struct qos_device {{
\tchar name[15];
\tuint8_t flags;
\tuint32_t base;
}} PACKED;
"""


def _bitmap_words(cpus: frozenset[int], size: int) -> str:
    """A CPU set as the C initializer of a `size`-byte little-endian bitmap."""
    mask = sum(1 << n for n in cpus)
    return ", ".join(f"{b:#04x}" for b in mask.to_bytes(size, "little"))


def cell_to_c(config: CellConfig, profile: FormatProfile) -> str:
    """A self-contained C translation unit whose `.data` is exactly `write_cell(config, profile)`."""
    write_cell(config, profile)  # same validation as the binary path, before anything is rendered
    arrays = _c_arrays(config, profile)
    body = [
        *_c_cell_initializer(config, profile),
        *_c_cpu_sets(config, profile),
        *(line for _, field, items in arrays for line in _c_array(field, items)),
    ]
    return (
        _c_file_comment(config, profile)
        + _c_struct_defs(profile)
        + "\nstruct {\n"
        + "\n".join(_c_members(config, profile, arrays))
        + "\n} PACKED config = {\n"
        + "\n".join(body)
        + "\n};\n"
    )


_CArray = tuple[str, str, list[str]]


def _c_file_comment(config: CellConfig, profile: FormatProfile) -> str:
    """The opening comment (cell name, profile, build command) and `#include <stdint.h>`."""
    # A name containing `*/` would end the comment early and break the file.
    name = config.name.replace("*/", "* /")
    return (
        f"/* Cell configuration {name!r}, format profile {profile.name}, generated by runphi.\n"
        " * Build: gcc -c -o cell.o cell.c && objcopy -O binary -j .data cell.o cell.cell */\n"
        "#include <stdint.h>\n\n"
    )


def _c_arrays(config: CellConfig, profile: FormatProfile) -> list[_CArray]:
    """(C type, member name, initializer items) of every array after the CPU sets, in file order."""
    c = config
    return [
        ("struct memory", "mem_regions", [_c_region(r, profile) for r in c.memory_regions]),
        ("struct cache", "cache_regions", [_c_cache(x) for x in c.cache_regions]),
        ("struct irqchip", "irqchips", [_c_irqchip(x) for x in c.irqchips]),
        ("struct pio", "pio_regions", [_c_pio(x) for x in c.pio_regions]),
        ("struct pci_device", "pci_devices", [_c_pci(d) for d in c.pci_devices]),
        ("struct pci_capability", "pci_caps", [_c_pci_cap(x) for x in c.pci_caps]),
        ("uint32_t", "stream_ids", [f"{s:#x}" for s in c.stream_ids]),
        ("struct qos_device", "qos_devices", [_c_qos(q) for q in c.qos_devices]),
    ]


def _c_members(config: CellConfig, profile: FormatProfile, arrays: list[_CArray]) -> list[str]:
    """Member declarations of the outer struct; empty arrays are left out (they occupy no bytes)."""
    members = ["\tstruct cell_desc cell;", f"\tuint8_t cpus[{config.cpu_set_size}];"]
    if profile.has_rcpu_set:
        members.append(f"\tuint8_t rcpus[{config.rcpu_set_size}];")
    return members + [f"\t{ctype} {field}[{len(items)}];" for ctype, field, items in arrays if items]


def _c_cell_initializer(config: CellConfig, profile: FormatProfile) -> list[str]:
    """The `.cell = { ... },` initializer of the header, in `struct cell_desc` field order."""
    fields = [
        *_c_header_identity(config, profile),
        *_c_header_counts(config, profile),
        *_c_header_tail(config),
    ]
    return ["\t.cell = {", *(f"\t\t{line}" for line in fields), "\t},"]


def _c_header_identity(config: CellConfig, profile: FormatProfile) -> list[str]:
    """Header fields from `signature` to `rcpu_set_size` (those the profile has)."""
    c = config
    fields = [f".signature = {{{', '.join(repr(chr(b)) for b in profile.signature)}}},"]
    if profile.has_architecture:
        fields.append(f".architecture = {int(c.architecture)},")  # type: ignore[arg-type]
    fields += [
        f".revision = {profile.revision},",
        f".name = {_c_string(c.name.encode())},",
        f".id = {c.id},",
        f".flags = {c.flags:#x}, /* {format_flags(c.flags, CELL_FLAG_NAMES)} */",
        f".cpu_set_size = {c.cpu_set_size},",
    ]
    if profile.has_rcpu_set:
        fields.append(f".rcpu_set_size = {c.rcpu_set_size},")
    return fields


def _c_header_counts(config: CellConfig, profile: FormatProfile) -> list[str]:
    """The `num_*` header fields, one per array (`num_qos_devices` only if the profile has it)."""
    c = config
    fields = [
        f".num_memory_regions = {len(c.memory_regions)},",
        f".num_cache_regions = {len(c.cache_regions)},",
        f".num_irqchips = {len(c.irqchips)},",
        f".num_pio_regions = {len(c.pio_regions)},",
        f".num_pci_devices = {len(c.pci_devices)},",
        f".num_pci_caps = {len(c.pci_caps)},",
        f".num_stream_ids = {len(c.stream_ids)},",
    ]
    if profile.has_qos_devices:
        fields.append(f".num_qos_devices = {len(c.qos_devices)},")
    return fields


def _c_header_tail(config: CellConfig) -> list[str]:
    """Header fields after the counts: `vpci_irq_base` through the console."""
    c, con = config, config.console
    return [
        f".vpci_irq_base = {c.vpci_irq_base},",
        f".cpu_reset_address = {c.cpu_reset_address:#x}ULL,",
        f".msg_reply_timeout = {c.msg_reply_timeout:#x}ULL,",
        f".console = {{ .address = {con.address:#x}ULL, .size = {con.size:#x}, .type = {con.type}, "
        f".flags = {con.flags:#x}, .divider = {con.divider:#x}, .gate_nr = {con.gate_nr}, "
        f".clock_reg = {con.clock_reg:#x}ULL }},",
    ]


def _c_cpu_sets(config: CellConfig, profile: FormatProfile) -> list[str]:
    """The `.cpus` bitmap initializer, and `.rcpus` when the profile has it."""
    c = config
    lines = [f"\t.cpus = {{ {_bitmap_words(c.cpus, c.cpu_set_size)} }}, /* {cpu_list(c.cpus)} */"]
    if profile.has_rcpu_set:
        lines.append(f"\t.rcpus = {{ {_bitmap_words(c.rcpus, c.rcpu_set_size)} }},")
    return lines


def _c_array(field: str, items: list[str]) -> list[str]:
    """Designated-initializer lines for one array member (nothing when it is empty)."""
    if not items:
        return []
    return [f"\t.{field} = {{", *(f"\t\t{item}," for item in items), "\t},"]


def _c_region(r: MemoryRegion, profile: FormatProfile) -> str:
    """One memory-region initializer, flags named in a comment; `.colors` only in 40-byte regions."""
    colors = f", .colors = {r.colors:#x}ULL" if profile.region_size == 40 else ""
    return (
        f"{{ .phys_start = {r.phys_start:#x}ULL, .virt_start = {r.virt_start:#x}ULL, .size = {r.size:#x}ULL, "
        f".flags = {r.flags:#x}ULL{colors} }} /* {format_flags(r.flags, MEM_FLAG_NAMES)} */"
    )


def _c_cache(x: CacheRegion) -> str:
    """One cache-region initializer."""
    return f"{{ .start = {x.start}, .size = {x.size}, .type = {x.type}, .flags = {x.flags} }}"


def _c_irqchip(x: IrqChip) -> str:
    """One irqchip initializer, all four bitmap words."""
    return (
        f"{{ .address = {x.address:#x}ULL, .id = {x.id}, .pin_base = {x.pin_base}, "
        f".pin_bitmap = {{ {', '.join(f'{w:#x}' for w in x.pin_bitmap)} }} }}"
    )


def _c_pio(x: PioRegion) -> str:
    """One port-I/O region initializer."""
    return f"{{ .base = {x.base:#x}, .length = {x.length:#x} }}"


def _c_pci_cap(x: PciCapability) -> str:
    """One PCI capability initializer."""
    return f"{{ .id = {x.id:#x}, .start = {x.start:#x}, .len = {x.len}, .flags = {x.flags} }}"


def _c_qos(q: QosDevice) -> str:
    """One QoS device initializer, the name as an escaped C string."""
    return f"{{ .name = {_c_string(q.name.encode())}, .flags = {q.flags:#x}, .base = {q.base:#x} }}"


def _c_pci(d: PciDevice) -> str:
    """One PCI device initializer; `msi_64bits`/`msi_maskable` packed into `msi_flags` bits 0/1."""
    msi = int(d.msi_64bits) | int(d.msi_maskable) << 1
    return (
        f"{{ .type = {d.type}, .iommu = {d.iommu}, .domain = {d.domain}, .bdf = {d.bdf:#x}, "
        f".bar_mask = {{ {', '.join(f'{m:#x}' for m in d.bar_mask)} }}, .caps_start = {d.caps_start}, "
        f".num_caps = {d.num_caps}, .num_msi_vectors = {d.num_msi_vectors}, .msi_flags = {msi}, "
        f".num_msix_vectors = {d.num_msix_vectors}, .msix_region_size = {d.msix_region_size:#x}, "
        f".msix_address = {d.msix_address:#x}ULL, .shmem_regions_start = {d.shmem_regions_start}, "
        f".shmem_dev_id = {d.shmem_dev_id}, .shmem_peers = {d.shmem_peers}, "
        f".shmem_protocol = {d.shmem_protocol:#x} }}"
    )
