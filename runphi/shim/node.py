"""The node as the shim sees it: runphi's configuration, the records of one containerd namespace.

Both front ends share the node: the same ``runphi.toml`` (and ``RUNPHI_*`` overrides),
the same backend and resource ledger under ``state_dir``. The shim keeps a
namespace's records under ``<state_dir>/<namespace>``, so ``runphi --root
<state_dir>/<namespace> list`` (``default`` needs no ``--root``) shows its ZICs.
"""

from __future__ import annotations

from pathlib import Path

from runphi.config import load_runtime_config
from runphi.core.node import Node
from runphi.log import VerbLog
from runphi.store import Store


def shim_root(state_dir: str, namespace: str) -> Path:
    """Where the shim keeps the container records of containerd namespace ``namespace``."""
    return Path(state_dir) / (namespace or "default")


def shim_node(namespace: str, debug: bool = False) -> Node:
    """The node for ``namespace``; log lines go to stderr (the bundle's ``log`` fifo: containerd's log)."""
    from runphi.backends.registry import open_backend

    config = load_runtime_config()
    log = VerbLog(None, "text", "debug" if debug else "info")
    store = Store(shim_root(config.state_dir, namespace))
    return Node(store, lambda container_id: open_backend(config, lambda line: log.warn(line), container_id),
                log, state_dir=config.state_dir)
