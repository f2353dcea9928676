"""`runphi cell-config`: show the cell configuration create would generate, or decode a `.cell`.

    runphi cell-config BUNDLE [--platform P] [--format text|c|binary] [-o FILE]
    runphi cell-config --decode FILE [--profile P] [--format text|c|binary] [-o FILE]

A tool about Jailhouse's cell format, so it asks the registry for the Jailhouse
backend whatever runphi.toml selects; the preview is planned exactly as create
plans, and never touches the hypervisor (see runphi.backends.jailhouse.preview).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runphi.backends.registry import backend_named
from runphi.errors import BundleError, UsageError

if TYPE_CHECKING:
    from runphi.context import Context


def run(args, ctx: Context) -> int:
    """Render or decode; the result goes to `args.output` or stdout."""
    if args.decode and args.bundle:
        raise UsageError("cell-config takes either BUNDLE or --decode FILE, not both")
    if args.profile and not args.decode:
        raise UsageError("cell-config --profile names the format of a --decode FILE")
    if not args.decode and not args.bundle:
        raise UsageError("cell-config needs a BUNDLE (or --decode FILE)")
    jailhouse = backend_named("jailhouse", ctx.config, ctx.log.warn)
    fmt = args.format or "text"
    if args.decode:
        data = jailhouse.decode_cell_config(Path(args.decode), fmt, args.profile)
    else:
        data = jailhouse.cell_config_preview(Path(args.bundle), args.platform, fmt, ctx.log)
    emit(data, args.output)
    return 0


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
