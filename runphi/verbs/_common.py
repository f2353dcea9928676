"""Small pieces shared by the verbs (front-end side only; the ZIC operations are in runphi.core)."""

from __future__ import annotations


def print_bytes(data: bytes) -> None:
    """Write ``data`` to stdout as is (no newline added), flushed."""
    import sys

    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def refuse_shim_owned(ctx, container_id: str, verb: str, *, unless_gone: bool = False) -> None:
    """Refuse ``verb`` on a ZIC runphi's containerd shim serves: containerd must see what
    happens to its tasks, so only ``ctr``/the CRI act on it. ``unless_gone``: allowed once
    the shim has died (cleaning up what it left)."""
    from runphi.container import SHIM_OWNER, monitor_alive
    from runphi.errors import IllegalTransition

    store = ctx.store
    if not store.holds(container_id):
        return
    record = store.read(container_id)
    if record.owner != SHIM_OWNER or (unless_gone and not monitor_alive(record)):
        return
    raise IllegalTransition(
        f"cannot {verb} container {container_id}: containerd serves it through runphi's shim "
        f"(io.containerd.runphi.v2); use `ctr task {verb} {container_id}` (or the CRI) instead",
        container_id=container_id)
