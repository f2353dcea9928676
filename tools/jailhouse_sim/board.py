"""Board description: what the simulated machine and its root cell look like.

Board files are TOML (``boards/<name>.toml`` ships with the simulator; any path
works too). They are decoded once, at the edge, into the frozen structs below.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import msgspec

from .cellfile import ARCH_NAMES, PROFILES, FormatProfile


class Uart(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A PL011; the simulator exposes it as a pty at ``<root>/dev/ttyAMA<index>``."""

    index: int
    address: int
    size: int = 0x1000
    irq: int = 33


class RootCell(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    cpus: list[int]
    ram_start: int
    ram_size: int
    # (bdf, shmem_dev_id) endpoints the root cell's own ivshmem devices hold.
    ivshmem_endpoints: list[tuple[int, int]] = []


class Gic(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    gicd: int
    gicr: int
    pin_base: int = 32


class RamPool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    start: int
    end: int


class Ivshmem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    base: int
    window: int
    pci_domain: int
    vpci_irq_base: int


class CommRegion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    guest_address: int = 0x80000000
    size: int = 0x1000


class Hypervisor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    memory_start: int
    memory_size: int
    mem_pool_pages: int = 1000
    remap_pool_pages: int = 1024
    version: str = "v0.12"


class Board(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A simulated board: CPUs, root cell, GIC, UARTs, pools and config ABI."""

    name: str
    architecture: str
    format: str
    cpus: int
    root: RootCell
    gic: Gic
    cell_ram: RamPool
    hypervisor: Hypervisor
    uarts: list[Uart]
    ivshmem: Ivshmem | None = None
    comm_region: CommRegion = CommRegion()
    rcpus: int = 0
    description: str = ""

    @property
    def profile(self) -> FormatProfile:
        return PROFILES[self.format]

    @property
    def arch_code(self) -> int:
        return ARCH_NAMES[self.architecture]

    def uart_at(self, phys_start: int, size: int) -> Uart | None:
        """The board UART whose MMIO address lies in ``[phys_start, phys_start+size)``."""
        for uart in self.uarts:
            if phys_start <= uart.address < phys_start + size:
                return uart
        return None


class BoardError(Exception):
    """A board file is missing or malformed (message is one line)."""


def _validate(board: Board, source: str) -> Board:
    if board.format not in PROFILES:
        raise BoardError(f"board {source}: unknown format profile {board.format!r} (one of {', '.join(PROFILES)})")
    if board.architecture not in ARCH_NAMES:
        raise BoardError(f"board {source}: unknown architecture {board.architecture!r}")
    bad = [c for c in board.root.cpus if not 0 <= c < board.cpus]
    if bad:
        raise BoardError(f"board {source}: root CPUs {bad} outside 0..{board.cpus - 1}")
    if len({u.index for u in board.uarts}) != len(board.uarts):
        raise BoardError(f"board {source}: duplicate UART index")
    return board


def load_board(name_or_path: str) -> Board:
    """Load a shipped board by name (``sim-qemu-arm64``) or a board TOML by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except OSError as e:
            raise BoardError(f"board file {path}: {e.strerror}") from None
    else:
        shipped = resources.files(__package__) / "boards" / f"{name_or_path}.toml"
        if not shipped.is_file():
            raise BoardError(f"unknown board {name_or_path!r}: no shipped board of that name and no such file")
        text = shipped.read_text()
    try:
        return _validate(msgspec.convert(tomllib.loads(text), Board), name_or_path)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as e:
        raise BoardError(f"board {name_or_path}: {e}") from None


def shipped_boards() -> list[str]:
    """Names of the board files shipped with the simulator."""
    return sorted(p.name.removesuffix(".toml") for p in (resources.files(__package__) / "boards").iterdir()
                  if p.name.endswith(".toml"))
