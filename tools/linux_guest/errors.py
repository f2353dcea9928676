"""The one error type the Linux guest helper raises."""

from __future__ import annotations


class LinuxGuestError(Exception):
    """Fetching or building the guest failed: ``what`` went wrong, ``fix`` says what to do.

    The CLI prints it as one line and exits 1; the cache is never left half-written.
    """

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix

    def line(self) -> str:
        """The single line shown to the user."""
        return f"linux_guest: {self.what}: {self.fix}"
