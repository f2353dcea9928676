"""ZIC-or-runc decision, forwarding to the real runc, merged list, runtime config."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from runphi.config import RuntimeConfig, load_runtime_config
from runphi.errors import BundleError, ConfigError, RuncNotFound
from runphi.forward import is_zic
from tools.testbed.containerd import busybox_path, make_busybox_rootfs

RUNC = shutil.which("runc")
needs_runc = pytest.mark.skipif(RUNC is None or os.geteuid() != 0 or busybox_path() is None,
                                reason="needs root, runc and busybox-static")


def _bundle(tmp_path: Path, name: str, *, annotations=None, args=("sh", "-c", "exit 0"),
            boot: str | None = None, busybox: bool = False, root_path: str = "rootfs") -> Path:
    bundle = tmp_path / name
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    if busybox:
        make_busybox_rootfs(rootfs)
    if boot:
        (rootfs / "boot").mkdir()
        (rootfs / "boot" / boot).write_text('{"os_var": "baremetal"}')
    config = subprocess.run([RUNC, "spec", "--bundle", str(bundle)], check=True) if RUNC else None
    if config is None:
        (bundle / "config.json").write_text('{"ociVersion": "1.0.2"}')
    document = json.loads((bundle / "config.json").read_text())
    document.setdefault("process", {})
    document["process"].update({"terminal": False, "args": list(args), "env": ["PATH=/bin"]})
    document["root"] = {"path": root_path, "readonly": True}
    document["annotations"] = annotations or {}
    (bundle / "config.json").write_text(json.dumps(document))
    return bundle


# --- the decision --------------------------------------------------------------------

@pytest.mark.parametrize("boot", ["config.json", "configuration.json"])
def test_boot_description_makes_a_zic(tmp_path, boot):
    assert is_zic(_bundle(tmp_path, "b", boot=boot))


def test_plain_rootfs_is_runc(tmp_path):
    assert not is_zic(_bundle(tmp_path, "b"))


@pytest.mark.parametrize("value,boot,expected", [
    ("runphi", None, True), ("runc", "config.json", False), ("runphi", "config.json", True)])
def test_annotation_wins(tmp_path, value, boot, expected):
    bundle = _bundle(tmp_path, "b", boot=boot, annotations={"org.runphi.runtime": value})
    assert is_zic(bundle) is expected


@pytest.mark.parametrize("value", ["runphi", None])
def test_a_pod_sandbox_always_goes_to_runc(tmp_path, value):
    """Pod annotations reach the pause container too: it is never a ZIC."""
    annotations = {"io.kubernetes.cri.container-type": "sandbox"}
    if value:
        annotations["org.runphi.runtime"] = value
    assert not is_zic(_bundle(tmp_path, "b", boot="config.json", annotations=annotations))


def test_bad_annotation_value_is_an_error(tmp_path):
    bundle = _bundle(tmp_path, "b", annotations={"org.runphi.runtime": "kvm"})
    with pytest.raises(BundleError, match="must be \"runphi\" or \"runc\""):
        is_zic(bundle)


def test_a_boot_directory_linking_out_of_the_rootfs_hides_what_is_there(tmp_path):
    host_boot = tmp_path / "host-boot"
    host_boot.mkdir()
    (host_boot / "config.json").write_text("{}")
    bundle = _bundle(tmp_path, "dir-link")
    (bundle / "rootfs" / "boot").symlink_to(host_boot)
    assert not is_zic(bundle)
    (bundle / "rootfs" / "boot").unlink()
    (bundle / "rootfs" / "boot").symlink_to("../../outside")  # climbs out: nothing of the image there
    assert not is_zic(bundle)


def test_relative_links_inside_the_rootfs_are_followed_like_create_does(tmp_path):
    bundle = _bundle(tmp_path, "rel-link")
    rootfs = bundle / "rootfs"
    (rootfs / "opt" / "zic").mkdir(parents=True)
    (rootfs / "opt" / "zic" / "config.json").write_text('{"os_var": "baremetal"}')
    (rootfs / "boot").symlink_to("opt/zic")
    assert is_zic(bundle)
    (rootfs / "boot").unlink()
    (rootfs / "boot").mkdir()
    (rootfs / "boot" / "config.json").symlink_to("../opt/zic/config.json")
    assert is_zic(bundle)


def _plant(path: Path, kind: str) -> None:
    """Put a ``kind`` entry at ``path``, where an image's boot description belongs."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling":
        path.symlink_to("nowhere.json")
    else:
        path.symlink_to(kind)


#: (entry planted at /boot/config.json, what the refusal says)
UNUSABLE_DESCRIPTIONS = [
    ("/etc/shadow", "is an absolute symlink to '/etc/shadow'"),
    ("../../../../../../etc/shadow", "resolves outside the image"),
    ("../../..", "resolves outside the image"),
    ("fifo", "is a FIFO, not a regular file"),
    ("device", "is a character device, not a regular file"),
    ("directory", "is a directory, not a regular file"),
    ("dangling", "is a symlink to a file that is not in the image"),
]


