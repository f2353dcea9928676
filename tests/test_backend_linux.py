"""Linux guest placement and device-tree patching (runphi.backends.jailhouse.linux)."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runphi.backends.jailhouse import cellconfig as cc
from runphi.backends.jailhouse.linux import (LinuxGuestError, encode_fdt, parse_fdt, patch_device_tree,
                                             place_linux)
from tools.linux_guest.testing import virt_dtb_or_skip

RAM = cc.MEM_READ | cc.MEM_WRITE | cc.MEM_EXECUTE | cc.MEM_DMA | cc.MEM_LOADABLE
LOW = cc.MEM_READ | cc.MEM_WRITE | cc.MEM_EXECUTE | cc.MEM_LOADABLE
MiB = 1 << 20


def cell(*regions: cc.MemoryRegion) -> cc.CellConfig:
    return cc.CellConfig(name="lin", flags=0, cpus=frozenset({1}), memory_regions=regions,
                         cpu_reset_address=0, console=cc.Console())


QEMU_CELL = cell(
    cc.MemoryRegion(phys_start=0x09001000, virt_start=0x09000000, size=0x1000,
                    flags=cc.MEM_READ | cc.MEM_WRITE | cc.MEM_IO | cc.MEM_ROOTSHARED),
    cc.MemoryRegion(phys_start=0x50000000, virt_start=0, size=0x10000, flags=LOW),
    cc.MemoryRegion(phys_start=0x50010000, virt_start=0x70000000, size=64 * MiB, flags=RAM),
    cc.MemoryRegion(phys_start=0, virt_start=0x80000000, size=0x1000,
                    flags=cc.MEM_READ | cc.MEM_WRITE | cc.MEM_COMM_REGION),
)


def arm64_image(size: int, text_offset: int) -> bytes:
    header = bytearray(64)
    struct.pack_into("<Q", header, 8, text_offset)
    header[56:60] = b"ARM\x64"
    return bytes(header) + bytes(size - 64)


@pytest.fixture(scope="module")
def virt_dtb(tmp_path_factory) -> bytes:
    return virt_dtb_or_skip(tmp_path_factory.mktemp("dtb") / "virt.dtb")


def test_placement_follows_jailhouse_cell_linux():
    kernel = arm64_image(3 * MiB, 0x80000)
    placed = place_linux(QEMU_CELL, loader_address=0, kernel=kernel, dtb_size=0x2000, initrd_size=0x5000)
    assert placed.dtb == 0x70000000  # RAM start (not 0, so no +0x2000)
    assert placed.kernel == 0x70200000 + 0x80000  # 2 MiB aligned after the DTB, plus text offset
    assert placed.initrd == placed.kernel + len(kernel)
    assert placed.params == f"kernel={placed.kernel:#x} dtb=0x70000000"
    assert placed.params_address == 0x1000


def test_ram_at_guest_zero_keeps_room_for_the_loader():
    flat = cell(cc.MemoryRegion(phys_start=0x40000000, virt_start=0, size=128 * MiB, flags=RAM))
    placed = place_linux(flat, loader_address=0, kernel=arm64_image(MiB, 0), dtb_size=0x1000, initrd_size=None)
    assert placed.dtb == 0x2000 and placed.kernel == 0x200000 and placed.initrd is None


def test_too_little_ram_is_one_clear_error():
    with pytest.raises(LinuxGuestError, match="more memory"):
        place_linux(QEMU_CELL, loader_address=0, kernel=arm64_image(80 * MiB, 0), dtb_size=0x2000, initrd_size=None)


def test_real_dtb_round_trips_and_is_patched(virt_dtb):
    assert encode_fdt(parse_fdt(encode_fdt(parse_fdt(virt_dtb)))) == encode_fdt(parse_fdt(virt_dtb))
    placed = place_linux(QEMU_CELL, loader_address=0, kernel=arm64_image(MiB, 0), dtb_size=len(virt_dtb),
                         initrd_size=0x3000)
    patched = parse_fdt(patch_device_tree(virt_dtb, QEMU_CELL, placed, cmdline="console=ttyAMA0",
                                          initrd_size=0x3000))
    root = patched.root
    memory = root.child("memory")
    # 2 address cells, 2 size cells on virt: only the DMA-capable main RAM is listed.
    assert memory.props["reg"] == struct.pack(">IIII", 0, 0x70000000, 0, 64 * MiB)
    chosen = root.child("chosen")
    assert chosen.props["bootargs"] == b"console=ttyAMA0\0"
    assert struct.unpack(">Q", chosen.props["linux,initrd-start"])[0] == placed.initrd
    assert struct.unpack(">Q", chosen.props["linux,initrd-end"])[0] == placed.initrd + 0x3000
    if shutil.which("dtc"):
        subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-o", "/dev/null", "-"],
                       input=patch_device_tree(virt_dtb, QEMU_CELL, placed, cmdline="", initrd_size=None),
                       check=True, capture_output=True)


def test_garbage_is_not_a_device_tree():
    with pytest.raises(LinuxGuestError):
        parse_fdt(b"\0" * 64)


@given(st.dictionaries(st.text(alphabet="abcdefgh,-#", min_size=1, max_size=8), st.binary(max_size=20),
                       max_size=6))
def test_properties_survive_encoding(props):
    from runphi.backends.jailhouse.linux import Fdt, FdtNode

    root = FdtNode("")
    node = root.child("node@1", create=True)
    node.props.update(props)
    decoded = parse_fdt(encode_fdt(Fdt(boot_cpuid=0, reservations=[(0x1000, 0x2000)], root=root)))
    assert decoded.root.child("node").props == props
    assert decoded.reservations == [(0x1000, 0x2000)]
