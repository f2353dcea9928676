"""Build small cell configuration binaries for simulator tests.

A deliberately tiny writer (test-only): enough fields to exercise the
simulated driver's checks. The reader under test is ``cellfile.py``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from tools.jailhouse_sim.cellfile import PROFILES

R, W, X, DMA, IO, COMM, LOADABLE, ROOTSHARED = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80
PASSIVE_COMMREG = 0x1
VCONSOLE_PERMITTED = 0x40000000


@dataclass
class Region:
    phys: int
    virt: int
    size: int
    flags: int


@dataclass
class Ivshmem:
    bdf: int
    dev_id: int
    peers: int = 2
    regions_start: int = 0


@dataclass
class Cell:
    name: str
    cpus: set[int]
    regions: list[Region] = field(default_factory=list)
    ivshmem: list[Ivshmem] = field(default_factory=list)
    rcpus: set[int] = field(default_factory=set)
    flags: int = PASSIVE_COMMREG | VCONSOLE_PERMITTED
    reset: int = 0x70000000
    pin_base: int = 32
    gicd: int = 0x08000000
    architecture: int = 2


def runphi_cell(name: str, cpus: set[int], uart: int = 1, ram_phys: int = 0x50000000,
                ram_size: int = 0x100000, **kwargs) -> Cell:
    """A cell laid out like runphi's sim-qemu-arm64 template (UART n at guest 0x09000000)."""
    regions = [
        Region(0x09000000 + uart * 0x1000, 0x09000000, 0x1000, R | W | IO | ROOTSHARED),
        Region(ram_phys, 0, 0x10000, R | W | X | LOADABLE),
        Region(ram_phys + 0x10000, 0x70000000, ram_size, R | W | X | DMA | LOADABLE),
        Region(0, 0x80000000, 0x1000, R | W | COMM),
    ]
    return Cell(name, cpus, regions, **kwargs)


def _bitmap(cpus: set[int]) -> bytes:
    return sum(1 << c for c in cpus).to_bytes(8, "little")


def encode(cell: Cell, profile_name: str = "runphi-fork-rev13") -> bytes:
    profile = PROFILES[profile_name]
    regions = list(cell.regions)
    pci = b""
    for dev in cell.ivshmem:
        start = len(regions)
        regions += [Region(0x7f900000 + i * 0x1000, 0x7f900000 + i * 0x1000, 0x1000, R | ROOTSHARED)
                    for i in range(2 + dev.peers)]
        pci += struct.pack("<BBHH6IHHBBHHQIBBH", 3, 0, 1, dev.bdf, 0xFFFFF000, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                           0, 0, 0, start, dev.dev_id, dev.peers, 1)
    counts = {
        "rcpu_set_size": 8, "num_memory_regions": len(regions), "num_cache_regions": 0, "num_irqchips": 1,
        "num_pio_regions": 0, "num_pci_devices": len(cell.ivshmem), "num_pci_caps": 0, "num_stream_ids": 0,
        "num_qos_devices": 0, "vpci_irq_base": 108,
    }
    name = cell.name.encode()[:32].ljust(32, b"\0")
    head = profile.cell_signature + (bytes([cell.architecture]) if profile.has_architecture else b"")
    header = head + struct.pack("<H32sIII", profile.revision, name, 0, cell.flags, 8)
    header += struct.pack("<" + "I" * len(profile.count_fields), *(counts[f] for f in profile.count_fields))
    header += struct.pack("<QQQIHHIIQ", cell.reset, 0, 0x09000000, 0, 3, 3, 0, 0, 0)
    assert len(header) == profile.header_size
    body = _bitmap(cell.cpus) + (_bitmap(cell.rcpus) if "rcpu_set_size" in profile.count_fields else b"")
    wide = profile.memory_region_size == 40
    for r in regions:
        body += struct.pack("<QQQQ", r.phys, r.virt, r.size, r.flags) + (b"\0" * 8 if wide else b"")
    body += struct.pack("<QII4I", cell.gicd, 0, cell.pin_base, 1 << 1, 0, 0, 0)
    return header + body + pci


def write(tmp: Path, cell: Cell, profile_name: str = "runphi-fork-rev13") -> Path:
    path = tmp / f"{cell.name or 'unnamed'}-{profile_name}.cell"
    path.write_bytes(encode(cell, profile_name))
    return path
