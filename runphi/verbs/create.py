"""``runphi create [--bundle B] [--console-socket S] [--pid-file P] ID``.

1. Plain container (``runphi.forward.is_zic`` says no): ``exec`` the real runc
   with the original argv — nothing of runphi's is left behind.
2. ZIC: the core creates it (:func:`runphi.core.create.create_zic`): id and
   config.json checked, the backend's cell, the monitor, hooks, pid-file,
   ``created`` — or, on any failure, nothing left behind.
"""

from __future__ import annotations

from pathlib import Path

from runphi.core.create import CreateRequest, create_zic, load_zic_config
from runphi.errors import BundleError, for_container
from runphi.forward import exec_runc, is_zic
from runphi.oci import Config


def run(args, ctx) -> int:
    """Create the container (see the module docstring for the two paths)."""
    bundle = Path(args.bundle).absolute()
    if not decide_zic(bundle, args.container_id):
        exec_runc(ctx)
    return create_loaded(args, ctx, bundle, load_zic_config(ctx.node, bundle, args.container_id))


def decide_zic(bundle: Path, container_id: str) -> bool:
    """``is_zic`` with its refusals naming the container."""
    try:
        return is_zic(bundle)
    except BundleError as exc:
        raise for_container(exc, "cannot create container", container_id) from None


def create_loaded(args, ctx, bundle: Path, loaded: tuple[bytes, Config]) -> int:
    """Create the ZIC from config.json already read by ``load_zic_config``; 0 once ``created``."""
    config_bytes, config = loaded
    create_zic(ctx.node, CreateRequest(container_id=args.container_id, bundle=bundle, config=config,
                                       config_bytes=config_bytes, console_socket=args.console_socket or "",
                                       pid_file=args.pid_file or ""))
    return 0
