"""Linux guests: place kernel, device tree and initrd the way `jailhouse cell linux` does.

Jailhouse boots a non-root Linux through its small ``linux-loader.bin`` inmate:
the loader sits at the cell's reset address and reads ``kernel=0x… dtb=0x…`` from
its command-line page (reset address + 0x1000), then jumps to the kernel with
the device tree. runphi computes the same layout as the upstream helper (arm64,
jailhouse.md §1.8) but loads the pieces itself, so `create` only creates and
loads and `start` starts (the helper would do all three at once):

* RAM = the first cell region whose flags, restricted to R|W|X|DMA|IO|COMM|
  ROOTSHARED, are exactly R|W|X|DMA and that can hold every image;
* the device tree at that region's start (+0x2000 when it starts at 0, to
  leave the loader and its command line alone);
* the kernel 2 MiB-aligned after the device tree, plus the Image header's
  text offset, with ``factor × size`` reserved (arm64: 1);
* the initrd right after that reservation, page aligned.

The device tree is patched: ``/memory/reg`` lists the cell's RAM regions (a
≤ 64 KiB region at guest 0 excepted), ``/chosen`` gets ``bootargs`` and the
initrd range. Pure functions on bytes: no I/O here.
"""

from __future__ import annotations

import struct

import msgspec

from runphi.backends.jailhouse import cellconfig as cc
from runphi.errors import RunphiError

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9
_HEADER = struct.Struct(">10I")

LOADER_PARAMS_OFFSET = 0x1000
DTB_OFFSET_AT_ZERO = 0x2000
KERNEL_ALIGN = 0x200000
PAGE = 0x1000
SMALL_LOW_RAM = 0x10000
ARM64_IMAGE_MAGIC = b"ARM\x64"
_RAM_MASK = (cc.MEM_READ | cc.MEM_WRITE | cc.MEM_EXECUTE | cc.MEM_DMA | cc.MEM_IO | cc.MEM_COMM_REGION
             | cc.MEM_ROOTSHARED)
_RAM_FLAGS = cc.MEM_READ | cc.MEM_WRITE | cc.MEM_EXECUTE | cc.MEM_DMA


class LinuxGuestError(RunphiError):
    """The kernel, device tree or initrd cannot be placed or patched."""


class LinuxPlacement(msgspec.Struct, frozen=True, kw_only=True):
    """Guest addresses of every piece, and the loader's command line."""

    loader: int
    dtb: int
    kernel: int
    initrd: int | None
    params: str
    params_address: int


# ---- flattened device tree ------------------------------------------------

class FdtNode:
    """One device-tree node: its properties in order, and its children."""

    __slots__ = ("name", "props", "children")

    def __init__(self, name: str) -> None:
        self.name = name
        self.props: dict[str, bytes] = {}
        self.children: list[FdtNode] = []

    def child(self, name: str, create: bool = False) -> FdtNode | None:
        for node in self.children:
            if node.name == name or node.name.split("@", 1)[0] == name:
                return node
        if not create:
            return None
        node = FdtNode(name)
        self.children.append(node)
        return node


class Fdt(msgspec.Struct):
    """A decoded device tree blob (memory reservations and the node tree)."""

    boot_cpuid: int
    reservations: list[tuple[int, int]]
    root: object  # FdtNode (a plain class: msgspec never encodes it)


