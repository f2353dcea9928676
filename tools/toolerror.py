"""The error the project's helper tools raise for input a user can fix."""

from __future__ import annotations


class ToolError(Exception):
    """``what`` went wrong and ``fix`` says what to do; the tool prints :meth:`line` and exits 1."""

    #: The tool's name, the first word of the line.
    tool = "tool"

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix

    def line(self) -> str:
        """The single line shown to the user."""
        return f"{self.tool}: {self.what}: {self.fix}"
