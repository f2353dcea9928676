"""The errors a runphi verb can end with.

Every expected failure is a :class:`RunphiError` whose ``str()`` is the single
user-facing line: what failed, for which container, why and, where useful, what
to do. ``runphi.cli`` turns it into one error log line (and the bare message on
stderr) and exit status 1 — never a traceback.

Some wordings are part of the contract with containerd's shim, which greps the
runtime's output: ``container does not exist`` and ``container not running``
(oci-runtime.md §6.2). Those classes keep runc's exact text.
"""

from __future__ import annotations


class RunphiError(Exception):
    """An expected failure; the message is the one line the user sees."""

    #: Process exit status the CLI uses for this error.
    exit_code: int = 1

    def __init__(self, message: str, *, container_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.container_id = container_id

    def __str__(self) -> str:
        return self.message


class UsageError(RunphiError):
    """The command line is malformed (unknown verb, missing or bad argument)."""


class ConfigError(RunphiError):
    """runphi's own configuration file (runphi.toml) is missing or invalid."""


class BundleError(RunphiError):
    """The OCI bundle (config.json, rootfs) cannot be read or is invalid."""


class InvalidId(RunphiError):
    """A container id is not acceptable (charset, length, path components)."""


class ContainerNotFound(RunphiError):
    """No container with this id; the text is exactly what the shim greps for."""

    def __init__(self, container_id: str | None = None) -> None:
        super().__init__("container does not exist", container_id=container_id)


class ContainerNotRunning(RunphiError):
    """The container is stopped; the text is exactly what the shim greps for."""

    def __init__(self, container_id: str | None = None) -> None:
        super().__init__("container not running", container_id=container_id)


class ContainerExists(RunphiError):
    """create was asked for an id that is already taken (by runphi or runc)."""

    def __init__(self, container_id: str) -> None:
        super().__init__(f"container with id exists: {container_id}", container_id=container_id)


class IllegalTransition(RunphiError):
    """The operation does not apply to the container's current status."""


class StateError(RunphiError):
    """The container's record on disk is unreadable or inconsistent."""


class NotSupported(RunphiError):
    """The verb has no meaning for a partitioned container (exec, pause, ...)."""


class BackendNotConfigured(RunphiError):
    """A ZIC needs a partitioning backend, and none is configured."""


class RuncNotFound(RunphiError):
    """A plain container must go to runc, and no runc binary can be found."""


def for_container(error: RunphiError, what: str, container_id: str) -> RunphiError:
    """``error`` of the same class, its line prefixed with ``what`` and naming the container.

    For errors raised by code that does not know which container it works for
    (the bundle and image readers): ``for_container(exc, "cannot create ZIC", id)``
    reads ``cannot create ZIC <id>: <reason>``. Classes whose text is a fixed
    contract with the shim (``container does not exist``) are returned unchanged.
    """
    if isinstance(error, (ContainerNotFound, ContainerNotRunning, ContainerExists)):
        return error
    wrapped = type(error).__new__(type(error))
    RunphiError.__init__(wrapped, f"{what} {container_id}: {error.message}", container_id=container_id)
    return wrapped


#: Everything msgspec's decoders raise on hostile bytes: DecodeError (a ValueError),
#: UnicodeDecodeError (invalid UTF-8, also a ValueError) and RecursionError (absurd
#: nesting). Catch this at every edge that decodes a file, never DecodeError alone.
MALFORMED_INPUT = (ValueError, RecursionError)
