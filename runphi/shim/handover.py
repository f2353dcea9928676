"""The lean half of ``start`` and ``delete``: asking the warm parent, handing a container to
containerd's runc shim, and the files runphi leaves in a bundle.

Lean (os and sys at import; socket, json and hashlib when asked): ``start`` and
``delete`` get here before anything that costs. With a warm parent running
(:mod:`runphi.shim.warm`), ``start`` only sends it its argv and cwd: the warm parent
decides and, for a ZIC, starts the server, all with runphi already imported.
"""

from __future__ import annotations

import os
import sys

from runphi.errors import RunphiError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (every start pays it)
if TYPE_CHECKING:
    from typing import NoReturn

RUNC_SHIM = "containerd-shim-runc-v2"
#: Marks a bundle whose task runphi's own server serves (``start`` writes it).
MARKER_NAME = "runphi-shim.json"
#: The DeleteResponse the server leaves for the ``delete`` that follows its Delete.
DELETE_ANSWER_NAME = "runphi-delete-response.pb"


#: How long ``start`` waits for the warm parent's decision (an image may be probed).
DECIDE_TIMEOUT = 30.0


def warm_socket(socket_dir: str, env: dict[str, str] | None = None) -> str:
    """The warm parent's socket for this installation and environment (the name hashes
    the interpreter, runphi's location and version, and every environment variable)."""
    import hashlib

    import runphi

    env = dict(os.environ) if env is None else env
    identity = "\0".join([sys.executable, runphi.__file__, runphi.__version__,
                          *sorted(f"{k}={v}" for k, v in env.items())])
    return os.path.join(socket_dir, f"runphi-warm-{hashlib.sha256(identity.encode()).hexdigest()[:24]}")


def ask_warm_parent(socket_dir: str, argv: list[str], cwd: str) -> tuple[str, str] | None:
    """The warm parent's answer to ``start`` with ``argv`` in ``cwd``: ("runc", "") — hand the
    container to runc's shim —, ("address", A) — runphi's server listens at A —, or
    ("error", line); None when no warm parent answered (then ``start`` does it all itself)."""
    import json
    import socket

    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    client.settimeout(DECIDE_TIMEOUT)
    try:
        client.connect(warm_socket(socket_dir))
        client.sendall(json.dumps({"type": "start", "argv": argv, "cwd": cwd}).encode())
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    except OSError:
        return None
    finally:
        client.close()
    kind, _, text = reply.decode(errors="replace").partition(" ")
    return (kind, text) if kind in ("runc", "address", "error") else None


def served_by_runphi(bundle: str) -> bool:
    """Whether runphi's own server serves the task of ``bundle`` (else runc's shim does)."""
    return os.path.exists(os.path.join(bundle, MARKER_NAME))


def exec_runc_shim(publish_binary: str) -> NoReturn:
    """Become containerd's runc shim with the identical argv, environment and cwd."""
    binary = runc_shim_binary(publish_binary)
    os.execv(binary, [binary, *sys.argv[1:]])


def runc_shim_binary(publish_binary: str) -> str:
    """``containerd-shim-runc-v2`` as containerd would find it: PATH, then containerd's directory."""
    import shutil

    found = shutil.which(RUNC_SHIM)
    if found:
        return found
    beside = os.path.join(os.path.dirname(publish_binary), RUNC_SHIM) if publish_binary else ""
    if beside and os.access(beside, os.X_OK):
        return beside
    raise RunphiError(f"cannot hand the container to runc: {RUNC_SHIM} is not installed "
                      "(install containerd's runc shim, Debian package containerd)")
