"""``runphi cell-config`` on Jailhouse: the cell a bundle would get, or a `.cell` decoded.

The preview plans exactly as ``launch`` does (:meth:`JailhouseBackend.planned_cell`),
Linux placement included, but never touches the hypervisor: it uses the node's
ledger read-only and the root cell's CPUs from sysfs when Jailhouse is enabled
here, else assumes the root owns every CPU the platform may give away plus CPU 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runphi.backends.jailhouse.cellconfig import CellConfig, FormatProfile, read_cell, write_cell
from runphi.backends.jailhouse.errors import CellConfigError
from runphi.errors import BundleError

if TYPE_CHECKING:
    from runphi.backends.jailhouse.backend import JailhouseBackend
    from runphi.log import VerbLog


def preview_bundle(backend: JailhouseBackend, bundle: Path, platform_name: str | None, fmt: str,
                   log: VerbLog) -> bytes:
    """The cell config ``create`` would write for the ZIC in ``bundle``, rendered as ``fmt``."""
    from runphi import oci
    from runphi.backends.jailhouse.allocator import request_from
    from runphi.image import load_boot_description

    if platform_name:
        backend.use_platform(platform_name)
    platform = backend.platform
    config = oci.load_config(bundle)
    boot = load_boot_description(config.rootfs(bundle), log)
    container_id = Path(bundle).resolve().name
    root_cpus = None
    if not (Path(backend.jh.sysfs) / "cells" / "0" / "cpus_assigned_list").exists():
        root_cpus = platform.cell_cpu_set | {0}
        log.info("Jailhouse is not enabled here: planning as if the root cell owned all cell CPUs and CPU 0",
                 sysfs=backend.jh.sysfs)
    allocation = backend.allocator().preview(container_id, request_from(config, boot, platform), root_cpus)
    return render(backend.planned_cell(allocation, boot, container_id), platform.profile, fmt, None)


def decode_file(path: Path, fmt: str) -> bytes:
    """The `.cell` at ``path`` (any profile, detected) rendered as ``fmt``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read cell configuration {path}: {exc.strerror}") from None
    try:
        profile, config = read_cell(data)
    except CellConfigError as exc:
        raise CellConfigError(f"{path}: {exc}") from None
    return render(config, profile, fmt, len(data))


def render(config: CellConfig, profile: FormatProfile, fmt: str, size: int | None) -> bytes:
    """``config`` as text, C source or the binary `.cell`."""
    from runphi.backends.jailhouse.cellrender import cell_to_c, describe_cell

    if fmt == "binary":
        return write_cell(config, profile)
    if fmt == "c":
        return cell_to_c(config, profile).encode()
    return describe_cell(config, profile, size).encode()
