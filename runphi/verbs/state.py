"""``runphi state ID``: the OCI state document of a ZIC, with its live status."""

from __future__ import annotations

from runphi.core.state import zic_state
from runphi.oci import encode_state
from runphi.verbs._common import print_bytes


def run(args, ctx) -> int:
    """Print the state JSON exactly as runc does (2-space indent, no trailing newline)."""
    print_bytes(encode_state(zic_state(ctx.node, args.container_id)))
    return 0
