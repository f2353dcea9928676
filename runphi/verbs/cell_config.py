"""`runphi cell-config`: show the cell configuration create would generate, or decode a `.cell`.

    runphi cell-config BUNDLE [--platform P] [--format text|c|binary] [-o FILE]
    runphi cell-config --decode FILE [--format text|c|binary] [-o FILE]

Never touches the hypervisor: the plan uses the node's ledger (read only) and the
root cell's CPUs from sysfs when Jailhouse is enabled here, else assumes the root
owns every CPU the platform may give away plus CPU 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runphi.errors import BundleError, UsageError

if TYPE_CHECKING:
    from runphi.backends.jailhouse.cellconfig import CellConfig, FormatProfile
    from runphi.context import Context


def run(args, ctx: Context) -> int:
    """Render or decode; the result goes to `args.output` or stdout."""
    if args.decode and args.bundle:
        raise UsageError("cell-config takes either BUNDLE or --decode FILE, not both")
    if not args.decode and not args.bundle:
        raise UsageError("cell-config needs a BUNDLE (or --decode FILE)")
    if args.decode:
        profile, config, size = decode_file(Path(args.decode))
    else:
        profile, config = plan_bundle(Path(args.bundle), args.platform, ctx)
        size = None
    emit(render(config, profile, args.format or "text", size), args.output)
    return 0


def decode_file(path: Path) -> tuple[FormatProfile, CellConfig, int]:
    """Profile, config and size of the `.cell` at `path`."""
    from runphi.backends.jailhouse.cellconfig import read_cell
    from runphi.backends.jailhouse.errors import CellConfigError

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read cell configuration {path}: {exc.strerror}") from None
    try:
        profile, config = read_cell(data)
    except CellConfigError as exc:
        raise CellConfigError(f"{path}: {exc}") from None
    return profile, config, len(data)


def plan_bundle(bundle: Path, platform_name: str | None, ctx: Context) -> tuple[FormatProfile, CellConfig]:
    """The cell config `create` would generate for the ZIC in `bundle`."""
    from runphi import oci
    from runphi.backends.jailhouse.allocator import Allocator, request_from
    from runphi.backends.jailhouse.plan import plan_cell
    from runphi.backends.jailhouse.platform import load_platform
    from runphi.image import load_boot_description

    jh = ctx.config.jailhouse
    platform = load_platform(platform_name or jh.platform, jh.templates_path())
    config = oci.load_config(bundle)
    boot = load_boot_description(config.rootfs(bundle), ctx.log)
    request = request_from(config, boot, platform)
    container_id = Path(bundle).resolve().name
    allocator = Allocator(platform, Path(ctx.config.state_dir), Path(jh.sysfs))
    root_file = Path(jh.sysfs) / "cells" / "0" / "cpus_assigned_list"
    root_cpus = None
    if not root_file.exists():
        root_cpus = platform.cell_cpu_set | {0}
        ctx.log.info("Jailhouse is not enabled here: planning as if the root cell owned all cell CPUs and CPU 0",
                     sysfs=jh.sysfs)
    allocation = allocator.preview(container_id, request, root_cpus)
    return platform.profile, plan_cell(platform, allocation, boot, container_id)


def render(config: CellConfig, profile: FormatProfile, fmt: str, size: int | None) -> bytes:
    """`config` as text, C source or the binary `.cell`."""
    from runphi.backends.jailhouse.cellconfig import write_cell
    from runphi.backends.jailhouse.cellrender import cell_to_c, describe_cell

    if fmt == "binary":
        return write_cell(config, profile)
    if fmt == "c":
        return cell_to_c(config, profile).encode()
    return describe_cell(config, profile, size).encode()


def emit(data: bytes, output: str | None) -> None:
    """Write `data` to `output` (a file) or stdout."""
    if output:
        try:
            Path(output).write_bytes(data)
        except OSError as exc:
            raise BundleError(f"cannot write {output}: {exc.strerror}") from None
        return
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
