"""A ZIC as an OCI runtime bundle: ``config.json`` + ``rootfs/boot/...``.

``runphi create --bundle DIR`` (or ``ctr run --rootfs DIR/rootfs``) takes it as
is. The process args name the inmate: OCI and containerd require a process,
runphi never runs it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import msgspec

from runphi.oci import CpuResources, MemoryResources
from runphi.oci import Resources as OciResources

from . import oci
from .errors import MkzicError
from .zic import ZicContents

CPU_PERIOD_US = 100_000
MIB = 1024 * 1024
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
NAMESPACES = ("pid", "network", "ipc", "uts", "mount")


class Resources(msgspec.Struct, frozen=True, omit_defaults=True):
    """Container resource limits for ``linux.resources`` (what a pod's limits become).

    ``cpus`` is a CPU count (quota/period, may be fractional), ``cpuset`` a
    kernel CPU list (``2-3``), ``memory_mib`` a memory limit in MiB.
    """

    cpus: float | None = None
    cpuset: str | None = None
    memory_mib: int | None = None


def linux_resources(resources: Resources) -> OciResources | None:
    """Translate limits to OCI ``linux.resources`` exactly as a kubelet's CRI request would."""
    cpu = None
    if resources.cpus is not None or resources.cpuset is not None:
        quota = None if resources.cpus is None else math.ceil(resources.cpus * CPU_PERIOD_US)
        cpu = CpuResources(
            quota=quota,
            period=None if quota is None else CPU_PERIOD_US,
            cpus=resources.cpuset,
        )
    memory = None if resources.memory_mib is None else MemoryResources(limit=resources.memory_mib * MIB)
    if cpu is None and memory is None:
        return None
    return OciResources(cpu=cpu, memory=memory)


def runtime_spec(
    zic: ZicContents,
    *,
    hostname: str,
    resources: Resources = Resources(),
    annotations: dict[str, str] | None = None,
    terminal: bool = False,
) -> oci.RuntimeSpec:
    """The bundle's ``config.json`` for ``zic``: root ``rootfs`` (read-only), the inmate as process."""
    return oci.RuntimeSpec(
        ociVersion=oci.OCI_RUNTIME_VERSION,
        process=oci.Process(terminal=terminal, args=list(zic.process_args), env=list(DEFAULT_ENV)),
        root=oci.Root(path="rootfs"),
        hostname=hostname,
        annotations=dict(sorted((annotations or {}).items())),
        linux=oci.Linux(
            namespaces=[oci.Namespace(type=kind) for kind in NAMESPACES],
            resources=linux_resources(resources),
        ),
    )


def _populate(directory: Path, zic: ZicContents, spec: oci.RuntimeSpec) -> None:
    (directory / "config.json").write_bytes(msgspec.json.format(msgspec.json.encode(spec), indent=2) + b"\n")
    rootfs = directory / "rootfs"
    for image_path, data in zic.files.items():
        target = rootfs / image_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def write_bundle(directory: Path, zic: ZicContents, spec: oci.RuntimeSpec) -> Path:
    """Create the bundle at ``directory`` (which must not exist) atomically.

    The bundle is built in a hidden sibling and renamed into place, so either
    the whole bundle exists afterwards or nothing does. Returns the directory.
    """
    directory = directory.absolute()
    if directory.exists() or directory.is_symlink():
        raise MkzicError(f"bundle directory {directory} already exists", "remove it or choose another --bundle path")
    parent = directory.parent
    if not parent.is_dir():
        raise MkzicError(f"cannot create bundle {directory}: {parent} is not a directory", "create the parent first")
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))
    try:
        os.chmod(staging, 0o755)
        _populate(staging, zic, spec)
        os.rename(staging, directory)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise MkzicError(f"cannot write bundle {directory}: {exc.strerror}", "check the path and free space") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
