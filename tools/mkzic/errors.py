"""The one error type mkzic raises for bad input."""

from __future__ import annotations

from tools.toolerror import ToolError


class MkzicError(ToolError):
    """Bad input or an unwritable output: ``what`` went wrong and ``fix`` says what to do.

    The CLI prints it as a single line and exits 1; nothing half-written is left.
    """

    tool = "mkzic"