@pytest.mark.parametrize("kind,reason", UNUSABLE_DESCRIPTIONS, ids=[k for k, _ in UNUSABLE_DESCRIPTIONS])
def test_an_unusable_description_is_refused_not_forwarded(tmp_path, kind, reason):
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    bundle = _bundle(tmp_path, "odd")
    (bundle / "rootfs" / "boot").mkdir()
    _plant(bundle / "rootfs" / "boot" / "config.json", kind)
    with pytest.raises(BundleError, match=re.escape(reason)):
        is_zic(bundle)


def test_absolute_root_path_is_honoured(tmp_path):
    elsewhere = _bundle(tmp_path, "real", boot="config.json")
    bundle = _bundle(tmp_path, "b", root_path=str(elsewhere / "rootfs"))
    assert is_zic(bundle)


def test_unreadable_config_counts_as_plain(tmp_path):
    (tmp_path / "empty").mkdir()
    assert not is_zic(tmp_path / "empty")


# --- runtime configuration ---------------------------------------------------------

def test_config_defaults_when_default_file_absent(tmp_path):
    config = load_runtime_config({})  # /etc/runphi/runphi.toml absent on test machines
    if config.source:
        pytest.skip(f"{config.source} exists on this machine")
    assert (config.state_dir, config.backend, config.jailhouse.sysfs) == (
        "/run/runphi", "none", "/sys/devices/jailhouse")
    assert config.jailhouse.platform_path().name == "qemu-arm64.toml"
    assert config.jailhouse.templates_path().name == "templates"


def test_config_file_and_env_overrides(tmp_path):
    path = tmp_path / "runphi.toml"
    path.write_text('backend = "jailhouse"\nstate_dir = "/var/x"\n[jailhouse]\nplatform = "zcu102"\n'
                    'poll_interval_ms = 20\n[log]\nlevel = "debug"\n')
    config = load_runtime_config({"RUNPHI_CONFIG": str(path), "RUNPHI_SYSFS": "/sim/sys",
                                  "RUNPHI_JAILHOUSE": "/sim/bin/jailhouse",
                                  "RUNPHI_STATE_DIR": "/tmp/node"})
    assert config.backend == "jailhouse" and config.state_dir == "/tmp/node"
    assert (config.jailhouse.sysfs, config.jailhouse.tool) == ("/sim/sys", "/sim/bin/jailhouse")
    assert (config.jailhouse.platform, config.jailhouse.poll_interval_ms) == ("zcu102", 20)
    assert config.log.level == "debug" and config.source == str(path)


