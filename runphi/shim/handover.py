"""Handing a container to containerd's runc shim, and the files runphi leaves in a bundle.

Lean (os and sys at import): ``start`` of a plain container and ``delete`` of a bundle
runc's shim serves get here before anything that costs.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from runphi.errors import RunphiError

RUNC_SHIM = "containerd-shim-runc-v2"
#: Marks a bundle whose task runphi's own server serves (``start`` writes it).
MARKER_NAME = "runphi-shim.json"
#: The DeleteResponse the server leaves for the ``delete`` that follows its Delete.
DELETE_ANSWER_NAME = "runphi-delete-response.pb"


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
