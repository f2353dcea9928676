"""Log lines in the formats containerd's shim and runc users expect.

Format (oci-runtime.md §6.1), one line per record, appended to ``--log`` (opened
``O_APPEND|O_CREAT|O_SYNC``, mode 0644; stderr when no ``--log``):

* json: ``{"level":"error","msg":"...","time":"2026-11-28T14:00:10.123456Z"}``
  followed by any context keys; ``time`` is RFC 3339 with a zone, always present,
  so the shim's decoder can read the whole file as a stream of JSON objects.
* text: ``time="..." level=error msg="..." key=value`` like runc's logrus.

Level: ``RUNPHI_DEBUG_LEVEL`` (error|warn|info|debug|trace), else ``[log] level``
from runphi.toml; ``--debug`` raises it to at least debug.

Cost: verb processes must stay lean, so :class:`VerbLog` formats and writes
error/warn/info lines itself with msgspec and the stdlib. structlog is imported
only when a debug/trace line is actually written, and always by the long-lived
monitor through :func:`get_logger`; both paths share :func:`format_line`, so a
file never mixes formats.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO, cast

import msgspec

from runphi.errors import ConfigError, RunphiError

LEVELS = ("error", "warn", "info", "debug", "trace")
_RANK = {name: rank for rank, name in enumerate(LEVELS)}
# logrus spells warn as "warning"; the shim only cares about "error".
_WIRE_NAME = {"warn": "warning"}
LOG_FORMATS = ("text", "json")


def rfc3339_now() -> str:
    """Current UTC time, RFC 3339 with microseconds and a ``Z`` zone."""
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def rfc3339_nano(ns: int) -> str:
    """``ns`` since the epoch as Go's RFC3339Nano in UTC (runc's ``created``).

    Like Go, trailing zeros of the fraction are dropped (and the dot with them).
    """
    seconds, frac = divmod(ns, 1_000_000_000)
    fraction = f".{frac:09d}".rstrip("0").rstrip(".")
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + fraction + "Z"


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    if text and all(c.isalnum() or c in "-._/:@+" for c in text):
        return text
    return msgspec.json.encode(text).decode()


def format_line(fmt: str, level: str, msg: str, context: Mapping[str, Any]) -> bytes:
    """One complete log line (with newline) in ``fmt`` ("json" or "text")."""
    wire_level = _WIRE_NAME.get(level, level)
    stamp = rfc3339_now()
    if fmt == "json":
        record = {"level": wire_level, "msg": msg, "time": stamp}
        for key, value in context.items():
            if key not in record:
                record[key] = value
        return msgspec.json.encode(record, enc_hook=str) + b"\n"
    parts = [f'time="{stamp}"', f"level={wire_level}", f"msg={msgspec.json.encode(msg).decode()}"]
    parts += [f"{key}={_text_value(value)}" for key, value in context.items()]
    return (" ".join(parts) + "\n").encode()


def resolve_level(debug: bool, configured: str, env: dict[str, str] | os._Environ = os.environ) -> str:
    """The effective level: env ``RUNPHI_DEBUG_LEVEL``, else configured; ``--debug`` ≥ debug."""
    level = env.get("RUNPHI_DEBUG_LEVEL") or configured
    if level == "warning":
        level = "warn"
    if level not in _RANK:
        raise ConfigError(f"invalid log level {level!r} (RUNPHI_DEBUG_LEVEL or [log] level): "
                          f"use one of {', '.join(LEVELS)}")
    if debug and _RANK[level] < _RANK["debug"]:
        level = "debug"
    return level


class LogSink:
    """Where lines go: the ``--log`` file (opened on first write) or stderr."""

    def __init__(self, path: str | None) -> None:
        self.path = path or None
        self._fd: int | None = None

    @property
    def is_stderr(self) -> bool:
        return self.path is None or self.path in ("/dev/stderr", "/proc/self/fd/2")

    def fileno(self) -> int:
        """The fd to write to; opens ``--log`` append-only on first use."""
        if self.is_stderr or self.path is None:
            return 2
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_SYNC | os.O_CLOEXEC
            try:
                self._fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                raise ConfigError(f"cannot open log file {self.path}: {exc.strerror}") from None
        return self._fd

    def write(self, line: bytes) -> None:
        """Append one whole line with a single write (atomic for O_APPEND)."""
        os.write(self.fileno(), line)


class VerbLog:
    """The logger of a short-lived verb process. Cheap until a line is written."""

    def __init__(self, path: str | None, fmt: str, level: str) -> None:
        self.sink = LogSink(path)
        self.fmt = fmt
        self.level = level
        self._structlog = None

    def enabled(self, level: str) -> bool:
        """Whether a line at ``level`` would be written."""
        return _RANK[level] <= _RANK[self.level]

    def _emit(self, level: str, msg: str, context: dict[str, Any]) -> None:
        if self.enabled(level):
            self.sink.write(format_line(self.fmt, level, msg, context))

    def error(self, msg: str, **context: Any) -> None:
        self._emit("error", msg, context)

    def warn(self, msg: str, **context: Any) -> None:
        self._emit("warn", msg, context)

    def info(self, msg: str, **context: Any) -> None:
        self._emit("info", msg, context)

    def debug(self, msg: str, **context: Any) -> None:
        if self.enabled("debug"):
            self._structured().msg(msg, _level="debug", **context)

    def trace(self, msg: str, **context: Any) -> None:
        if self.enabled("trace"):
            self._structured().msg(msg, _level="trace", **context)

    def _structured(self):
        if self._structlog is None:
            self._structlog = _structlog_logger(self.sink, self.fmt, "trace")
        return self._structlog

    def fatal(self, error: RunphiError) -> None:
        """Report the error that ends this verb: one error line, plus stderr like runc."""
        context = {"id": error.container_id} if error.container_id and self.fmt == "json" else {}
        try:
            self.error(error.message, **context)
        except RunphiError as log_failure:
            sys.stderr.write(f"runphi: {log_failure}\n")
        if not self.sink.is_stderr:
            sys.stderr.write(error.message + "\n")
            sys.stderr.flush()


class _SinkFile:
    """File-like adapter for structlog's WriteLogger: one os.write per line."""

    def __init__(self, sink: LogSink) -> None:
        self.sink = sink

    def write(self, text: str) -> None:
        if text:
            self.sink.write(text.encode())

    def flush(self) -> None:
        pass


def _structlog_logger(sink: LogSink, fmt: str, level: str, **bind: Any):
    import structlog

    def render(_logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        line_level = event.pop("_level", None) or ("warn" if method == "warning" else method)
        msg = str(event.pop("event", ""))
        return format_line(fmt, line_level, msg, event).decode().rstrip("\n")

    numeric = {"error": 40, "warn": 30, "info": 20, "debug": 10, "trace": 10}[level]
    return structlog.wrap_logger(
        # WriteLogger is annotated TextIO but uses only write() and flush().
        structlog.WriteLogger(cast(TextIO, _SinkFile(sink))),
        processors=[render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    ).bind(**bind)


def get_logger(path: str | None, fmt: str = "json", level: str = "info", **bind: Any):
    """A structlog logger for the long-lived monitor, writing :func:`format_line` lines.

    ``path`` None means stderr. Bound keys (e.g. ``id=``) appear on every line.
    """
    return _structlog_logger(LogSink(path), fmt, level, **bind)
