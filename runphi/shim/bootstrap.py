"""``start``: the shim's bootstrap (shim-v2.md §2, pitfalls 1-4, 15), run in the bundle.

Lean: no trio; msgspec and the core only where a path needs them.

1. decides with ``runphi create``'s rule (:func:`runphi.forward.is_zic`) whether the
   bundle is a ZIC; a plain container or a CRI sandbox is handed to containerd's
   runc shim by exec'ing ``containerd-shim-runc-v2`` with our argv, environment and
   cwd — it prints its own address and serves the task, runphi costs nothing after;
2. a ZIC's server listens on ``unix://<socket dir>/<sha256>`` of (containerd's
   address, namespace, group, "runphi"), the group being the pod's sandbox id, else
   the container id: distinct from runc's sockets for the same pod;
3. a server already listening there (another ZIC of the pod) is reused; otherwise
   the socket is bound and listening before ``start`` exits and a new server
   (own process group, stdio on /dev/null and the bundle's ``log`` fifo) serves it;
   all of this happens in a child of the warm parent when one runs
   (:mod:`runphi.shim.launch`), else in ``start`` itself;
4. ``<bundle>/address`` is written atomically (containerd 1.6/1.7 read it after a
   restart), a marker tells ``delete`` the bundle is runphi's, and only the address is
   printed: bare for containerd 1.6, as bootstrap JSON for 1.7 and 2.x (:func:`start_output`).

``delete`` is :mod:`runphi.shim.cleanup`.
"""

from __future__ import annotations

import os
import sys

from runphi.errors import RunphiError
from runphi.shim.handover import MARKER_NAME, exec_runc_shim

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (every start pays it)
if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping
    from pathlib import Path

    from runphi.shim.main import ShimFlags

#: Where containerd's shims keep their sockets (runc's shim uses this very directory).
DEFAULT_SOCKET_DIR = "/run/containerd/s"
SOCKET_DIR_ENV = "RUNPHI_SHIM_SOCKET_DIR"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"


# ---- start ---------------------------------------------------------------------------

def start(flags: ShimFlags) -> int:
    """containerd's ``start`` (module docstring); returns the exit status.

    Asks the warm parent first (it decides and starts the server with runphi already
    imported); without one, does the same here.
    """
    from runphi.shim.handover import ask_warm_parent, warm_socket

    answer = ask_warm_parent(socket_dir(), sys.argv[1:], os.getcwd())
    if answer is None:
        from runphi.shim.launch import start_warm_parent

        start_warm_parent(warm_socket(socket_dir()))  # for the next start
        answer = decide(flags, os.getcwd())
    kind, text = answer
    if kind == "runc":
        exec_runc_shim(flags.publish_binary)
    if kind == "error":
        raise RunphiError(text)
    sys.stdout.write(start_output(text, os.environ))
    return 0


def decide(flags: ShimFlags, bundle_dir: str) -> tuple[str, str]:
    """("runc", "") when runc's shim is to serve the bundle, else ("address", A) once runphi's
    server listens at A for it (steps 2-4 of the module docstring)."""
    from pathlib import Path

    bundle = Path(bundle_dir)
    if not _bundle_is_zic(bundle, flags):
        return "runc", ""
    address = server_address(flags.address, flags.namespace, _group(bundle, flags.id))
    path = address.removeprefix("unix://")
    listener = _listen_unless_served(path)
    if listener is not None:
        with listener:
            _serve(flags, listener, path, bundle / "log")
    from runphi.shim.launch import ShimBundle
    from runphi.files import atomic_write

    atomic_write(bundle / MARKER_NAME, ShimBundle(address=address).encode())
    atomic_write(bundle / "address", address.encode())
    return "address", address


def _serve(flags: ShimFlags, listener: socket.socket, path: str, log_fifo: Path) -> None:
    """Fork a new server serving ``listener``."""
    from runphi.shim.launch import ServerSettings, fork_server, open_log

    ttrpc_address = os.environ.get("TTRPC_ADDRESS") or f"{flags.address}.ttrpc"
    settings = ServerSettings(namespace=flags.namespace, ttrpc_address=ttrpc_address, socket_path=path,
                              debug=flags.debug)
    log_fd = open_log(log_fifo)
    try:
        fork_server(settings, listener.fileno(), log_fd)
    finally:
        if log_fd >= 0:
            os.close(log_fd)


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

    def image_rootfs():
        from runphi.shim.mounts import ctr_binary, snapshot_view

        return snapshot_view(ctr_binary(flags.publish_binary), flags.address, flags.namespace, flags.id)

    return is_zic(bundle, image_rootfs)


def _group(bundle: Path, container_id: str) -> str:
    """The server's grouping key: the pod (CRI sandbox id), else the container itself."""
    from runphi.oci import load_routing_keys

    _, annotations = load_routing_keys(bundle)
    return annotations.get(SANDBOX_ID) or container_id


def server_address(containerd_address: str, namespace: str, group: str) -> str:
    """``unix://`` address of runphi's server for ``group``: short, stable, never runc's."""
    import hashlib

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
