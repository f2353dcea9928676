"""``runphi start ID`` for a ZIC: :func:`runphi.core.start.start_zic` (cell started,
monitor released, poststart hooks)."""

from __future__ import annotations

from runphi.core.start import start_zic


def run(args, ctx) -> int:
    """Start a created ZIC; any other status is refused with runc's wording."""
    start_zic(ctx.node, args.container_id)
    return 0
