"""``delete``: what containerd runs after every task connection closed (shim-v2.md §2.4).

Idempotent and per container. For a bundle runc's shim serves: runc's shim ``delete``
(decided on runphi's marker alone, before any import that costs). For a ZIC: the
rootfs unmounted if still mounted; the ``DeleteResponse`` the server's Delete left,
or, when the server died first, the core's forced delete of the ZIC (cell destroyed,
resources released, record removed) and a response with its exit status (137 when
unknown). stdout carries exactly one protobuf ``DeleteResponse``.
"""

from __future__ import annotations

import os
import sys
import time

from runphi.shim.handover import DELETE_ANSWER_NAME, exec_runc_shim, served_by_runphi

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (every delete pays it)
if TYPE_CHECKING:
    from runphi.shim.main import ShimFlags


def delete(flags: ShimFlags) -> int:
    """containerd's ``delete`` (module docstring); returns the exit status."""
    bundle = flags.bundle or os.getcwd()
    if not served_by_runphi(bundle):
        exec_runc_shim(flags.publish_binary)
    rootfs = os.path.join(bundle, "rootfs")
    if os.path.ismount(rootfs):
        import pathlib

        from runphi.shim.mounts import unmount_all

        unmount_all(pathlib.Path(rootfs))
    try:
        with open(os.path.join(bundle, DELETE_ANSWER_NAME), "rb") as left:
            answer = left.read()  # the server deleted the task itself
    except FileNotFoundError:
        answer = _delete_response(_finish_zic(flags))
    sys.stdout.buffer.write(answer)
    sys.stdout.flush()
    return 0


def leave_delete_answer(bundle: str, response: bytes) -> None:
    """Called by the server's Delete: the ``delete`` that follows prints these bytes."""
    import pathlib

    from runphi.files import atomic_write

    try:
        atomic_write(pathlib.Path(bundle, DELETE_ANSWER_NAME), response)
    except OSError:
        pass  # then `delete` finds no record and answers on its own


def _delete_response(exit_status: int) -> bytes:
    from runphi.shim.proto import task_pb2

    response = task_pb2.DeleteResponse(exit_status=exit_status)
    response.exited_at.FromNanoseconds(time.time_ns())
    return response.SerializeToString()


def _finish_zic(flags: ShimFlags) -> int:
    """Delete the ZIC if its server did not (the server died); its exit status (137 if unknown)."""
    from runphi.core.delete import delete_zic
    from runphi.shim.node import shim_node

    node = shim_node(flags.namespace)
    if not node.store.holds(flags.id):
        return 137
    record = node.store.read(flags.id)
    delete_zic(node, flags.id, force=True)
    code = record.cell.exit_code
    return 137 if code is None else code
