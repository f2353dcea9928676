"""``start`` and ``delete``: the shim's bootstrap (shim-v2.md §2, pitfalls 1-5, 15). Lean: no trio; msgspec and the core only where a path needs them.

``start`` (cwd = the bundle):

1. decides with ``runphi create``'s rule (:func:`runphi.forward.is_zic`) whether the
   bundle is a ZIC; a plain container or a CRI sandbox is handed to containerd's
   runc shim by exec'ing ``containerd-shim-runc-v2`` with our argv, environment and
   cwd — it prints its own address and serves the task, runphi costs nothing after;
2. a ZIC's server listens on ``unix://<socket dir>/<sha256>`` of (containerd's
   address, namespace, group, "runphi"), the group being the pod's sandbox id, else
   the container id: distinct from runc's sockets for the same pod;
3. a server already listening there (another ZIC of the pod) is reused; otherwise
   the socket is bound and listening before ``start`` exits and a new server
   (own process group, stdio on /dev/null and the bundle's ``log`` fifo) serves it,
   forked by the warm parent when one runs (:mod:`runphi.shim.launch`);
4. ``<bundle>/address`` is written atomically (containerd 1.6/1.7 read it after a
   restart), a marker tells ``delete`` the bundle is runphi's, and only the address is
   printed: bare for containerd 1.6, as bootstrap JSON for 1.7 and 2.x (:func:`start_output`).

``delete`` (after every task connection closes): for a bundle handed to runc, runc's
shim ``delete`` (decided on the marker alone, before any import that costs); for a
ZIC, the core's forced delete if its record is still there (the server died), the
rootfs unmounted, and exactly one ``DeleteResponse`` printed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from runphi.errors import RunphiError

if TYPE_CHECKING:
    from runphi.shim.main import ShimFlags

RUNC_SHIM = "containerd-shim-runc-v2"
#: Where containerd's shims keep their sockets (runc's shim uses this very directory).
DEFAULT_SOCKET_DIR = "/run/containerd/s"
SOCKET_DIR_ENV = "RUNPHI_SHIM_SOCKET_DIR"
#: Marks a bundle whose task runphi's own server serves.
MARKER_NAME = "runphi-shim.json"
#: The DeleteResponse the server leaves for the ``delete`` that follows its Delete.
DELETE_ANSWER_NAME = "runphi-delete-response.pb"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"


# ---- start ---------------------------------------------------------------------------

def start(flags: ShimFlags) -> int:
    """containerd's ``start`` (module docstring); returns the exit status."""
    bundle = Path.cwd()
    if not _bundle_is_zic(bundle, flags):
        exec_runc_shim(flags)
    address = server_address(flags.address, flags.namespace, _group(bundle, flags.id))
    path = address.removeprefix("unix://")
    listener = _listen_unless_served(path)
    if listener is not None:
        from runphi.shim.launch import ServerSettings, launch_server

        ttrpc_address = os.environ.get("TTRPC_ADDRESS") or f"{flags.address}.ttrpc"
        settings = ServerSettings(namespace=flags.namespace, ttrpc_address=ttrpc_address, socket_path=path,
                                  debug=flags.debug)
        with listener:
            launch_server(settings, listener, bundle / "log", socket_dir())
    from runphi.shim.launch import ShimBundle
    from runphi.store import atomic_write

    atomic_write(bundle / MARKER_NAME, ShimBundle(address=address).encode())
    atomic_write(bundle / "address", address.encode())
    sys.stdout.write(start_output(address, os.environ))
    return 0


def start_output(address: str, env: Mapping[str, str]) -> str:
    """What ``start`` prints for the running containerd (shim-v2.md §2.1, §2.6).

    containerd 1.7 and 2.x announce themselves with ``MAX_SHIM_VERSION`` and read the
    bootstrap JSON (version 2: the ``containerd.task.v2.Task`` service runphi serves);
    1.6 sets no such variable and dials whatever it reads, so it gets the bare address.
    """
    if not env.get("MAX_SHIM_VERSION"):
        return address
    import json

    return json.dumps({"version": 2, "address": address, "protocol": "ttrpc"}, separators=(",", ":"))


def _bundle_is_zic(bundle: Path, flags: ShimFlags) -> bool:
    """``runphi create``'s rule; an image's files are looked at through containerd's snapshot."""
    from runphi.forward import is_zic
    from runphi.shim.mounts import ctr_binary, snapshot_view

    def image_rootfs():
        return snapshot_view(ctr_binary(flags.publish_binary), flags.address, flags.namespace, flags.id)

    return is_zic(bundle, image_rootfs)


def _group(bundle: Path, container_id: str) -> str:
    """The server's grouping key: the pod (CRI sandbox id), else the container itself."""
    from runphi.oci import load_routing_keys

    _, annotations = load_routing_keys(bundle)
    return annotations.get(SANDBOX_ID) or container_id


def server_address(containerd_address: str, namespace: str, group: str) -> str:
    """``unix://`` address of runphi's server for ``group``: short, stable, never runc's."""
    key = os.path.join(containerd_address, namespace, group) + "#runphi"
    return f"unix://{socket_dir()}/{hashlib.sha256(key.encode()).hexdigest()}"


def socket_dir() -> str:
    """Where runphi's shim sockets live (``RUNPHI_SHIM_SOCKET_DIR``, else containerd's)."""
    return os.environ.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR


def _listen_unless_served(path: str) -> socket.socket | None:
    """A listening socket at ``path``, or None when a live server already listens there."""
    from runphi.shim.launch import listen_unless_served

    try:
        return listen_unless_served(path, backlog=64)
    except OSError as exc:
        raise RunphiError(f"cannot listen on shim socket {path}: {exc.strerror}") from None


def exec_runc_shim(flags: ShimFlags) -> NoReturn:
    """Become containerd's runc shim with the identical argv, environment and cwd."""
    binary = runc_shim_binary(flags.publish_binary)
    os.execv(binary, [binary, *sys.argv[1:]])


def runc_shim_binary(publish_binary: str) -> str:
    """``containerd-shim-runc-v2`` as containerd would find it: PATH, then containerd's directory."""
    found = shutil.which(RUNC_SHIM)
    if found:
        return found
    beside = Path(publish_binary).parent / RUNC_SHIM if publish_binary else None
    if beside is not None and beside.exists():
        return str(beside)
    raise RunphiError(f"cannot hand the container to runc: {RUNC_SHIM} is not installed "
                      "(install containerd's runc shim, Debian package containerd)")


# ---- delete --------------------------------------------------------------------------

def delete(flags: ShimFlags) -> int:
    """containerd's ``delete`` (module docstring); returns the exit status."""
    bundle = Path(flags.bundle or os.getcwd())
    if not (bundle / MARKER_NAME).exists():
        exec_runc_shim(flags)
    from runphi.shim.mounts import unmount_all

    unmount_all(bundle / "rootfs")
    try:
        answer = (bundle / DELETE_ANSWER_NAME).read_bytes()  # the server deleted the task itself
    except FileNotFoundError:
        answer = _delete_response(_finish_zic(flags))
    sys.stdout.buffer.write(answer)
    sys.stdout.flush()
    return 0


def leave_delete_answer(bundle: Path, response: bytes) -> None:
    """Called by the server's Delete: the ``delete`` that follows prints these bytes."""
    from runphi.store import atomic_write

    try:
        atomic_write(bundle / DELETE_ANSWER_NAME, response)
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
