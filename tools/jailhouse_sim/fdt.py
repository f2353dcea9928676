"""A flattened device tree (DTB, version 17) reader and writer, standard library only.

Enough for what ``jailhouse cell linux`` does to a guest's device tree (rewrite
``/memory``, set ``/chosen`` properties) and for the simulator to read them back
when the cell starts. Nodes keep their property and child order; the memory
reservation block is kept as is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = 0xD00DFEED
_HEADER = ">10I"
_HEADER_SIZE = struct.calcsize(_HEADER)  # 40
_BEGIN_NODE, _END_NODE, _PROP, _NOP, _END = 1, 2, 3, 4, 9


class FdtError(Exception):
    """The blob is not a device tree this reader understands (message as the real tool words it)."""


@dataclass
class Node:
    """One node: ``name`` is empty for the root."""

    name: str
    properties: dict[str, bytes] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def child(self, name: str) -> Node | None:
        """The child called ``name``, or None."""
        return next((c for c in self.children if c.name == name), None)


@dataclass
class DeviceTree:
    """A parsed DTB: the root node, the raw memory reservation block and the boot CPU."""

    root: Node
    reservations: bytes = b"\0" * 16
    boot_cpuid: int = 0

    def find(self, path: str) -> Node | None:
        """The node at an absolute ``path`` (``/`` is the root), or None."""
        node: Node | None = self.root
        for part in [p for p in path.split("/") if p]:
            node = node.child(part) if node else None
        return node

    def get(self, path: str, name: str) -> bytes | None:
        """A property's raw value, or None when the node or property is missing."""
        node = self.find(path)
        return node.properties.get(name) if node else None

    def set(self, path: str, name: str, value: bytes) -> None:
        """Set a property, creating the node (under an existing parent) if needed."""
        node = self.find(path)
        if node is None:
            parent_path, _, leaf = path.rstrip("/").rpartition("/")
            parent = self.find(parent_path or "/")
            if parent is None:
                raise FdtError(f"DTB is missing node {parent_path}")
            node = Node(leaf)
            parent.children.append(node)
        node.properties[name] = value

    def cells(self, name: str) -> int:
        """The root's ``#address-cells``/``#size-cells`` value."""
        value = self.get("/", name)
        if value is None or len(value) != 4:
            raise FdtError("Invalid DTB")
        return struct.unpack(">I", value)[0]


def _cstring(blob: bytes, offset: int) -> str:
    end = blob.find(b"\0", offset)
    if end < 0:
        raise FdtError("Invalid DTB")
    return blob[offset:end].decode(errors="replace")


def _align4(value: int) -> int:
    return (value + 3) & ~3


def parse(blob: bytes) -> DeviceTree:
    """Decode a DTB; raises :class:`FdtError` for anything malformed."""
    if len(blob) < _HEADER_SIZE:
        raise FdtError("Invalid DTB")
    (magic, total, off_struct, off_strings, off_rsv, version, last_comp, boot_cpuid,
     size_strings, size_struct) = struct.unpack_from(_HEADER, blob)
    if magic != MAGIC or total > len(blob):
        raise FdtError("Invalid DTB")
    if version < 17 or last_comp > 17:
        raise FdtError(f"Unsupported DTB version {version}")
    strings = blob[off_strings:off_strings + size_strings]
    structure = blob[off_struct:off_struct + size_struct]
    reservations = _reservations(blob, off_rsv)
    try:
        root, _ = _parse_node(structure, 0, strings, top=True)
    except struct.error:
        raise FdtError("Invalid DTB") from None
    return DeviceTree(root, reservations, boot_cpuid)


def _reservations(blob: bytes, offset: int) -> bytes:
    end = offset
    while True:
        if end + 16 > len(blob):
            raise FdtError("Invalid DTB")
        address, size = struct.unpack_from(">QQ", blob, end)
        end += 16
        if address == 0 and size == 0:
            return blob[offset:end]


def _parse_node(structure: bytes, offset: int, strings: bytes, top: bool = False) -> tuple[Node, int]:
    token = struct.unpack_from(">I", structure, offset)[0]
    while token == _NOP:
        offset += 4
        token = struct.unpack_from(">I", structure, offset)[0]
    if token != _BEGIN_NODE:
        raise FdtError("Invalid DTB")
    name = _cstring(structure, offset + 4)
    offset = _align4(offset + 4 + len(name.encode()) + 1)
    node = Node("" if top else name)
    while True:
        token = struct.unpack_from(">I", structure, offset)[0]
        if token == _PROP:
            length, name_offset = struct.unpack_from(">II", structure, offset + 4)
            node.properties[_cstring(strings, name_offset)] = structure[offset + 12:offset + 12 + length]
            offset = _align4(offset + 12 + length)
        elif token == _BEGIN_NODE:
            child, offset = _parse_node(structure, offset, strings)
            node.children.append(child)
        elif token == _NOP:
            offset += 4
        elif token == _END_NODE:
            return node, offset + 4
        else:
            raise FdtError("Invalid DTB")


def serialize(tree: DeviceTree) -> bytes:
    """Encode ``tree`` as a version-17 DTB (strings deduplicated, in first-use order)."""
    strings = bytearray()
    offsets: dict[str, int] = {}

    def name_offset(name: str) -> int:
        if name not in offsets:
            offsets[name] = len(strings)
            strings.extend(name.encode() + b"\0")
        return offsets[name]

    def node_bytes(node: Node) -> bytes:
        name = node.name.encode() + b"\0"
        out = bytearray(struct.pack(">I", _BEGIN_NODE) + name + b"\0" * (_align4(len(name)) - len(name)))
        for key, value in node.properties.items():
            out += struct.pack(">III", _PROP, len(value), name_offset(key)) + value
            out += b"\0" * (_align4(len(value)) - len(value))
        for child in node.children:
            out += node_bytes(child)
        return bytes(out + struct.pack(">I", _END_NODE))

    structure = node_bytes(tree.root) + struct.pack(">I", _END)
    off_rsv = _HEADER_SIZE
    off_struct = off_rsv + len(tree.reservations)
    off_strings = off_struct + len(structure)
    total = off_strings + len(strings)
    header = struct.pack(_HEADER, MAGIC, total, off_struct, off_strings, off_rsv, 17, 16,
                         tree.boot_cpuid, len(strings), len(structure))
    return header + tree.reservations + structure + bytes(strings)


def u32(*values: int) -> bytes:
    """Big-endian 32-bit cells."""
    return struct.pack(f">{len(values)}I", *values)


def string(text: str) -> bytes:
    """A NUL-terminated string property value."""
    return text.encode() + b"\0"


def inmate_tree(model: str = "Jailhouse cell on QEMU ARM64") -> DeviceTree:
    """A small arm64 guest device tree with ``/chosen`` and ``/memory`` for ``cell linux``.

    It stands in for Jailhouse's ``inmate-qemu-arm64.dtb``; under the QEMU engine the
    guest actually boots with QEMU's own generated tree (see the README).
    """
    root = Node("", {"#address-cells": u32(2), "#size-cells": u32(2), "model": string(model),
                     "compatible": string("linux,dummy-virt"), "interrupt-parent": u32(1)})
    root.children += [
        Node("chosen"),
        Node("memory", {"device_type": string("memory"), "reg": struct.pack(">QQ", 0, 0)}),
        Node("uart@9000000", {"compatible": string("arm,pl011") + string("arm,primecell"),
                              "reg": struct.pack(">QQ", 0x09000000, 0x1000), "status": string("okay")}),
    ]
    return DeviceTree(root)
