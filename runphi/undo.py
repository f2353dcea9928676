"""Undo steps of a multi-step operation, run in reverse when it fails (lean: stdlib only)."""

from __future__ import annotations

from collections.abc import Callable

from runphi.errors import RunphiError


class UndoStack:
    """Undo actions run last-in first-out; each one's failure is collected, not raised."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, action: Callable[[], object]) -> None:
        self._actions.append((what, action))

    def unwind(self) -> list[str]:
        """Run every action in reverse order; return what failed, one phrase each."""
        problems = []
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except (OSError, RunphiError) as exc:
                problems.append(f"{what}: {exc}")
        return problems

    def discard(self) -> None:
        """Forget every action: the operation succeeded."""
        self._actions.clear()
