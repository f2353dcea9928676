"""Human renderings of a cell configuration: a readable decode and a self-contained C source.

The C source uses its own packed struct definitions (no Jailhouse headers) laid out
exactly like `write_cell`'s output for the same profile, so

    gcc -c -o cell.o cell.c && objcopy -O binary -j .data cell.o cell.cell

produces the same bytes as the writer (tests check this with the installed gcc).
"""

from __future__ import annotations

from runphi.backends.jailhouse.cellconfig import (
    CACHE_TYPE_NAMES,
    CELL_FLAG_NAMES,
    CONSOLE_FLAG_NAMES,
    CONSOLE_TYPE_NAMES,
    MEM_FLAG_NAMES,
    PCI_TYPE_NAMES,
    QOS_FLAG_NAMES,
    CellConfig,
    FormatProfile,
    MemoryRegion,
    PciDevice,
    format_flags,
    shmem_protocol_name,
    write_cell,
)
from runphi.backends.jailhouse.cpulist import format_cpu_list


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
    c = config
    if c.architecture is None:
        arch = "not recorded (no architecture byte)"
    else:
        arch = c.architecture.name.lower() + ("" if profile.has_architecture else " (not written by this profile)")
    lines = [
        f"profile:           {profile.name} ({profile.description})",
        f"signature:         {profile.signature.decode()} revision {profile.revision}",
        f"architecture:      {arch}",
    ]
    if size is not None:
        lines.append(f"size:              {size} bytes (header {profile.header_size})")
    lines += [
        f"name:              {c.name}",
        f"id:                {c.id}",
        f"flags:             {format_flags(c.flags, CELL_FLAG_NAMES)}",
        f"cpu_set_size:      {c.cpu_set_size}",
        f"cpus:              {cpu_list(c.cpus)} (mask {sum(1 << n for n in c.cpus):#x})",
    ]
    if profile.has_rcpu_set:
        lines += [
            f"rcpu_set_size:     {c.rcpu_set_size}",
            f"rcpus:             {cpu_list(c.rcpus)} (mask {sum(1 << n for n in c.rcpus):#x})",
        ]
    lines += [
        f"vpci_irq_base:     {c.vpci_irq_base}",
        f"cpu_reset_address: {c.cpu_reset_address:#x}",
        f"msg_reply_timeout: {c.msg_reply_timeout}",
        "console:",
        f"  address {c.console.address:#x} size {c.console.size:#x} "
        f"type {c.console.type} ({console_type_name(c.console.type, profile)}) "
        f"flags {format_flags(c.console.flags, CONSOLE_FLAG_NAMES)}",
        f"  divider {c.console.divider} gate_nr {c.console.gate_nr} clock_reg {c.console.clock_reg:#x}",
        f"memory regions ({len(c.memory_regions)}):",
    ]
    for i, r in enumerate(c.memory_regions):
        colors = f" colors {r.colors:#x}" if profile.region_size == 40 else ""
        lines.append(
            f"  [{i:2}] phys {r.phys_start:#012x} -> virt {r.virt_start:#012x} size {r.size:#010x}"
            f" flags {format_flags(r.flags, MEM_FLAG_NAMES)}{colors}"
        )
    lines.append(f"cache regions ({len(c.cache_regions)}):")
    for i, cr in enumerate(c.cache_regions):
        lines.append(
            f"  [{i}] start {cr.start} size {cr.size} type {cr.type} ({CACHE_TYPE_NAMES.get(cr.type, 'unknown')})"
            f" flags {format_flags(cr.flags, {1: 'ROOTSHARED'})}"
        )
    lines.append(f"irqchips ({len(c.irqchips)}):")
    for i, ic in enumerate(c.irqchips):
        bitmap = ", ".join(f"{w:#x}" for w in ic.pin_bitmap)
        irqs = ", ".join(str(n) for n in ic.irqs()) or "none"
        lines.append(f"  [{i}] address {ic.address:#x} id {ic.id} pin_base {ic.pin_base} bitmap {{{bitmap}}}")
        lines.append(f"      irqs: {irqs}")
    lines.append(f"pio regions ({len(c.pio_regions)}):")
    for i, pio in enumerate(c.pio_regions):
        lines.append(f"  [{i}] base {pio.base:#x} length {pio.length:#x}")
    lines.append(f"pci devices ({len(c.pci_devices)}):")
    for i, d in enumerate(c.pci_devices):
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
    lines.append(f"pci capabilities ({len(c.pci_caps)}):")
    for i, cap in enumerate(c.pci_caps):
        ext = " (extended)" if cap.id & 0x8000 else ""
        lines.append(
            f"  [{i}] id {cap.id:#x}{ext} start {cap.start:#x} len {cap.len} "
            f"flags {format_flags(cap.flags, {1: 'WRITE'})}"
        )
    lines.append(f"stream ids ({len(c.stream_ids)}): {', '.join(f'{s:#x}' for s in c.stream_ids) or 'none'}")
    if profile.has_qos_devices:
        lines.append(f"qos devices ({len(c.qos_devices)}):")
        for i, q in enumerate(c.qos_devices):
            lines.append(f"  [{i}] name {q.name!r} flags {format_flags(q.flags, QOS_FLAG_NAMES)} base {q.base:#x}")
    return "\n".join(lines) + "\n"


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
    write_cell(config, profile)  # same validation as the binary path
    c = config
    members = ["\tstruct cell_desc cell;", f"\tuint8_t cpus[{c.cpu_set_size}];"]
    if profile.has_rcpu_set:
        members.append(f"\tuint8_t rcpus[{c.rcpu_set_size}];")
    arrays = [
        ("struct memory", "mem_regions", c.memory_regions),
        ("struct cache", "cache_regions", c.cache_regions),
        ("struct irqchip", "irqchips", c.irqchips),
        ("struct pio", "pio_regions", c.pio_regions),
        ("struct pci_device", "pci_devices", c.pci_devices),
        ("struct pci_capability", "pci_caps", c.pci_caps),
        ("uint32_t", "stream_ids", c.stream_ids),
        ("struct qos_device", "qos_devices", c.qos_devices),
    ]
    members += [f"\t{ctype} {field}[{len(items)}];" for ctype, field, items in arrays if items]
    con = c.console
    head = [f".signature = {{{', '.join(repr(chr(b)) for b in profile.signature)}}},"]
    if profile.has_architecture:
        head.append(f".architecture = {int(c.architecture)},")  # type: ignore[arg-type]
    head += [
        f".revision = {profile.revision},",
        f".name = {_c_string(c.name.encode())},",
        f".id = {c.id},",
        f".flags = {c.flags:#x}, /* {format_flags(c.flags, CELL_FLAG_NAMES)} */",
        f".cpu_set_size = {c.cpu_set_size},",
    ]
    if profile.has_rcpu_set:
        head.append(f".rcpu_set_size = {c.rcpu_set_size},")
    head += [
        f".num_memory_regions = {len(c.memory_regions)},",
        f".num_cache_regions = {len(c.cache_regions)},",
        f".num_irqchips = {len(c.irqchips)},",
        f".num_pio_regions = {len(c.pio_regions)},",
        f".num_pci_devices = {len(c.pci_devices)},",
        f".num_pci_caps = {len(c.pci_caps)},",
        f".num_stream_ids = {len(c.stream_ids)},",
    ]
    if profile.has_qos_devices:
        head.append(f".num_qos_devices = {len(c.qos_devices)},")
    head += [
        f".vpci_irq_base = {c.vpci_irq_base},",
        f".cpu_reset_address = {c.cpu_reset_address:#x}ULL,",
        f".msg_reply_timeout = {c.msg_reply_timeout:#x}ULL,",
        f".console = {{ .address = {con.address:#x}ULL, .size = {con.size:#x}, .type = {con.type}, "
        f".flags = {con.flags:#x}, .divider = {con.divider:#x}, .gate_nr = {con.gate_nr}, "
        f".clock_reg = {con.clock_reg:#x}ULL }},",
    ]
    body = ["\t.cell = {", *(f"\t\t{line}" for line in head), "\t},"]
    body.append(f"\t.cpus = {{ {_bitmap_words(c.cpus, c.cpu_set_size)} }}, /* {cpu_list(c.cpus)} */")
    if profile.has_rcpu_set:
        body.append(f"\t.rcpus = {{ {_bitmap_words(c.rcpus, c.rcpu_set_size)} }},")
    body += _c_array("mem_regions", [_c_region(r, profile) for r in c.memory_regions])
    body += _c_array(
        "cache_regions",
        [f"{{ .start = {x.start}, .size = {x.size}, .type = {x.type}, .flags = {x.flags} }}" for x in c.cache_regions],
    )
    body += _c_array(
        "irqchips",
        [
            f"{{ .address = {x.address:#x}ULL, .id = {x.id}, .pin_base = {x.pin_base}, "
            f".pin_bitmap = {{ {', '.join(f'{w:#x}' for w in x.pin_bitmap)} }} }}"
            for x in c.irqchips
        ],
    )
    body += _c_array("pio_regions", [f"{{ .base = {x.base:#x}, .length = {x.length:#x} }}" for x in c.pio_regions])
    body += _c_array("pci_devices", [_c_pci(d) for d in c.pci_devices])
    body += _c_array(
        "pci_caps",
        [f"{{ .id = {x.id:#x}, .start = {x.start:#x}, .len = {x.len}, .flags = {x.flags} }}" for x in c.pci_caps],
    )
    body += _c_array("stream_ids", [f"{s:#x}" for s in c.stream_ids])
    body += _c_array(
        "qos_devices",
        [f"{{ .name = {_c_string(q.name.encode())}, .flags = {q.flags:#x}, .base = {q.base:#x} }}" for q in c.qos_devices],
    )
    return (
        f"/* Cell configuration {c.name.replace('*/', '* /')!r}, format profile {profile.name}, generated by runphi.\n"
        " * Build: gcc -c -o cell.o cell.c && objcopy -O binary -j .data cell.o cell.cell */\n"
        "#include <stdint.h>\n\n"
        + _c_struct_defs(profile)
        + "\nstruct {\n"
        + "\n".join(members)
        + "\n} PACKED config = {\n"
        + "\n".join(body)
        + "\n};\n"
    )


def _c_array(field: str, items: list[str]) -> list[str]:
    """Designated-initializer lines for one array member (nothing when it is empty)."""
    if not items:
        return []
    return [f"\t.{field} = {{", *(f"\t\t{item}," for item in items), "\t},"]


def _c_region(r: MemoryRegion, profile: FormatProfile) -> str:
    colors = f", .colors = {r.colors:#x}ULL" if profile.region_size == 40 else ""
    return (
        f"{{ .phys_start = {r.phys_start:#x}ULL, .virt_start = {r.virt_start:#x}ULL, .size = {r.size:#x}ULL, "
        f".flags = {r.flags:#x}ULL{colors} }} /* {format_flags(r.flags, MEM_FLAG_NAMES)} */"
    )


def _c_pci(d: PciDevice) -> str:
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
