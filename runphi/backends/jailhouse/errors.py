"""Errors of the Jailhouse backend's configuration side (formats, platforms, allocation).

Each message is the one user-facing line: what failed, for what, why, what to do.
"""

from runphi.errors import RunphiError


class CellConfigError(RunphiError):
    """A `.cell` cannot be encoded or decoded."""


class PlatformError(RunphiError):
    """A platform template is missing or invalid."""


class AllocationError(RunphiError):
    """Node resources cannot be allocated or released."""
