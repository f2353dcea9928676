"""Errors of the Jailhouse backend's configuration side (formats, platforms).

Each message is the one user-facing line: what failed, for what, why, what to do.
Allocation errors are the node ledger's (`runphi.backends.ledger.AllocationError`).
"""

from runphi.errors import RunphiError


class CellConfigError(RunphiError):
    """A `.cell` cannot be encoded or decoded."""


class PlatformError(RunphiError):
    """A platform template is missing or invalid."""
