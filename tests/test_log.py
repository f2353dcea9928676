"""Log lines: exactly what containerd's shim decodes (oci-runtime.md §6)."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime
from pathlib import Path

import msgspec
import pytest

from runphi.errors import ConfigError
from runphi.log import VerbLog, format_line, get_logger, resolve_level

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


class LogLine(msgspec.Struct):
    """The three keys the shim reads; all must be present with these types."""

    level: str
    msg: str
    time: str


def decode_stream(path: Path) -> list[LogLine]:
    """The whole file as a stream of JSON objects, the way the shim reads it."""
    lines = path.read_bytes().splitlines()
    decoded = [msgspec.json.decode(line, type=LogLine) for line in lines]
    for line in decoded:
        assert RFC3339.match(line.time), line.time
        datetime.fromisoformat(line.time.replace("Z", "+00:00"))
    return decoded


@pytest.fixture
def run_runphi(runphi_bin, state_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPHI_")}
    (tmp_path / "runphi.toml").write_text("")
    env["RUNPHI_CONFIG"] = str(tmp_path / "runphi.toml")

    def call(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(runphi_bin), "--root", str(state_root), *args],
                              capture_output=True, text=True, env={**env, **(extra_env or {})},
                              stdin=subprocess.DEVNULL, timeout=60)

    return call


def test_failing_verb_writes_exactly_one_error_line(run_runphi, make_record, tmp_path):
    make_record("stopped", "running", alive=False)
    log = tmp_path / "log.json"
    result = run_runphi("--log", str(log), "--log-format", "json", "kill", "stopped", "15")
    assert result.returncode == 1
    assert result.stderr == "container not running\n", "the bare message also goes to stderr"
    [line] = decode_stream(log)
    assert (line.level, line.msg) == ("error", "container not running")
    assert oct(os.stat(log).st_mode & 0o777) == oct(0o644)


def test_every_failure_appends_its_own_line_and_the_file_stays_json(run_runphi, make_record,
                                                                    tmp_path):
    make_record("running", "running")
    log = tmp_path / "log.json"
    flags = ("--log", str(log), "--log-format", "json")
    assert run_runphi(*flags, "delete", "running").returncode == 1
    assert run_runphi(*flags, "exec", "running", "sh").returncode == 1
    assert run_runphi(*flags, "frobnicate").returncode == 1
    assert run_runphi(*flags, "state", "running").returncode == 0
    lines = decode_stream(log)
    assert [line.level for line in lines] == ["error"] * 3
    assert "not stopped: running" in lines[0].msg
    assert lines[1].msg.startswith("exec is not supported for partitioned containers")
    assert "unknown command" in lines[2].msg


def test_config_error_is_logged_where_asked(run_runphi, tmp_path):
    log = tmp_path / "log.json"
    result = run_runphi("--log", str(log), "--log-format", "json", "state", "x",
                        extra_env={"RUNPHI_CONFIG": str(tmp_path / "missing.toml")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = decode_stream(log)
    assert "missing.toml" in line.msg and "does not exist" in line.msg


def test_text_format_looks_like_runc(run_runphi, make_record):
    make_record("gone", "running", alive=False)
    result = run_runphi("kill", "gone", "9")
    assert re.fullmatch(r'time="[^"]+" level=error msg="container not running"\n', result.stderr)


def test_debug_level_from_env_goes_through_the_same_format(tmp_path):
    log = tmp_path / "log.json"
    level = resolve_level(False, "info", {"RUNPHI_DEBUG_LEVEL": "trace"})
    verb_log = VerbLog(str(log), "json", level)
    verb_log.trace("tracing", step=1)
    verb_log.debug("debugging", path=Path("/x"))
    verb_log.info("informing")
    verb_log.warn("warning")
    levels = [(line.level, line.msg) for line in decode_stream(log)]
    assert levels == [("trace", "tracing"), ("debug", "debugging"), ("info", "informing"),
                      ("warning", "warning")]
    raw = [msgspec.json.decode(line) for line in log.read_bytes().splitlines()]
    assert raw[0]["step"] == 1 and raw[1]["path"] == "/x"
    assert list(raw[0])[:3] == ["level", "msg", "time"]


def test_default_level_writes_no_debug_lines(tmp_path):
    log = tmp_path / "log.json"
    verb_log = VerbLog(str(log), "json", resolve_level(False, "info", {}))
    verb_log.debug("hidden")
    assert not log.exists(), "nothing is opened until a line is written"


@pytest.mark.parametrize("debug,env,configured,expected", [
    (False, {}, "info", "info"),
    (True, {}, "info", "debug"),
    (True, {"RUNPHI_DEBUG_LEVEL": "trace"}, "info", "trace"),
    (False, {"RUNPHI_DEBUG_LEVEL": "error"}, "debug", "error"),
    (True, {"RUNPHI_DEBUG_LEVEL": "warn"}, "info", "debug"),
])
def test_level_resolution(debug, env, configured, expected):
    assert resolve_level(debug, configured, env) == expected


def test_bad_level_is_a_clear_error():
    with pytest.raises(ConfigError, match="invalid log level 'loud'"):
        resolve_level(False, "info", {"RUNPHI_DEBUG_LEVEL": "loud"})


def test_monitor_logger_writes_bound_json_lines(tmp_path):
    log = tmp_path / "monitor.json"
    logger = get_logger(str(log), "json", "debug", id="zic-1")
    logger.info("cell started", cell="zic-1")
    logger.debug("polled")
    logger.error("cell failed")
    raw = [msgspec.json.decode(line) for line in log.read_bytes().splitlines()]
    assert [(r["level"], r["msg"], r["id"]) for r in raw] == [
        ("info", "cell started", "zic-1"), ("debug", "polled", "zic-1"), ("error", "cell failed", "zic-1")]
    decode_stream(log)


def test_format_line_escapes_and_zones():
    line = format_line("json", "error", 'quote " and\nnewline', {})
    decoded = msgspec.json.decode(line)
    assert decoded["msg"] == 'quote " and\nnewline' and line.endswith(b"\n") and line.count(b"\n") == 1
    text = format_line("text", "error", 'a "b"', {"id": "c 1"}).decode()
    assert re.fullmatch(r'time="\S+Z" level=error msg="a \\"b\\"" id="c 1"\n', text)
