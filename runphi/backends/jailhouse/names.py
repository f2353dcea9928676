"""Jailhouse cell names for containers (DESIGN §5).

Its own module because both the allocator (claims name their cell) and the planner
need it, and the planner needs the allocator's types: here it ties neither to the other.
"""

from __future__ import annotations

import hashlib

from runphi.backends.jailhouse.cellconfig import NAME_MAX_LEN

#: Hex digits of the id's hash in a shortened name.
NAME_HASH_CHARS = 10


def cell_name(container_id: str) -> str:
    """The Jailhouse cell name for a container: the id if it fits 31 bytes, else a
    deterministic `<prefix>-<hash>` of exactly 31 bytes (never plain truncation)."""
    raw = container_id.encode()
    if len(raw) <= NAME_MAX_LEN:
        return container_id
    digest = hashlib.sha256(raw).hexdigest()[:NAME_HASH_CHARS]
    prefix = raw[: NAME_MAX_LEN - NAME_HASH_CHARS - 1].decode(errors="ignore")
    return f"{prefix}-{digest}"
