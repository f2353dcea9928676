"""runphi's own configuration: ``/etc/runphi/runphi.toml``, typed with msgspec.

Every key has a default, so a node without the file works (``backend = "none"``
then: plain containers go to runc, ZICs are refused with a clear error)::

    runc = ""                      # path of the real runc; "" = "runc" on PATH (never runphi)
    state_dir = "/run/runphi"      # node state: resource ledger, shared by all namespaces
    backend = "none"               # "none" | "jailhouse" | "kvm"

    [jailhouse]
    tool = "jailhouse"             # the jailhouse CLI (looked up on PATH when not absolute)
    sysfs = "/sys/devices/jailhouse"
    platform = "qemu-arm64"        # a template name in templates_dir, or a path to a .toml
    templates_dir = ""             # "" = the templates/ shipped with runphi
    poll_interval_ms = 50          # how often a monitor reads its cell's state
    shutdown_timeout_ms = 10000    # graceful shutdown (kill TERM) before the cell is destroyed
    probe_interval_ms = 2000       # how often a monitor checks the hypervisor still answers
    linux_loader = ""              # linux-loader.bin; "" = <prefix>/libexec/jailhouse/ next to the tool
    firmware_dir = "/lib/firmware" # where RPU images are linked for `cell load -r` (Omnivisor)

    [log]
    level = "info"                 # error | warn | info | debug | trace

Environment overrides (tests point runphi at a simulator with these):
``RUNPHI_CONFIG`` (the file; a named file that is missing is an error),
``RUNPHI_STATE_DIR``, ``RUNPHI_RUNC``, ``RUNPHI_BACKEND``, ``RUNPHI_JAILHOUSE``,
``RUNPHI_SYSFS``, ``RUNPHI_PLATFORM``, ``RUNPHI_TEMPLATES``, ``RUNPHI_KVM_HOST``,
``RUNPHI_QEMU``, ``RUNPHI_KVM_ACCEL``. ``RUNPHI_DEBUG_LEVEL``
(read by ``runphi.log``) overrides ``[log] level``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping

import msgspec

from runphi.errors import ConfigError, RuncNotFound

DEFAULT_CONFIG_PATH = "/etc/runphi/runphi.toml"
DEFAULT_STATE_DIR = "/run/runphi"

LogLevel = Literal["error", "warn", "info", "debug", "trace"]
BackendName = Literal["none", "jailhouse", "kvm"]


class JailhouseConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[jailhouse]``: where the hypervisor's tool and sysfs are, which board."""

    tool: str = "jailhouse"
    sysfs: str = "/sys/devices/jailhouse"
    platform: str = "qemu-arm64"
    templates_dir: str = ""
    poll_interval_ms: int = 50
    shutdown_timeout_ms: int = 10000
    probe_interval_ms: int = 2000
    linux_loader: str = ""
    firmware_dir: str = "/lib/firmware"

    def templates_path(self) -> Path:
        """The platform templates directory (configured, else the shipped one)."""
        return Path(self.templates_dir) if self.templates_dir else shipped_templates_dir()

    def platform_path(self) -> Path:
        """The platform file: ``platform`` as a path if it looks like one, else a template."""
        if "/" in self.platform or self.platform.endswith(".toml"):
            return Path(self.platform)
        return self.templates_path() / f"{self.platform}.toml"


class KvmConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[kvm]``: which host template lends CPUs and RAM, which QEMU, which accelerator."""

    host: str = "kvm-host"
    templates_dir: str = ""
    qemu: str = ""
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    poll_interval_ms: int = 50
    shutdown_timeout_ms: int = 10000
    probe_interval_ms: int = 2000

    def host_path(self) -> Path:
        """The host template: ``host`` as a path if it looks like one, else a shipped/configured template."""
        if "/" in self.host or self.host.endswith(".toml"):
            return Path(self.host)
        directory = Path(self.templates_dir) if self.templates_dir else shipped_templates_dir() / "kvm"
        return directory / f"{self.host}.toml"


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[log]``: the default level when neither ``--debug`` nor the env var says otherwise."""

    level: LogLevel = "info"


class RuntimeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole of runphi.toml, after environment overrides."""

    runc: str = ""
    state_dir: str = DEFAULT_STATE_DIR
    backend: BackendName = "none"
    jailhouse: JailhouseConfig = JailhouseConfig()
    kvm: KvmConfig = KvmConfig()
    log: LogConfig = LogConfig()
    #: Which file this came from ("" when the default file was absent).
    source: str = ""

    def runc_path(self) -> str:
        """Absolute path of the real runc; raises :class:`RuncNotFound`.

        ``runc`` from the config when set, else the first ``runc`` on PATH that
        is not this very program (runphi may be installed under the name runc).
        """
        if self.runc:
            if os.access(self.runc, os.X_OK) and not _is_self(self.runc):
                return self.runc
            raise RuncNotFound(f"runc binary {self.runc!r} from {self.source or 'the environment'} "
                               "is not an executable runc (fix `runc =` in runphi.toml)")
        for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
            candidate = os.path.join(directory or ".", "runc")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK) and not _is_self(candidate):
                return os.path.abspath(candidate)
        raise RuncNotFound("plain containers are run by runc, and no runc was found on PATH "
                           "(install runc or set `runc = \"/path/to/runc\"` in runphi.toml)")

    @property
    def config_path_for_messages(self) -> str:
        """The file to point users at in error messages."""
        return self.source or os.environ.get("RUNPHI_CONFIG") or DEFAULT_CONFIG_PATH


def _is_self(path: str) -> bool:
    """Whether ``path`` is the program running now (so forwarding would loop)."""
    import sys

    me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return bool(me) and os.path.realpath(path) == me


def shipped_templates_dir() -> Path:
    """The platform templates shipped with runphi: the directory of the package ``runphi.templates``.

    Installed from a wheel that is ``runphi/templates/`` in site-packages; in an editable
    install it is the checkout's ``templates/``, mapped there by setuptools' import hook. A
    source tree used without installing it (only on PYTHONPATH) has no such package: then it
    is the ``templates/`` next to the ``runphi/`` directory.
    """
    from importlib.util import find_spec

    # find_spec, not importlib.resources.files(): the same directory, without the ~10 ms of
    # imports (tempfile, zipfile, ...) resources costs a verb.
    spec = find_spec("runphi.templates")
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or ():
        if os.path.isdir(location):
            return Path(location)
    return Path(__file__).resolve().parent.parent / "templates"


def _config_file(env: Mapping[str, str]) -> tuple[Path, bool]:
    named = env.get("RUNPHI_CONFIG")
    return (Path(named), True) if named else (Path(DEFAULT_CONFIG_PATH), False)


def _read_toml(path: Path, required: bool) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"configuration file {path} (from RUNPHI_CONFIG) does not exist") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    import tomllib  # only when there is a file: a verb without one stays lean

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


_ENV_OVERRIDES = {
    "RUNPHI_STATE_DIR": ("state_dir",),
    "RUNPHI_RUNC": ("runc",),
    "RUNPHI_BACKEND": ("backend",),
    "RUNPHI_JAILHOUSE": ("jailhouse", "tool"),
    "RUNPHI_SYSFS": ("jailhouse", "sysfs"),
    "RUNPHI_PLATFORM": ("jailhouse", "platform"),
    "RUNPHI_TEMPLATES": ("jailhouse", "templates_dir"),
    "RUNPHI_KVM_HOST": ("kvm", "host"),
    "RUNPHI_QEMU": ("kvm", "qemu"),
    "RUNPHI_KVM_ACCEL": ("kvm", "accel"),
}


def _apply_env(raw: dict, env: Mapping[str, str]) -> dict:
    for var, keys in _ENV_OVERRIDES.items():
        value = env.get(var)
        if not value:
            continue
        table = raw
        for key in keys[:-1]:
            table = table.setdefault(key, {})
        table[keys[-1]] = value
    return raw


def load_runtime_config(env: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Load runphi.toml (``RUNPHI_CONFIG`` or the default path) plus env overrides.

    A missing default file means all defaults; a missing file named by
    ``RUNPHI_CONFIG``, bad TOML or a wrong key/type raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    path, required = _config_file(env)
    raw = _read_toml(path, required)
    source = str(path) if raw or required else ""
    raw = _apply_env(raw, env)
    raw.pop("source", None)
    try:
        config = msgspec.convert(raw, RuntimeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration {path}: {exc}") from None
    return msgspec.structs.replace(config, source=source)