@pytest.mark.parametrize("text,message", [
    ('backend = "xen"', r"Invalid enum value 'xen' - at `\$.backend`"),
    ("[jailhouse]\npoll_interval_ms = \"fast\"", "Expected `int`"),
    ("colour = 1", "unknown field `colour`"),
    ("backend = ", "not valid TOML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "runphi.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_runtime_config({"RUNPHI_CONFIG": str(path)})


def test_missing_named_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_runtime_config({"RUNPHI_CONFIG": str(tmp_path / "nope.toml")})


def test_runc_lookup_never_returns_runphi_itself(tmp_path, runphi_bin, monkeypatch):
    impostor_dir = tmp_path / "impostor"
    impostor_dir.mkdir()
    (impostor_dir / "runc").symlink_to(runphi_bin)
    monkeypatch.setattr("sys.argv", [str(runphi_bin)])
    if RUNC:
        monkeypatch.setenv("PATH", f"{impostor_dir}:{Path(RUNC).parent}")
        assert RuntimeConfig().runc_path() == RUNC
    monkeypatch.setenv("PATH", str(impostor_dir))
    with pytest.raises(RuncNotFound, match="no runc was found on PATH"):
        RuntimeConfig().runc_path()
    with pytest.raises(RuncNotFound, match="is not an executable runc"):
        RuntimeConfig(runc=str(impostor_dir / "runc")).runc_path()


# --- with the real runc ----------------------------------------------------------------

@pytest.fixture
def runphi(runphi_bin, state_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPHI_")}
    (tmp_path / "runphi.toml").write_text("")
    env["RUNPHI_CONFIG"] = str(tmp_path / "runphi.toml")

    def call(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(runphi_bin), "--root", str(state_root), *args],
                              capture_output=True, text=True, env=env, cwd=cwd or tmp_path,
                              stdin=subprocess.DEVNULL, timeout=120)

    return call


@needs_runc
def test_plain_run_is_runc_with_its_exit_code(runphi, tmp_path):
    bundle = _bundle(tmp_path, "plain", busybox=True, args=("sh", "-c", "echo via runc; exit 7"))
    result = runphi("run", "--bundle", str(bundle), "plain7")
    assert (result.returncode, result.stdout) == (7, "via runc\n"), result.stderr


def test_zic_create_without_backend_leaves_nothing(runphi, tmp_path, state_root):
    bundle = _bundle(tmp_path, "zic", boot="config.json")
    pid_file = tmp_path / "init.pid"
    log = tmp_path / "log.json"
    result = runphi("--log", str(log), "--log-format", "json", "create", "--bundle", str(bundle),
                    "--pid-file", str(pid_file), "zic1")
    assert result.returncode == 1
    expected = ('cannot create ZIC zic1: no partitioning backend configured '
                f'(set backend = "jailhouse" in {tmp_path / "runphi.toml"})')
    assert result.stderr == expected + "\n"
    [line] = [json.loads(text) for text in log.read_text().splitlines()]
    assert (line["level"], line["msg"]) == ("error", expected)
    assert os.listdir(state_root) == [] and not pid_file.exists()


@pytest.mark.parametrize("kind,reason", UNUSABLE_DESCRIPTIONS, ids=[k for k, _ in UNUSABLE_DESCRIPTIONS])
def test_create_of_an_unusable_description_is_one_line_and_leaves_nothing(runphi, tmp_path, state_root,
                                                                          kind, reason):
    """runc never sees such a bundle (it would fail unrelatedly and leave rootfs/dev/* behind)."""
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    bundle = _bundle(tmp_path, "odd", busybox=busybox_path() is not None, args=("/boot/ticker.bin",))
    (bundle / "rootfs" / "boot").mkdir()
    _plant(bundle / "rootfs" / "boot" / "config.json", kind)
    before = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*"))
    log = tmp_path / "log.json"
    result = runphi("--log", str(log), "--log-format", "json", "create", "--bundle", str(bundle), "odd1")
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert [json.loads(text)["msg"] for text in log.read_text().splitlines()] == [line]
    assert line.startswith("cannot create container odd1: boot description ") and reason in line, line
    assert "/boot/config.json" in line and "Traceback" not in result.stderr
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*")) == before
    assert os.listdir(state_root) == []


def test_zic_create_refuses_a_taken_id(runphi, make_record, tmp_path):
    make_record("taken", "created")
    bundle = _bundle(tmp_path, "zic", boot="config.json")
    result = runphi("create", "--bundle", str(bundle), "taken")
    assert result.returncode == 1 and "container with id exists: taken" in result.stderr


def test_zic_create_checks_terminal_against_console_socket(runphi, tmp_path):
    bundle = _bundle(tmp_path, "zic", boot="config.json")
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = True
    (bundle / "config.json").write_text(json.dumps(config))
    result = runphi("create", "--bundle", str(bundle), "tty1")
    assert result.returncode == 1 and "process.terminal is true but no --console-socket" in result.stderr


def test_zic_with_wrongly_typed_config_names_the_key(runphi, tmp_path):
    bundle = _bundle(tmp_path, "zic", boot="config.json")
    config = json.loads((bundle / "config.json").read_text())
    config["linux"] = {"resources": {"memory": {"limit": "lots"}}}
    (bundle / "config.json").write_text(json.dumps(config))
    result = runphi("create", "--bundle", str(bundle), "typed")
    assert result.returncode == 1
    assert "$.linux.resources.memory.limit" in result.stderr and "Traceback" not in result.stderr


@needs_runc
def test_list_merges_runc_and_runphi_containers(runphi, make_record, tmp_path, state_root):
    bundle = _bundle(tmp_path, "sleeper", busybox=True, args=("sleep", "1000"))
    # The detached container inherits runc's stdio: give it files, not pipes.
    with open(tmp_path / "runc.err", "wb") as errors:
        started = subprocess.run([RUNC, "--root", str(state_root), "run", "-d", "--bundle",
                                  str(bundle), "runc-one"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=errors, timeout=60)
    assert started.returncode == 0, (tmp_path / "runc.err").read_text()
    try:
        make_record("zic-one", "running")
        listing = runphi("list", "--format", "json")
        assert listing.returncode == 0 and listing.stderr == "", listing.stderr
        by_id = {entry["id"]: entry for entry in json.loads(listing.stdout)}
        assert set(by_id) == {"runc-one", "zic-one"}
        assert by_id["runc-one"]["status"] == "running" and by_id["zic-one"]["status"] == "running"
        assert runphi("list", "-q").stdout.split() == ["runc-one", "zic-one"]
        # runc containers stay runc's: state/kill/delete go through to it.
        state = runphi("state", "runc-one")
        assert json.loads(state.stdout)["id"] == "runc-one"
        assert runphi("kill", "runc-one", "KILL").returncode == 0
    finally:
        subprocess.run([RUNC, "--root", str(state_root), "delete", "--force", "runc-one"],
                       timeout=60, check=False)
    assert "runc-one" not in os.listdir(state_root)
