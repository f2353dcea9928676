"""``runphi delete [--force] ID`` for a ZIC: :func:`runphi.core.delete.delete_zic`.

Unknown ids never get here (the CLI forwards them to runc, which answers
``container does not exist``, exit 0 with ``--force``).
"""

from __future__ import annotations

from runphi.core.delete import delete_zic
from runphi.verbs._common import refuse_shim_owned


def run(args, ctx) -> int:
    """Delete the container; the id is free again afterwards."""
    refuse_shim_owned(ctx, args.container_id, "delete", unless_gone=True)
    delete_zic(ctx.node, args.container_id, force=args.force)
    return 0
