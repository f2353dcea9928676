"""``start`` and ``delete``: the shim's bootstrap (shim-v2.md §2, pitfalls 1-5, 15). Lean: no trio.

``start`` (cwd = the bundle):

1. decides with ``runphi create``'s rule (:func:`runphi.forward.is_zic`) whether the
   bundle is a ZIC; a plain container or a CRI sandbox is handed to containerd's
   runc shim by exec'ing ``containerd-shim-runc-v2`` with our argv, environment and
   cwd — it prints its own address and serves the task, runphi costs nothing after;
2. a ZIC's server listens on ``unix://<socket dir>/<sha256>`` of (containerd's
   address, namespace, group, "runphi"), the group being the pod's sandbox id, else
   the container id: distinct from runc's sockets for the same pod;
3. a server already listening there (another ZIC of the pod) is reused; otherwise
   the socket is bound and listening before ``start`` exits and a forked server
   (own process group, stdio on /dev/null and the bundle's ``log`` fifo) serves it;
4. ``<bundle>/address`` is written atomically (containerd reads it after a restart),
   a marker tells ``delete`` the bundle is runphi's, and only the address is printed.

``delete`` (after every task connection closes): for a bundle handed to runc, runc's
shim ``delete``; for a ZIC, the core's forced delete if its record is still there
(the server died), the rootfs unmounted, and exactly one ``DeleteResponse`` printed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import msgspec

from runphi.errors import RunphiError
from runphi.store import atomic_write

if TYPE_CHECKING:
    from runphi.shim.main import ShimFlags

RUNC_SHIM = "containerd-shim-runc-v2"
#: Where containerd's shims keep their sockets (runc's shim uses this very directory).
DEFAULT_SOCKET_DIR = "/run/containerd/s"
SOCKET_DIR_ENV = "RUNPHI_SHIM_SOCKET_DIR"
#: Marks a bundle whose task runphi's own server serves.
MARKER_NAME = "runphi-shim.json"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"


class ShimBundle(msgspec.Struct, frozen=True):
    """``<bundle>/runphi-shim.json``: this bundle's task is served by runphi's server."""

    address: str


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
        with listener:
            _fork_server(listener, flags, bundle, path)
    atomic_write(bundle / MARKER_NAME, msgspec.json.encode(ShimBundle(address=address)))
    atomic_write(bundle / "address", address.encode())
    sys.stdout.write(address)
    return 0


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
    directory = os.environ.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR
    return f"unix://{directory}/{hashlib.sha256(key.encode()).hexdigest()}"


def _listen_unless_served(path: str) -> socket.socket | None:
    """A listening socket at ``path``, or None when a live server already listens there."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise RunphiError(f"cannot listen on shim socket {path}: {exc.strerror}") from None
        if _answers(path):
            return None
        os.unlink(path)  # left by a server that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.1)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _fork_server(listener: socket.socket, flags: ShimFlags, bundle: Path, path: str) -> None:
    """Fork the server; it owns ``listener`` from here (start's copy is closed by the caller)."""
    if os.fork() != 0:
        return
    code = 1
    try:
        os.setpgid(0, 0)
        _server_stdio(bundle / "log")
        os.chdir("/")  # pin no bundle: a pod's server outlives its first container
        from runphi.shim.server import ServerSettings, run_server

        ttrpc_address = os.environ.get("TTRPC_ADDRESS") or f"{flags.address}.ttrpc"
        run_server(ServerSettings(namespace=flags.namespace, ttrpc_address=ttrpc_address,
                                  socket_path=path, debug=flags.debug), listener.fileno())
        code = 0
    finally:
        os._exit(code)


def _server_stdio(log_fifo: Path) -> None:
    """fds 0 and 1 on /dev/null, 2 on containerd's ``log`` fifo (else /dev/null): containerd
    waits for ``start``'s output to close, so the server must not keep it."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        err = os.open(log_fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(err, True)
    except OSError:
        err = os.dup(null)
    for target, fd in ((0, null), (1, null), (2, err)):
        os.dup2(fd, target)
    os.close(null)
    os.close(err)


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
    exit_status = _finish_zic(flags)
    from runphi.shim.mounts import unmount_all
    from runphi.shim.proto import task_pb2

    unmount_all(bundle / "rootfs")
    response = task_pb2.DeleteResponse(exit_status=exit_status)
    response.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0


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
