"""The KVM backend: ZICs as pinned QEMU virtual machines (DESIGN §14).

``open_backend(config, warn)`` is what :mod:`runphi.backends.registry` calls; the
backend's modules are imported lazily so that a verb pays only for what it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runphi.backends.base import Backend
    from runphi.config import RuntimeConfig


def open_backend(config: RuntimeConfig, warn: Callable[[str], None]) -> Backend:
    """The configured :class:`~runphi.backends.kvm.backend.KvmBackend` (typed as the protocol,
    so the type checker proves it satisfies ``Backend``)."""
    from runphi.backends.kvm.backend import KvmBackend

    return KvmBackend(config, warn=warn)
