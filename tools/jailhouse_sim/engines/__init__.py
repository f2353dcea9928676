"""Guest engine registry.

``script`` is built in; ``qemu`` is imported lazily (it needs QEMU and is owned
by its own module). Whatever the default engine, an image carrying the script
magic always runs under the script engine, so tests can mix both kinds of guest.
"""

from __future__ import annotations

from ..engine import GuestEngine

ENGINE_NAMES = ("script", "qemu")


class EngineUnavailable(Exception):
    """An engine cannot be used on this machine (message is one line)."""


def load_engine(name: str) -> GuestEngine:
    """Instantiate the engine called ``name``; raises EngineUnavailable with the reason."""
    if name == "script":
        from .script import ScriptEngine

        return ScriptEngine()
    if name == "qemu":
        try:
            from .qemu import QemuEngine
        except ImportError as e:
            raise EngineUnavailable(f'engine "qemu" is not available: {e}') from None
        return QemuEngine()
    raise EngineUnavailable(f'unknown engine "{name}" (choose one of: {", ".join(ENGINE_NAMES)})')
