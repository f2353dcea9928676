"""runphi's command line: runc's syntax, and the ZIC verbs against real records."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from runphi.cli import parse, parse_signal
from runphi.errors import InvalidId, UsageError

RUNC = shutil.which("runc")


@pytest.fixture
def runphi(runphi_bin, state_root, tmp_path):
    """Run the installed runphi with ``--root <state_root>`` and a private config."""
    config = tmp_path / "runphi.toml"
    config.write_text(f'state_dir = "{tmp_path / "node"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPHI_")}
    env["RUNPHI_CONFIG"] = str(config)

    def call(*args: str, root: bool = True, extra_env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
        argv = [str(runphi_bin), *(["--root", str(state_root)] if root else []), *args]
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={**env, **(extra_env or {})}, cwd=cwd or tmp_path, timeout=60)

    return call


# --- parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("argv,verb,expected", [
    (["--root", "/r", "state", "c1"], "state", {"container_id": "c1"}),
    (["--root=/r", "state", "c1"], "state", {"container_id": "c1"}),
    (["-root", "/r", "state", "c1"], "state", {"container_id": "c1"}),
    (["kill", "c1"], "kill", {"signal": 15, "all": False}),
    (["kill", "c1", "9"], "kill", {"signal": 9}),
    (["kill", "c1", "KILL"], "kill", {"signal": 9}),
    (["kill", "c1", "SIGTERM"], "kill", {"signal": 15}),
    (["kill", "c1", "term"], "kill", {"signal": 15}),
    (["kill", "--all", "c1", "9"], "kill", {"signal": 9, "all": True}),
    (["kill", "-a", "c1", "SIGKILL"], "kill", {"signal": 9, "all": True}),
    (["delete", "--force", "c1"], "delete", {"force": True}),
    (["delete", "-f", "c1"], "delete", {"force": True}),
    (["create", "--bundle", "/b", "--pid-file", "/b/init.pid", "c1"], "create",
     {"bundle": "/b", "pid_file": "/b/init.pid", "console_socket": None}),
    (["create", "-b", "/b", "--console-socket=/tmp/p/pty.sock", "c1"], "create",
     {"bundle": "/b", "console_socket": "/tmp/p/pty.sock"}),
    (["create", "--bundle=/b", "--no-pivot", "--no-new-keyring", "c1"], "create",
     {"no_pivot": True, "no_new_keyring": True}),
    (["list", "--format=json"], "list", {"format": "json"}),
    (["list", "-f", "json", "-q"], "list", {"format": "json", "quiet": True}),
    (["ps", "--format", "json", "c1"], "ps", {"format": "json", "ps_args": []}),
    (["ps", "c1", "-ef"], "ps", {"ps_args": ["-ef"]}),
    (["events", "--interval=5s", "c1"], "events", {"interval": "5s", "stats": False}),
    (["events", "--stats", "c1"], "events", {"stats": True}),
    (["exec", "--process", "/tmp/p.json", "--detach", "--pid-file", "/b/e.pid", "c1"], "exec",
     {"process": "/tmp/p.json", "detach": True}),
    (["exec", "-t", "c1", "sh", "-c", "echo hi"], "exec", {"tty": True, "command": ["sh", "-c", "echo hi"]}),
    (["restore", "--image-path", "/i", "--work-path", "/w", "--detach", "--pid-file", "/b/init.pid",
      "-no-subreaper", "--bundle", "/b", "c1"], "restore", {"no_subreaper": True, "image_path": "/i"}),
    (["update", "--resources", "-", "c1"], "update", {"resources": "-"}),
    (["run", "-d", "--keep", "-b", "/b", "c1"], "run", {"detach": True, "keep": True}),
    (["spec", "--bundle", "/b"], "spec", {"bundle": "/b"}),
    (["cell-config", "/b", "--platform", "zcu102", "--format", "c", "-o", "x.c"], "cell-config",
     {"bundle": "/b", "platform": "zcu102", "format": "c", "output": "x.c", "decode": None}),
    (["cell-config", "--decode", "x.cell"], "cell-config", {"bundle": None, "decode": "x.cell"}),
    (["logs", "-f", "c1"], "logs", {"follow": True, "container_id": "c1"}),
    (["features"], "features", {}),
])
def test_parse_table(argv, verb, expected):
    options, args = parse(argv)
    assert args.verb == verb
    for key, value in expected.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize("argv", [
    ["--log", "/x/log.json", "--log-format", "json", "--debug", "--systemd-cgroup", "state", "c"],
    ["--log=/x/log.json", "--log-format=json", "--criu", "/c", "--rootless", "true", "state", "c"],
    ["-log", "/x/log.json", "-log-format", "json", "--rootless=auto", "state", "c"],
])
def test_global_flags_both_forms(argv):
    options, args = parse(argv)
    assert (options.log, options.log_format, args.container_id) == ("/x/log.json", "json", "c")


@pytest.mark.parametrize("argv,message", [
    (["frobnicate", "c1"], "unknown command 'frobnicate'"),
    (["kill", "c1", "NOTASIG"], "invalid signal 'NOTASIG'"),
    (["kill", "c1", "0"], "invalid signal '0'"),
    (["state"], "the following arguments are required: ID"),
    (["state", "a", "b"], "unrecognized arguments: b"),
    (["--log-format", "xml", "state", "c1"], "invalid log-format: xml"),
    (["list", "--format", "yaml"], "invalid choice: 'yaml'"),
    (["--bogus", "state", "c1"], "unrecognized arguments"),
])
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse(argv)


def test_invalid_id_rejected_before_anything_happens():
    with pytest.raises(InvalidId):
        parse(["state", "../etc"])


@pytest.mark.parametrize("text,number", [("1", 1), ("15", 15), ("HUP", 1), ("sigint", 2),
                                         ("SIGKILL", 9), ("Usr1", signal.SIGUSR1)])
def test_signal_names_and_numbers(text, number):
    assert parse_signal(text) == number


# --- whole-program behaviour ------------------------------------------------------

def test_version_prints_version_spec_and_backend(runphi):
    result = runphi("--version", root=False)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["runphi version 0.1.0", "spec: 1.0.2", "backend: none"]


def test_help_lists_every_verb(runphi):
    result = runphi("--help", root=False)
    assert result.returncode == 0
    for verb in ("create", "start", "run", "state", "kill", "delete", "list", "ps", "events",
                 "features", "spec", "exec", "pause", "resume", "update", "checkpoint", "restore"):
        assert f"  {verb} " in result.stdout


def test_features_json(runphi):
    from runphi.hooks import SUPPORTED_HOOKS

    result = runphi("features")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert doc["ociVersionMax"] == "1.0.2"
    assert doc["hooks"] == list(SUPPORTED_HOOKS) and "startContainer" not in doc["hooks"]
    assert all(key.startswith("org.runphi.") for key in doc["annotations"])
    assert result.stdout.startswith('{\n    "ociVersionMin"')


def test_unknown_verb_is_one_line_exit_1(runphi):
    result = runphi("frobnicate", "x")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert "unknown command 'frobnicate'" in result.stderr


def test_spec_writes_a_zic_config_once(runphi, tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    assert runphi("spec", "--bundle", str(bundle)).returncode == 0
    config = json.loads((bundle / "config.json").read_text())
    assert config["annotations"]["org.runphi.runtime"] == "runphi"
    from runphi.oci import load_config

    assert load_config(bundle).linux.resources.cpu.cpus == "1"
    again = runphi("spec", "--bundle", str(bundle))
    assert again.returncode == 1 and "exists. Remove it first." in again.stderr


# --- unknown ids (oci-runtime.md §11), with and without a runc on PATH ------------

@pytest.mark.parametrize("with_runc", [True, False])
def test_unknown_ids(runphi, with_runc, tmp_path):
    if with_runc and RUNC is None:
        pytest.skip("runc not installed")
    extra = {} if with_runc else {"PATH": str(tmp_path / "empty-path")}
    state = runphi("state", "nope", extra_env=extra)
    assert state.returncode == 1 and "container does not exist" in state.stderr
    kill = runphi("kill", "nope", "9", extra_env=extra)
    assert kill.returncode == 1 and "does not exist" in kill.stderr
    delete = runphi("delete", "nope", extra_env=extra)
    assert delete.returncode == 1 and "container does not exist" in delete.stderr
    forced = runphi("delete", "--force", "nope", extra_env=extra)
    assert forced.returncode == 0, forced.stderr


# --- ZIC verbs against records with a real monitor process -------------------------

def _state(runphi, cid) -> dict:
    result = runphi("state", cid)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.endswith("\n")
    return json.loads(result.stdout)


def test_state_reports_live_status_and_pid(runphi, make_record, state_root):
    created = make_record("z-created", "created", annotations={"org.example": "v"})
    doc = _state(runphi, "z-created")
    assert (doc["status"], doc["pid"], doc["annotations"]) == ("created", created.monitor_pid,
                                                               {"org.example": "v"})
    make_record("z-dead", "running", alive=False)
    doc = _state(runphi, "z-dead")
    assert (doc["status"], doc["pid"]) == ("stopped", 0)


def test_kill_stopped_container(runphi, make_record):
    make_record("z-stopped", "running", alive=False)
    refused = runphi("kill", "z-stopped", "15")
    assert refused.returncode == 1 and "container not running" in refused.stderr
    assert runphi("kill", "--all", "z-stopped", "9").returncode == 0


def test_kill_term_reaches_the_monitor(runphi, make_record):
    record = make_record("z-term", "running")
    monitor = make_record.processes[-1]
    result = runphi("kill", "z-term", "TERM")
    assert result.returncode == 0, result.stderr
    assert monitor.wait(30) == -signal.SIGTERM
    assert _state(runphi, "z-term")["status"] == "stopped"
    assert record.monitor_pid == monitor.pid


def test_kill_with_unsupported_signal_is_refused(runphi, make_record):
    make_record("z-usr1", "running")
    monitor = make_record.processes[-1]
    result = runphi("kill", "z-usr1", "USR1")
    assert result.returncode == 1 and "signal SIGUSR1 is not supported" in result.stderr
    assert monitor.poll() is None


def test_delete_rules(runphi, make_record, state_root):
    make_record("z-run", "running")
    refused = runphi("delete", "z-run")
    assert refused.returncode == 1
    assert "cannot delete container z-run that is not stopped: running" in refused.stderr
    assert (state_root / "z-run").is_dir()
    forced = runphi("delete", "--force", "z-run")
    assert forced.returncode == 0, forced.stderr
    assert make_record.processes[-1].wait(30) == -signal.SIGKILL
    assert not (state_root / "z-run").exists()

    make_record("z-created", "created")
    assert runphi("delete", "z-created").returncode == 0
    assert make_record.processes[-1].wait(30) == -signal.SIGKILL

    make_record("z-stopped", "running", alive=False)
    assert runphi("delete", "z-stopped").returncode == 0
    assert sorted(os.listdir(state_root)) == []


def test_start_refusals_use_runc_wording(runphi, make_record):
    make_record("z-stopped", "created", alive=False)
    stopped = runphi("start", "z-stopped")
    assert stopped.returncode == 1 and "cannot start a container that has stopped" in stopped.stderr
    make_record("z-running", "running")
    running = runphi("start", "z-running")
    assert running.returncode == 1 and "cannot start an already running container" in running.stderr
    make_record("z-created", "created")
    no_backend = runphi("start", "z-created")
    assert no_backend.returncode == 1 and "no partitioning backend configured" in no_backend.stderr
    assert _state(runphi, "z-created")["status"] == "created"


@pytest.mark.parametrize("verb", ["exec", "pause", "resume", "update", "checkpoint"])
def test_unsupported_verbs_on_a_zic(runphi, make_record, verb):
    make_record("z-x", "running")
    argv = {"exec": ["exec", "z-x", "sh"], "update": ["update", "--resources", "-", "z-x"]}
    result = runphi(*argv.get(verb, [verb, "z-x"]))
    assert result.returncode == 1
    assert f"{verb} is not supported for partitioned containers" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_ps_lists_the_monitor(runphi, make_record):
    record = make_record("z-ps", "running")
    result = runphi("ps", "--format", "json", "z-ps")
    assert json.loads(result.stdout) == [record.monitor_pid]
    table = runphi("ps", "z-ps")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert "PID" in lines[0].split() and len(lines) == 2 and str(record.monitor_pid) in lines[1]
    make_record("z-ps-dead", "running", alive=False)
    assert json.loads(runphi("ps", "--format", "json", "z-ps-dead").stdout) == []


def test_events_on_a_stopped_zic(runphi, make_record):
    make_record("z-ev", "running", alive=False)
    result = runphi("events", "--stats", "z-ev")
    assert result.returncode == 1 and "container with id z-ev is not running" in result.stderr


def test_list_of_runphi_records(runphi, make_record):
    record = make_record("z-list", "created")
    table = runphi("list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    assert lines[1].split() == ["z-list", str(record.monitor_pid), "created", record.bundle,
                                record.created, "root" if os.geteuid() == 0 else lines[1].split()[-1]]
    assert table.stderr == ""
    as_json = json.loads(runphi("list", "--format", "json").stdout)
    assert [entry["id"] for entry in as_json] == ["z-list"] and as_json[0]["owner"]
    assert runphi("list", "-q").stdout == "z-list\n"


def test_list_when_empty_is_null(runphi):
    assert runphi("list", "--format", "json").stdout == "null\n"


# --- lean verb processes ------------------------------------------------------------

HEAVY = ("trio", "structlog", "asyncio", "serial")


def _imported_modules(runphi_bin, *argv: str, env: dict[str, str]) -> tuple[set[str], subprocess.CompletedProcess]:
    result = subprocess.run([sys.executable, "-X", "importtime", str(runphi_bin), *argv],
                            capture_output=True, text=True, env=env, timeout=60)
    modules = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:")}
    return {m.split(".")[0] for m in modules}, result


def test_state_imports_nothing_heavy(runphi_bin, make_record, state_root, tmp_path):
    make_record("z-lean", "running")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPHI_")}
    env["RUNPHI_CONFIG"] = str(tmp_path / "none.toml")
    (tmp_path / "none.toml").write_text("")
    top_level, result = _imported_modules(runphi_bin, "--root", str(state_root), "state", "z-lean",
                                          env=env)
    assert result.returncode == 0, result.stderr
    assert '"status": "running"' in result.stdout
    assert top_level & set(HEAVY) == set()


def test_structlog_loads_only_when_a_debug_line_is_written(runphi_bin, make_record, state_root,
                                                           tmp_path):
    make_record("z-dbg", "running")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPHI_")}
    env["RUNPHI_CONFIG"] = str(tmp_path / "none.toml")
    (tmp_path / "none.toml").write_text("")
    log = tmp_path / "log.json"
    argv = ("--root", str(state_root), "--log", str(log), "--log-format", "json")
    quiet, _ = _imported_modules(runphi_bin, *argv, "kill", "z-dbg", "USR1", env=env)
    assert "structlog" not in quiet, "an error line is written without structlog"
    if RUNC is None:
        pytest.skip("runc not installed")
    debug, _ = _imported_modules(runphi_bin, *argv, "--debug", "delete", "--force", "unknown-id",
                                 env=env)
    assert "structlog" in debug
    lines = [msgspec.json.decode(line) for line in log.read_text().splitlines()]
    assert any(line["msg"] == "forwarding to runc" and line["level"] == "debug" for line in lines)


# --- properties -------------------------------------------------------------------

from hypothesis import given, strategies as st  # noqa: E402

ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+,.-"


@given(st.text(alphabet=ID_ALPHABET, min_size=1, max_size=255).filter(lambda s: s not in (".", "..")))
def test_every_id_in_runc_charset_is_accepted(container_id):
    from runphi.cli import validate_id

    assert validate_id(container_id) == container_id


@given(st.text(min_size=0, max_size=40), st.sampled_from(["/", " ", "\n", "\x00", "é"]))
def test_ids_with_foreign_characters_are_refused(prefix, bad):
    from runphi.cli import validate_id

    with pytest.raises(InvalidId):
        validate_id(prefix + bad)


@given(st.sampled_from(sorted(s.name for s in signal.Signals)), st.booleans(), st.booleans())
def test_every_signal_name_parses_in_any_spelling(name, drop_sig, lower):
    text = name[3:] if drop_sig and name.startswith("SIG") else name
    text = text.lower() if lower else text
    assert parse_signal(text) == signal.Signals[name]
    assert parse_signal(str(int(signal.Signals[name]))) == signal.Signals[name]


def test_a_verb_whose_module_is_missing_fails_in_one_line(monkeypatch, state_root, capfd):
    from runphi import cli

    monkeypatch.setitem(cli.VERBS, "logs", cli.Verb(cli._p_logs, "not_written_yet", "console log"))
    monkeypatch.setenv("RUNPHI_CONFIG", str(state_root / "none.toml"))
    (state_root / "none.toml").write_text("")
    assert cli.run_cli(["--root", str(state_root), "logs", "c1"]) == 1
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1
    assert "the 'logs' command is not available in this runphi build yet" in err
