"""Build the test inmates on demand: ``ensure_built()`` for tests and demos,
``python -m tools.inmates.build [--console hvc]`` from a shell (prints the output directory).

Two builds of the same programs: ``console="pl011"`` (the default, ``out/``) prints on the
PL011; ``console="hvc"`` (``out/hvc/``) prints every byte through Jailhouse's debug-console
hypercall instead, so its output lands in the hypervisor console (``jailhouse console``)."""

from __future__ import annotations

import argparse
import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

INMATES_DIR = Path(__file__).resolve().parent
OUT_DIR = INMATES_DIR / "out"
PROGRAMS = ("hello", "echo", "ticker", "flood", "crash", "reset", "el2probe")
# Where each program's output goes: the build's subdirectory of out/.
CONSOLES = {"pl011": "", "hvc": "hvc"}
# The guest address every inmate is linked at: QEMU virt RAM, and the reset
# address of runPHI's QEMU cells.
LOAD_ADDRESS = 0x7000_0000
# How many pattern bytes `flood` sends (a build-time constant, see flood.c).
FLOOD_BYTES = 65536
FLOOD_PATTERN = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/"
CROSS_COMPILE = "aarch64-linux-gnu-"


class InmateBuildError(RuntimeError):
    """make failed; the message carries the compiler's last lines."""


def missing_tools() -> str | None:
    """Why the inmates cannot be built here, or None when they can."""
    for tool in ("make", f"{CROSS_COMPILE}gcc", f"{CROSS_COMPILE}objcopy"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: apt-get install make gcc-aarch64-linux-gnu)"
    return None


def _console_dir(console: str) -> Path:
    if console not in CONSOLES:
        raise ValueError(f"unknown inmate console {console!r}; known: {', '.join(CONSOLES)}")
    return OUT_DIR / CONSOLES[console]


def ensure_built(console: str = "pl011") -> Path:
    """Return the directory holding ``<program>.bin`` for every program of the ``console``
    build (``pl011``: ``out/``, ``hvc``: ``out/hvc/``), running make first (it rebuilds only
    what is missing or stale). Safe to call from several processes at once. Raises
    InmateBuildError if the build fails."""
    out = _console_dir(console)
    OUT_DIR.mkdir(exist_ok=True)
    argv = ["make", "-s", "-C", str(INMATES_DIR), f"LOAD_ADDRESS={LOAD_ADDRESS:#x}", f"FLOOD_BYTES={FLOOD_BYTES}"]
    if console != "pl011":
        argv.append(f"CONSOLE={console}")
    with open(OUT_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
        raise InmateBuildError(f"building the inmates in {INMATES_DIR} failed (make exit {result.returncode}):\n{tail}")
    return out


def image_path(program: str, console: str = "pl011") -> Path:
    """The raw binary of one program of the ``console`` build, built if needed."""
    if program not in PROGRAMS:
        raise ValueError(f"unknown inmate {program!r}; known: {', '.join(PROGRAMS)}")
    return ensure_built(console) / f"{program}.bin"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.inmates.build", description=__doc__.splitlines()[0])
    parser.add_argument("--console", choices=sorted(CONSOLES), default="pl011",
                        help="pl011 (default, out/) or hvc (the debug-console hypercall, out/hvc/)")
    args = parser.parse_args(argv)
    reason = missing_tools()
    if reason:
        print(f"inmates: cannot build: {reason}", file=sys.stderr)
        return 1
    try:
        print(ensure_built(args.console))
    except InmateBuildError as exc:
        print(f"inmates: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
