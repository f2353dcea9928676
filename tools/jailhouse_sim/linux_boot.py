"""Recognising a ``jailhouse cell linux`` boot in what was loaded into a cell.

The real ``linux-loader.bin`` at the CPU reset address reads ``kernel=0x.. dtb=0x..``
from reset address + 0x1000 and jumps to the kernel with the DTB, which carries the
command line (``/chosen/bootargs``) and the initrd range (``/chosen/linux,initrd-*``).
The simulator does the same reading when the cell starts and hands engines a
:class:`~.engine.LinuxBoot`. Anything the loader could not make
sense of means "not a Linux boot": the images run as they are.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence

from . import fdt
from .cell_linux import LOADER_MAGIC
from .engine import LinuxBoot, LoadedImage

PARAMS_OFFSET = 0x1000
_PARAMS = re.compile(rb"kernel=0x([0-9a-fA-F]+) dtb=0x([0-9a-fA-F]+)")


def read_memory(images: Sequence[LoadedImage], address: int, size: int) -> bytes:
    """The bytes at ``[address, address+size)`` after every load (later loads win; unloaded bytes are 0)."""
    memory = bytearray(size)
    for image in images:
        start = max(address, image.address)
        end = min(address + size, image.address + len(image.data))
        if start < end:
            memory[start - address:end - address] = image.data[start - image.address:end - image.address]
    return bytes(memory)


def _image_at(images: Sequence[LoadedImage], address: int) -> bytes | None:
    """The last image loaded exactly at ``address``, as it now reads in memory."""
    starting = [image for image in images if image.address == address and image.data]
    if not starting:
        return None
    return read_memory(images, address, len(starting[-1].data))


def linux_boot_of(images: Sequence[LoadedImage], reset_address: int) -> LinuxBoot | None:
    """The Linux boot described by the loader, its parameters and the DTB, or None."""
    if read_memory(images, reset_address, len(LOADER_MAGIC)) != LOADER_MAGIC:
        return None
    params = read_memory(images, reset_address + PARAMS_OFFSET, 128).split(b"\0", 1)[0]
    match = _PARAMS.fullmatch(params)
    if match is None:
        return None
    kernel_address, dtb_address = (int(group, 16) for group in match.groups())
    kernel = _image_at(images, kernel_address)
    dtb = _image_at(images, dtb_address)
    if kernel is None or dtb is None:
        return None
    try:
        tree = fdt.parse(dtb)
        address_format = ">Q" if tree.cells("#address-cells") == 2 else ">I"
    except fdt.FdtError:
        return None
    bootargs = tree.get("/chosen", "bootargs") or b""
    return LinuxBoot(kernel=kernel, initrd=_initrd(images, tree, address_format),
                     cmdline=bootargs.split(b"\0", 1)[0].decode(errors="replace"))


def _initrd(images: Sequence[LoadedImage], tree: fdt.DeviceTree, address_format: str) -> bytes | None:
    start, end = tree.get("/chosen", "linux,initrd-start"), tree.get("/chosen", "linux,initrd-end")
    if start is None or end is None:
        return None
    try:
        (first,), (last,) = struct.unpack(address_format, start), struct.unpack(address_format, end)
    except struct.error:
        return None
    loaded = _image_at(images, first)
    if loaded is None or not first < last <= first + len(loaded):
        return None
    return loaded[:last - first]
