"""The one place that maps runphi.toml's ``backend`` to a backend package (DESIGN §1).

Nothing outside ``runphi/backends/<name>/`` imports a backend's modules except
through here (a test walks the imports). Backends are imported lazily, so a verb
that needs none pays nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runphi.errors import BackendNotConfigured

if TYPE_CHECKING:
    from runphi.backends.base import Backend, CellWatch
    from runphi.config import RuntimeConfig


def open_backend(config: RuntimeConfig, warn: Callable[[str], None],
                 container_id: str | None = None) -> Backend:
    """The configured backend (runphi.toml's ``backend``), its warnings going to ``warn``.

    Raises :class:`BackendNotConfigured` when ``backend = "none"`` or the named
    backend's package does not provide ``open_backend(config, warn)``.
    """
    if config.backend == "none":
        raise BackendNotConfigured(
            "no partitioning backend configured "
            f"(set backend = \"jailhouse\" in {config.config_path_for_messages})", container_id=container_id)
    return backend_named(config.backend, config, warn, container_id)


def backend_named(name: str, config: RuntimeConfig, warn: Callable[[str], None],
                  container_id: str | None = None) -> Any:
    """The backend called ``name`` whatever runphi.toml selects (tools about one backend's
    formats, such as ``cell-config`` for Jailhouse, use its own methods beyond the protocol)."""
    module = importlib.import_module(f"runphi.backends.{name}")
    opener = getattr(module, "open_backend", None)
    if opener is None:
        raise BackendNotConfigured(
            f"the {name} backend is not available in this runphi build "
            f"(backend = \"{name}\" in {config.config_path_for_messages})", container_id=container_id)
    return opener(config, warn)


def preload(name: str) -> None:
    """Import backend ``name`` and its cell watch now (a process that forks ZIC owners, such
    as the shim's warm parent, pays the imports once); ImportError for an unknown name."""
    importlib.import_module(f"runphi.backends.{name}")
    importlib.import_module(f"runphi.backends.{name}.watch")


def open_cell_watch(backend: str, backend_config: dict[str, str], cell_name: str,
                    tool_timeout: float, host_fds: tuple[int, ...] = ()) -> CellWatch:
    """The :class:`CellWatch` of an owner's cell, from the backend that launched it (its
    ``watch`` module, imported in the owner after trio); it takes over ``host_fds``."""
    module = importlib.import_module(f"runphi.backends.{backend}.watch")
    return module.open_cell_watch(backend_config, cell_name, tool_timeout, host_fds)
