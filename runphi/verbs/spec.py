"""``runphi spec [--bundle B]``: write an example ZIC ``config.json``.

The example carries ``org.runphi.runtime=runphi`` (so it is a ZIC even before
its rootfs holds a boot description) and the resources a cell is sized from:
a cpuset and a memory limit. Like runc, an existing config.json is not
overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from runphi import OCI_SPEC_VERSION
from runphi.errors import BundleError
from runphi.oci import (RUNTIME_ANNOTATION, Config, CpuResources, Linux, MemoryResources, Process,
                        Resources, Root)


def example_config() -> Config:
    """A minimal ZIC configuration: one dedicated CPU, 64 MiB, a read-only rootfs.

    ``process.args`` is informative only: the guest comes from the image's
    ``/boot/config.json``.
    """
    return Config(
        oci_version=OCI_SPEC_VERSION,
        process=Process(terminal=False, args=["/boot/boot.bin"], env=[], cwd="/"),
        root=Root(path="rootfs", readonly=True),
        hostname="zic",
        annotations={RUNTIME_ANNOTATION: "runphi"},
        linux=Linux(resources=Resources(cpu=CpuResources(cpus="1"),
                                        memory=MemoryResources(limit=64 * 1024 * 1024))),
    )


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None and v != []}
    return value


def run(args, ctx) -> int:
    """Write ``<bundle>/config.json`` unless one exists."""
    path = Path(args.bundle) / "config.json"
    document = _without_nulls(msgspec.to_builtins(example_config()))
    data = msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        raise BundleError(f"File {path} exists. Remove it first.") from None
    except OSError as exc:
        raise BundleError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return 0
