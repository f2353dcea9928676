"""``runphi state ID``: the OCI state document of a ZIC, with its live status."""

from __future__ import annotations

from runphi.container import oci_state
from runphi.oci import encode_state
from runphi.verbs._common import print_bytes


def run(args, ctx) -> int:
    """Print the state JSON exactly as runc does (2-space indent, no trailing newline)."""
    record = ctx.store.read(args.container_id)
    print_bytes(encode_state(oci_state(record)))
    return 0
