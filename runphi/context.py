"""What every verb module receives besides its own arguments.

The verb protocol: ``runphi.cli`` parses the command line, builds a
:class:`Context` and calls ``runphi.verbs.<name>.run(args, ctx) -> int``
(``args`` is the argparse namespace of that verb). A verb raises
:class:`runphi.errors.RunphiError` for expected failures; the CLI logs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from runphi.config import RuntimeConfig

if TYPE_CHECKING:
    from runphi.backends.base import Backend
    from runphi.core.node import Node
    from runphi.log import VerbLog
    from runphi.store import Store


class GlobalOptions(msgspec.Struct, frozen=True):
    """runc's global flags, as given before the verb."""

    root: str | None = None
    log: str | None = None
    log_format: Literal["text", "json"] = "text"
    debug: bool = False
    systemd_cgroup: bool = False
    criu: str | None = None
    rootless: str | None = None


class Context:
    """Parsed global options, runphi.toml, the state root and a lazy logger."""

    def __init__(self, options: GlobalOptions, config: RuntimeConfig, argv: list[str],
                 log_level: str) -> None:
        self.options = options
        self.config = config
        #: The original command line after the program name (forwarded to runc verbatim).
        self.argv = argv
        self.log_level = log_level
        self._log: VerbLog | None = None
        self._store: Store | None = None
        self._node: Node | None = None

    @property
    def root(self) -> Path:
        """The state root: ``--root`` made absolute, else ``<state_dir>/default``."""
        if self.options.root:
            return Path(os.path.abspath(self.options.root))
        return Path(self.config.state_dir) / "default"

    @property
    def log(self) -> VerbLog:
        """The verb's logger; opens nothing until a line is written."""
        if self._log is None:
            from runphi.log import VerbLog

            self._log = VerbLog(self.options.log, self.options.log_format, self.log_level)
        return self._log

    @property
    def store(self) -> Store:
        """The container records under :attr:`root`."""
        if self._store is None:
            from runphi.store import Store

            self._store = Store(self.root)
        return self._store

    def backend(self, container_id: str | None = None) -> Backend:
        """The configured partitioning backend (see :mod:`runphi.backends.registry`), warnings to the log."""
        from runphi.backends.registry import open_backend

        return open_backend(self.config, lambda message: self.log.warn(message), container_id)

    @property
    def node(self) -> Node:
        """This node as the core sees it: the store, the backend (opened on demand), the log."""
        if self._node is None:
            from runphi.core.node import Node

            self._node = Node(self.store, self.backend, self.log, self.monitor_log, self.config.state_dir)
        return self._node

    @property
    def monitor_log(self) -> tuple[str, str, str]:
        """(path, format, level) of the runtime log a ZIC's monitor appends its exit line to.

        The path is absolute: the monitor runs in ``/``.
        """
        path = os.path.abspath(self.options.log) if self.options.log else ""
        return path, self.options.log_format, self.log_level
