"""The Jailhouse backend: platform model, allocator, `.cell` writer/reader, driver.

``open_backend(config, warn)`` is what :mod:`runphi.backends.registry` calls; it
imports the backend lazily so that importing a submodule (e.g. the `.cell`
reader) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runphi.backends.base import Backend
    from runphi.config import RuntimeConfig


def open_backend(config: RuntimeConfig, warn: Callable[[str], None]) -> Backend:
    """The configured :class:`~runphi.backends.jailhouse.backend.JailhouseBackend`
    (typed as the protocol, so the type checker proves it satisfies ``Backend``)."""
    from runphi.backends.jailhouse.backend import JailhouseBackend

    return JailhouseBackend(config, warn=warn)
