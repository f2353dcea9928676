"""How the simulator runs its own code in a child process: under the name it was imported as.

The package is ``tools.jailhouse_sim`` in the checkout and ``runphi_jailhouse_sim`` when
installed from the wheel. A child (the daemon, the ``jailhouse cell linux`` helper) runs this
same ``sys.executable`` and must import the same package, whatever its working directory.
"""

from __future__ import annotations

import os
import site
from pathlib import Path

#: This package's import name (``tools.jailhouse_sim`` or ``runphi_jailhouse_sim``).
PACKAGE = __package__


def module(name: str) -> str:
    """The absolute import name of this package's submodule ``name`` (for ``python -m``)."""
    return f"{PACKAGE}.{name}"


def import_root() -> str | None:
    """The directory a child must put on sys.path to import :data:`PACKAGE`.

    None when the child finds the package by itself: installed in site-packages, or mapped
    by an import hook (an editable install), which the same interpreter loads again.
    """
    package_dir = Path(__file__).resolve().parent
    parts = PACKAGE.split(".")
    root = package_dir.parents[len(parts) - 1]
    if root.joinpath(*parts) != package_dir:
        return None
    # Naming site-packages again would put it ahead of the standard library in the child.
    if str(root) in {os.path.realpath(path) for path in site.getsitepackages()}:
        return None
    return str(root)


def child_env() -> dict[str, str]:
    """The environment for a child of this interpreter: this package importable whatever the cwd."""
    env = dict(os.environ)
    root = import_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env
