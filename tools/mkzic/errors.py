"""The one error type mkzic raises for bad input."""

from __future__ import annotations


class MkzicError(Exception):
    """Bad input or an unwritable output: ``what`` went wrong and ``fix`` says what to do.

    The CLI prints it as a single line and exits 1; nothing half-written is left.
    """

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix

    def line(self) -> str:
        """The single line shown to the user."""
        return f"mkzic: {self.what}: {self.fix}"