def parse_fdt(blob: bytes) -> Fdt:
    """Decode a DTB (version ≥ 16); :class:`LinuxGuestError` if it is not one."""
    if len(blob) < _HEADER.size:
        raise LinuxGuestError("the device tree is too short to be a DTB")
    (magic, total, off_struct, off_strings, off_rsv, version, _last, boot_cpuid, size_strings,
     size_struct) = _HEADER.unpack_from(blob)
    if magic != FDT_MAGIC or total > len(blob) or version < 16:
        raise LinuxGuestError("the device tree is not a flattened device tree blob (bad magic or version)")
    strings = blob[off_strings:off_strings + size_strings]
    reservations = []
    pos = off_rsv
    while True:
        address, size = struct.unpack_from(">QQ", blob, pos)
        pos += 16
        if address == 0 and size == 0:
            break
        reservations.append((address, size))
    stack: list[FdtNode] = []
    root: FdtNode | None = None
    pos, end = off_struct, off_struct + (size_struct if version >= 17 else total - off_struct)
    while pos < end:
        (token,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if token == FDT_BEGIN_NODE:
            stop = blob.index(b"\0", pos)
            node = FdtNode(blob[pos:stop].decode())
            pos = _align4(stop + 1)
            if stack:
                stack[-1].children.append(node)
            else:
                root = node
            stack.append(node)
        elif token == FDT_END_NODE:
            stack.pop()
        elif token == FDT_PROP:
            length, name_offset = struct.unpack_from(">II", blob, pos)
            pos += 8
            name = strings[name_offset:strings.index(b"\0", name_offset)].decode()
            stack[-1].props[name] = blob[pos:pos + length]
            pos = _align4(pos + length)
        elif token == FDT_NOP:
            continue
        elif token == FDT_END:
            break
        else:
            raise LinuxGuestError(f"the device tree has an unknown token {token} at offset {pos - 4}")
    if root is None:
        raise LinuxGuestError("the device tree has no root node")
    return Fdt(boot_cpuid=boot_cpuid, reservations=reservations, root=root)


def encode_fdt(fdt: Fdt) -> bytes:
    """Encode a tree as a version-17 DTB."""
    strings = bytearray()
    offsets: dict[str, int] = {}
    body = bytearray()

    def name_offset(name: str) -> int:
        if name not in offsets:
            offsets[name] = len(strings)
            strings.extend(name.encode() + b"\0")
        return offsets[name]

    def emit(node: FdtNode) -> None:
        body.extend(struct.pack(">I", FDT_BEGIN_NODE))
        body.extend(_pad4(node.name.encode() + b"\0"))
        for name, value in node.props.items():
            body.extend(struct.pack(">III", FDT_PROP, len(value), name_offset(name)))
            body.extend(_pad4(value))
        for child in node.children:
            emit(child)
        body.extend(struct.pack(">I", FDT_END_NODE))

    emit(fdt.root)  # type: ignore[arg-type]
    body.extend(struct.pack(">I", FDT_END))
    rsv = b"".join(struct.pack(">QQ", a, s) for a, s in fdt.reservations) + struct.pack(">QQ", 0, 0)
    off_rsv = _align8(_HEADER.size)
    off_struct = off_rsv + len(rsv)
    off_strings = off_struct + len(body)
    total = off_strings + len(strings)
    header = _HEADER.pack(FDT_MAGIC, total, off_struct, off_strings, off_rsv, 17, 16, fdt.boot_cpuid,
                          len(strings), len(body))
    return header + bytes(off_rsv - _HEADER.size) + rsv + bytes(body) + bytes(strings)


def _align4(value: int) -> int:
    return (value + 3) & ~3


def _align8(value: int) -> int:
    return (value + 7) & ~7


def _pad4(data: bytes) -> bytes:
    return data + bytes(_align4(len(data)) - len(data))


def _cells(value: int, count: int) -> bytes:
    return b"".join(struct.pack(">I", (value >> (32 * (count - 1 - i))) & 0xFFFFFFFF) for i in range(count))


def _cell_count(node: FdtNode, name: str, default: int) -> int:
    raw = node.props.get(name)
    return struct.unpack(">I", raw)[0] if raw is not None and len(raw) == 4 else default


# ---- placement ------------------------------------------------------------

def is_ram(region: cc.MemoryRegion) -> bool:
    """Whether `jailhouse cell linux` treats the region as the guest's RAM."""
    return region.size > 0 and region.flags & _RAM_MASK == _RAM_FLAGS


def kernel_text_offset(kernel: bytes) -> int:
    """The arm64 Image header's text offset (0 for anything that is not an Image)."""
    if len(kernel) >= 64 and kernel[56:60] == ARM64_IMAGE_MAGIC:
        return struct.unpack_from("<Q", kernel, 8)[0]
    return 0


def place_linux(cell: cc.CellConfig, *, loader_address: int, kernel: bytes, dtb_size: int,
                initrd_size: int | None, decomp_factor: int = 1) -> LinuxPlacement:
    """Guest addresses for the loader, device tree, kernel and initrd (module docstring)."""
    text_offset = kernel_text_offset(kernel)
    for region in cell.memory_regions:
        if not is_ram(region):
            continue
        dtb = region.virt_start + (DTB_OFFSET_AT_ZERO if region.virt_start == 0 else 0)
        kernel_at = _align(dtb + dtb_size, KERNEL_ALIGN) + text_offset
        end = kernel_at + len(kernel) * decomp_factor
        initrd = None
        if initrd_size is not None:
            initrd = _align(end, PAGE)
            end = initrd + initrd_size
        if end <= region.virt_start + region.size:
            params = f"kernel={kernel_at:#x} dtb={dtb:#x}"
            return LinuxPlacement(loader=loader_address, dtb=dtb, kernel=kernel_at, initrd=initrd, params=params,
                                  params_address=loader_address + LOADER_PARAMS_OFFSET)
    raise LinuxGuestError(f"cell {cell.name!r}: no RAM region can hold the kernel, device tree and initrd "
                          "(give the ZIC more memory)")


def _align(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def patch_device_tree(blob: bytes, cell: cc.CellConfig, placement: LinuxPlacement, *, cmdline: str,
                      initrd_size: int | None) -> bytes:
    """The device tree with the cell's RAM in /memory and bootargs/initrd in /chosen."""
    fdt = parse_fdt(blob)
    root: FdtNode = fdt.root  # type: ignore[assignment]
    address_cells = _cell_count(root, "#address-cells", 2)
    size_cells = _cell_count(root, "#size-cells", 1)
    ram = [r for r in cell.memory_regions
           if is_ram(r) and not (r.virt_start == 0 and r.size <= SMALL_LOW_RAM)]
    memory = root.child("memory", create=True)
    assert memory is not None
    memory.props["device_type"] = b"memory\0"
    memory.props["reg"] = b"".join(_cells(r.virt_start, address_cells) + _cells(r.size, size_cells) for r in ram)
    chosen = root.child("chosen", create=True)
    assert chosen is not None
    if cmdline:
        chosen.props["bootargs"] = cmdline.encode() + b"\0"
    if placement.initrd is not None and initrd_size is not None:
        chosen.props["linux,initrd-start"] = struct.pack(">Q", placement.initrd)
        chosen.props["linux,initrd-end"] = struct.pack(">Q", placement.initrd + initrd_size)
    return encode_fdt(fdt)


# ---- kernel command line ----------------------------------------------------

#: The tty a Linux kernel gives the first UART of each Jailhouse console type.
CONSOLE_DEVICES = {
    cc.CON_TYPE_PL011: "ttyAMA0",
    cc.CON_TYPE_8250: "ttyS0",
    cc.CON_TYPE_XUARTPS: "ttyPS0",
    cc.CON_TYPE_IMX: "ttymxc0",
    cc.CON_TYPE_IMX_LPUART: "ttyLP0",
    cc.CON_TYPE_MVEBU: "ttyMV0",
    cc.CON_TYPE_HSCIF: "ttySC0",
    cc.CON_TYPE_SCIFA: "ttySC0",
}


def console_device(console_type: int) -> str | None:
    """The guest tty of a cell console UART of ``console_type`` (its only UART), or None."""
    return CONSOLE_DEVICES.get(console_type)


def with_console(cmdline: str, device: str | None) -> str:
    """``cmdline`` with ``console=<device>`` in front unless it already names a console.

    The user's own ``console=`` always wins; without a known device the line is unchanged.
    """
    if device is None or any(word.startswith("console=") for word in cmdline.split()):
        return cmdline
    return f"console={device} {cmdline}".rstrip()
