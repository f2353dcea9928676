"""The one error type mkzic raises for bad input, and the base the project's helper tools share."""

from __future__ import annotations


class ToolError(Exception):
    """``what`` went wrong and ``fix`` says what to do; the tool prints :meth:`line` and exits 1.

    Defined here, not next to the other helpers, so mkzic is complete on its own when
    installed (as ``runphi_mkzic``); the checkout's other helper tools import it from here.
    """

    #: The tool's name, the first word of the line.
    tool = "tool"

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix

    def line(self) -> str:
        """The single line shown to the user."""
        return f"{self.tool}: {self.what}: {self.fix}"


class MkzicError(ToolError):
    """Bad input or an unwritable output: ``what`` went wrong and ``fix`` says what to do.

    The CLI prints it as a single line and exits 1; nothing half-written is left.
    """

    tool = "mkzic"
