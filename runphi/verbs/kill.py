"""``runphi kill [--all] ID [SIG]`` for a ZIC: :func:`runphi.core.kill.kill_zic`.

TERM, INT, HUP and QUIT shut the cell down gracefully (exit 128+SIG); KILL
destroys it (137); other signals are refused. Stopped containers: ``container
not running`` (exit 1) — the shim's wording — except with ``--all``.
"""

from __future__ import annotations

from runphi.core.kill import kill_zic
from runphi.verbs._common import refuse_shim_owned


def run(args, ctx) -> int:
    """Deliver the signal as a cell shutdown."""
    refuse_shim_owned(ctx, args.container_id, "kill")
    kill_zic(ctx.node, args.container_id, args.signal, all_=args.all)
    return 0
