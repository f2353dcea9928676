"""The one error type the Linux guest helper raises."""

from __future__ import annotations

from tools.mkzic.errors import ToolError


class LinuxGuestError(ToolError):
    """Fetching or building the guest failed: ``what`` went wrong, ``fix`` says what to do.

    The CLI prints it as one line and exits 1; the cache is never left half-written.
    """

    tool = "linux_guest"
