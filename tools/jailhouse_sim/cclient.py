"""Building the compiled ``jailhouse`` client (``jailhouse_client.c``) for ``bin/jailhouse``.

The source ships with the package; ``cc`` (Debian: gcc) builds it once per process into
memory, and every root installed afterwards gets a copy: the binary is the same for every
root, it finds its root from its own location.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

COMPILER = "cc"
CFLAGS = ("-std=c99", "-O2")
SOURCE = "jailhouse_client.c"


def source() -> bytes:
    """The client's C source as shipped in this package."""
    return (resources.files(__package__) / SOURCE).read_bytes()


@functools.cache
def compiled_with(compiler: str) -> bytes | None:
    """The client executable ``compiler`` builds (once per process), or None if it fails."""
    with tempfile.TemporaryDirectory(prefix="jailhouse-sim-cc-") as scratch:
        src, out = Path(scratch, SOURCE), Path(scratch, "jailhouse")
        src.write_bytes(source())
        done = subprocess.run([compiler, *CFLAGS, "-o", str(out), str(src)], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=300, check=False)
        return out.read_bytes() if done.returncode == 0 and out.is_file() else None


def client_binary() -> bytes | None:
    """The compiled client, or None when no C compiler (``cc`` on PATH) can build it here."""
    compiler = shutil.which(COMPILER)
    return compiled_with(compiler) if compiler is not None else None
