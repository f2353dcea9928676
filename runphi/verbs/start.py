"""``runphi start ID`` for a ZIC: :func:`runphi.core.start.start_zic` (cell started,
monitor released, poststart hooks)."""

from __future__ import annotations

from runphi.core.start import start_zic
from runphi.verbs._common import refuse_shim_owned


def run(args, ctx) -> int:
    """Start a created ZIC; any other status is refused with runc's wording."""
    refuse_shim_owned(ctx, args.container_id, "start")
    start_zic(ctx.node, args.container_id)
    return 0
