"""msgspec models of the OCI runtime-spec documents runphi reads and writes.

* :class:`Config` — the subset of a bundle's ``config.json`` runphi uses. Unknown
  keys are ignored (a real config has far more); a known key with the wrong type
  is an error naming the JSON path. Load it with :func:`load_config`.
* :class:`State` — the state document printed by ``state`` and ``list``, encoded
  exactly like runc 1.1.5 (oci-runtime.md §3.1): fixed key order, ``pid`` 0 when
  stopped, ``annotations`` omitted when empty, ``owner`` always present,
  ``state`` output 2-space indented without a trailing newline.
* :class:`HookState` — the state document written to a hook's stdin (§7.3).

Lean: verb processes import this module, so msgspec and the stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import msgspec

from runphi.errors import MALFORMED_INPUT, BundleError
from runphi.files import FileTooLarge, NotRegularFile, read_regular_file

#: Statuses of the state document. runc adds ``paused``; ZICs never pause.
Status = Literal["creating", "created", "running", "stopped", "paused"]

#: The annotation that forces the ZIC/plain decision (DESIGN §7).
RUNTIME_ANNOTATION = "org.runphi.runtime"


class ConsoleSize(msgspec.Struct, frozen=True):
    """Initial terminal size for ``process.terminal`` (runc applies it to the pty)."""

    height: int = 0
    width: int = 0


class Process(msgspec.Struct, frozen=True, rename="camel"):
    """``process``: what to run (for a ZIC: the terminal wish and the arguments)."""

    terminal: bool = False
    console_size: ConsoleSize | None = None
    args: list[str] = []
    env: list[str] = []
    cwd: str = "/"


class Root(msgspec.Struct, frozen=True):
    """``root``: the rootfs, possibly relative to the bundle."""

    path: str = "rootfs"
    readonly: bool = False


class Hook(msgspec.Struct, frozen=True):
    """One hook entry: absolute ``path``, ``args`` incl. argv[0], ``env``, ``timeout`` s."""

    path: str
    args: list[str] = []
    env: list[str] | None = None
    timeout: int | None = None


class Hooks(msgspec.Struct, frozen=True, rename="camel"):
    """``hooks``: every kind the runtime-spec defines, in lifecycle order."""

    prestart: list[Hook] = []
    create_runtime: list[Hook] = []
    create_container: list[Hook] = []
    start_container: list[Hook] = []
    poststart: list[Hook] = []
    poststop: list[Hook] = []


class CpuResources(msgspec.Struct, frozen=True, omit_defaults=True):
    """``linux.resources.cpu``: explicit cpuset and/or a quota/period share.

    Read by create, written by mkzic (fields in the order mkzic writes them; unset ones omitted).
    """

    quota: int | None = None
    period: int | None = None
    cpus: str | None = None
    shares: int | None = None


class MemoryResources(msgspec.Struct, frozen=True, omit_defaults=True):
    """``linux.resources.memory``: the limit in bytes (a ZIC's RAM size)."""

    limit: int | None = None


class Resources(msgspec.Struct, frozen=True, omit_defaults=True):
    """``linux.resources`` subset (read by create, written by mkzic)."""

    cpu: CpuResources | None = None
    memory: MemoryResources | None = None


class Namespace(msgspec.Struct, frozen=True):
    """``linux.namespaces[]`` entry."""

    type: str
    path: str | None = None


class Linux(msgspec.Struct, frozen=True, rename="camel"):
    """``linux`` subset."""

    resources: Resources | None = None
    namespaces: list[Namespace] = []
    cgroups_path: str | None = None


class Config(msgspec.Struct, frozen=True, rename="camel"):
    """The subset of an OCI ``config.json`` that runphi reads."""

    oci_version: str
    process: Process | None = None
    root: Root | None = None
    annotations: dict[str, str] = {}
    hooks: Hooks | None = None
    linux: Linux | None = None
    hostname: str | None = None

    def rootfs(self, bundle: Path) -> Path:
        """Absolute rootfs path: ``root.path`` resolved against the bundle."""
        path = Path(self.root.path if self.root else "rootfs")
        return path if path.is_absolute() else Path(bundle).absolute() / path


class _RoutingConfig(msgspec.Struct, frozen=True):
    """The two keys the ZIC/plain decision needs, decoded leniently."""

    root: Root | None = None
    annotations: dict[str, str] = {}


class State(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """The OCI state document in runc's key order and encoding rules."""

    oci_version: str
    id: str
    pid: int
    status: Status
    bundle: str
    rootfs: str
    created: str
    annotations: dict[str, str] | None = None
    owner: str


class HookState(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """The state document on a hook's stdin (runc: ``pid`` omitted when 0)."""

    oci_version: str
    id: str
    status: Status
    pid: int = 0
    bundle: str
    annotations: dict[str, str] | None = None


_config_decoder = msgspec.json.Decoder(Config)
_routing_decoder = msgspec.json.Decoder(_RoutingConfig)


#: No real config.json comes near this; anything bigger is refused before it is read.
MAX_CONFIG_SIZE = 16 << 20


def _read_config_bytes(bundle: Path) -> bytes:
    """The bytes of ``<bundle>/config.json``: a regular file of at most MAX_CONFIG_SIZE.

    Opened non-blocking and checked with fstat before reading, so a FIFO or a
    device planted there can neither hang the verb nor feed it endless bytes.
    """
    path = Path(bundle) / "config.json"
    try:
        return read_regular_file(path, MAX_CONFIG_SIZE)
    except FileNotFoundError:
        raise BundleError(f"cannot read {path}: no such file (is {bundle} an OCI bundle?)") from None
    except NotRegularFile:
        raise BundleError(f"cannot read {path}: not a regular file") from None
    except FileTooLarge as exc:
        raise BundleError(f"cannot read {path}: too large ({exc})") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None


def config_present(bundle: Path) -> bool:
    """Whether ``<bundle>/config.json`` exists at all (a dangling link counts as present)."""
    return os.path.lexists(Path(bundle) / "config.json")


def load_config(bundle: Path) -> Config:
    """Read and validate ``<bundle>/config.json``.

    Raises :class:`BundleError` naming the file and, for a type mismatch, the
    JSON path of the offending key.
    """
    return read_config(bundle)[1]


def read_config(bundle: Path) -> tuple[bytes, Config]:
    """``load_config`` that also returns the file's exact bytes (for a faithful copy)."""
    data = _read_config_bytes(bundle)
    try:
        return data, _config_decoder.decode(data)
    except MALFORMED_INPUT as exc:
        raise BundleError(f"invalid {Path(bundle) / 'config.json'}: {exc}") from None


def load_routing_keys(bundle: Path) -> tuple[Root | None, dict[str, str]]:
    """``root`` and ``annotations`` of config.json, for the ZIC/plain decision only."""
    data = _read_config_bytes(bundle)
    try:
        cfg = _routing_decoder.decode(data)
    except MALFORMED_INPUT as exc:
        raise BundleError(f"invalid {Path(bundle) / 'config.json'}: {exc}") from None
    return cfg.root, cfg.annotations


def encode_state(state: State) -> bytes:
    """``state`` output: 2-space indented JSON, no trailing newline (runc's bytes)."""
    return msgspec.json.format(msgspec.json.encode(state), indent=2)


def encode_state_list(states: list[State]) -> bytes:
    """``list --format json`` output: one line, ``null`` when empty (like runc)."""
    return msgspec.json.encode(states or None)


def encode_hook_state(state: HookState) -> bytes:
    """A hook's stdin: compact JSON without trailing newline."""
    return msgspec.json.encode(state)
