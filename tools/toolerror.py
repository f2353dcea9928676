"""The error the project's helper tools raise for input a user can fix.

The one definition lives in :mod:`tools.mkzic.errors` (mkzic is installed without the rest of
``tools/``); this name stays for the checkout's other tools.
"""

from __future__ import annotations

from tools.mkzic.errors import ToolError

__all__ = ["ToolError"]
