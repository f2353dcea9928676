"""The simulator's EL2 layer for the QEMU engine (see ``el2.S``): build it, patch it for a cell.

The layer is a small position-independent aarch64 program that QEMU starts at EL2
(``-M virt,virtualization=on``) in front of a raw-image cell. It puts the cell at
EL1 like Jailhouse does and answers the cell's hypercalls: the debug-console putc
goes out through ARM semihosting (``SYS_WRITEC``) to a chardev the engine reads,
PSCI is forwarded to QEMU's built-in PSCI (SMC conduit).

It is built from source on first use with the aarch64 cross toolchain
(``make -C tools/jailhouse_sim/el2``), like the test inmates, under a file lock so
that several processes may ask at once; the output is ``el2/out/el2.bin`` (or, where
the package directory is not writable, ``$XDG_CACHE_HOME/jailhouse-sim/el2``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
from pathlib import Path

EL2_DIR = Path(__file__).resolve().parent
CROSS_COMPILE = "aarch64-linux-gnu-"

# The header el2.S starts with: a branch, then the words the engine patches.
ENTRY_OFFSET = 8  # u64: where the cell's first CPU starts at EL1 (its reset address)
FLAGS_OFFSET = 16  # u64: bit 0 = the cell may use the debug console (VIRTUAL_CONSOLE_PERMITTED)
MAGIC_OFFSET = 24
MAGIC = b"RPHI-EL2"
FLAG_CONSOLE_PERMITTED = 1

# How the layer ends QEMU on a trap it does not handle (semihosting SYS_EXIT):
# exit status 0x80 | forbidden << 6 | ESR_EL2.EC.
TRAP_EXIT_BASE = 0x80
TRAP_EXIT_FORBIDDEN = 0x40


class El2BuildError(RuntimeError):
    """The layer cannot be built here (one line: why, what to install)."""


def missing_tools() -> str | None:
    """Why the layer cannot be built here, or None when it can."""
    if not (EL2_DIR / "el2.S").is_file():
        return f"{EL2_DIR / 'el2.S'} is not installed"
    for tool in ("make", f"{CROSS_COMPILE}gcc", f"{CROSS_COMPILE}objcopy"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: apt-get install make gcc-aarch64-linux-gnu)"
    return None


def _out_dir() -> Path:
    out = EL2_DIR / "out"
    if os.access(EL2_DIR, os.W_OK) or os.access(out, os.W_OK):
        return out
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "jailhouse-sim" / "el2"


def ensure_built() -> Path:
    """Return the path of ``el2.bin``, running make first (it rebuilds only when stale).

    Raises El2BuildError when the toolchain is missing or the build fails."""
    reason = missing_tools()
    if reason:
        raise El2BuildError(f"cannot build the EL2 layer: {reason}")
    out = _out_dir()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(["make", "-s", "-C", str(EL2_DIR), f"OUT={out}"], capture_output=True, text=True)
    if result.returncode != 0:
        tail = " / ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise El2BuildError(f"building the EL2 layer in {EL2_DIR} failed (make exit {result.returncode}): {tail}")
    return out / "el2.bin"


def patched(image: bytes, *, entry: int, console_permitted: bool) -> bytes:
    """The layer image for one cell: its entry address and console permission filled in."""
    if image[MAGIC_OFFSET : MAGIC_OFFSET + len(MAGIC)] != MAGIC:
        raise ValueError("not the simulator's EL2 layer (magic missing)")
    data = bytearray(image)
    struct.pack_into("<QQ", data, ENTRY_OFFSET, entry, FLAG_CONSOLE_PERMITTED if console_permitted else 0)
    return bytes(data)


def trap_of_exit_status(status: int) -> tuple[int, bool] | None:
    """(exception class, forbidden) when QEMU's exit status is the layer's fatal-trap exit, else None."""
    if TRAP_EXIT_BASE <= status < 0x100:
        return status & 0x3F, bool(status & TRAP_EXIT_FORBIDDEN)
    return None
