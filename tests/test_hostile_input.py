"""Hostile input: bundles and images written by strangers, ids from anyone.

Every case runs the real ``runphi create`` against a simulated board and must end
with exactly one error line on stderr (no traceback) that says what is wrong,
exit status 1, and no side effect: no cell, no ledger entry, no state directory,
no monitor, no pid file, nothing written into the bundle or outside it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.test_lifecycle_failures import live_runphi_descendants
from tests.test_lifecycle_harness import board, guest_script, subreaper, zic  # noqa: F401

GUEST = guest_script("tick 50 x")
CID = "zq7"


@dataclass
class Case:
    """One hostile input: `prepare` breaks a good bundle; the error line must contain `words`."""

    name: str
    prepare: Callable[[Path], None]
    words: tuple[str, ...]
    container_id: str = CID
    extra: tuple[str, ...] = ()
    #: Whether the line must name the container (false only where the id itself is the problem).
    names_id: bool = True
    marks: list = field(default_factory=list)


def edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def prepare(bundle: Path) -> None:
        config = json.loads((bundle / "config.json").read_text())
        change(config)
        (bundle / "config.json").write_text(json.dumps(config))
    return prepare


def raw_config(data: bytes) -> Callable[[Path], None]:
    def prepare(bundle: Path) -> None:
        (bundle / "config.json").write_bytes(data)
    return prepare


def edit_boot(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def prepare(bundle: Path) -> None:
        path = bundle / "rootfs" / "boot" / "config.json"
        description = json.loads(path.read_text())
        change(description)
        path.write_text(json.dumps(description))
    return prepare


def boot_fields(**fields) -> Callable[[Path], None]:
    return edit_boot(lambda d: d.update(fields))


def raw_boot(data: bytes) -> Callable[[Path], None]:
    def prepare(bundle: Path) -> None:
        (bundle / "rootfs" / "boot" / "config.json").write_bytes(data)
    return prepare


def inmate_is(make: Callable[[Path], None]) -> Callable[[Path], None]:
    """Replace /boot/boot.bin by whatever `make(path)` puts there."""
    def prepare(bundle: Path) -> None:
        path = bundle / "rootfs" / "boot" / "boot.bin"
        path.unlink()
        make(path)
    return prepare


def symlink_to(target: str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


def boot_description_is(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(bundle: Path) -> None:
        path = bundle / "rootfs" / "boot" / "config.json"
        path.unlink()
        make(path)
    return prepare


def sparse_file(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)
    return make


def char_device(path: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers


def fifo(path: Path) -> None:
    os.mkfifo(path)


def symlink_loop(path: Path) -> None:
    path.symlink_to("loop-b")
    (path.parent / "loop-b").symlink_to(path.name)


def boot_dir_absolute_symlink(bundle: Path) -> None:
    boot = bundle / "rootfs" / "boot"
    os.rename(boot, bundle / "rootfs" / "realboot")
    boot.symlink_to("/etc")


def rootfs_is_a_file(bundle: Path) -> None:
    import shutil

    shutil.rmtree(bundle / "rootfs")
    (bundle / "rootfs").write_bytes(b"not a directory")


def hook(kind: str, path: str, **extra) -> Callable[[Path], None]:
    return edit_config(lambda c: c.setdefault("hooks", {}).setdefault(kind, []).append({"path": path, **extra}))


def hanging_hook(bundle: Path) -> None:
    script = bundle / "hang.sh"
    script.write_text("#!/bin/sh\nexec sleep 600\n")
    script.chmod(0o755)
    hook("createRuntime", str(script), timeout=1)(bundle)


def no_change(bundle: Path) -> None:
    pass


def set_path(config: dict, keys: tuple[str, ...], value) -> None:
    for key in keys[:-1]:
        config = config.setdefault(key, {})
    config[keys[-1]] = value


def config_key(*keys: str, value) -> Callable[[Path], None]:
    return edit_config(lambda c: set_path(c, keys, value))


def drop_key(key: str) -> Callable[[Path], None]:
    return edit_config(lambda c: c.pop(key))


MiB = 1 << 20

CASES = [
    # --- config.json: malformed, truncated, huge, wrong types ---
    # Without config.json runphi cannot tell a ZIC: runc gets the bundle and says so itself.
    Case("config-missing", lambda b: (b / "config.json").unlink(), ("config.json", "not found"), names_id=False),
    Case("config-empty", raw_config(b""), ("config.json",)),
    Case("config-truncated", raw_config(b'{"ociVersion": "1.0.2", "root": {"pa'), ("config.json",)),
    Case("config-array", raw_config(b"[]"), ("config.json",)),
    Case("config-null", raw_config(b"null"), ("config.json",)),
    Case("config-not-utf8", raw_config(b'{"ociVersion": "\xff\xfe"}'), ("config.json",)),
    Case("config-deep-nesting", raw_config(b'{"ociVersion": "1.0.2", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
         ("config.json",)),
    Case("config-huge", raw_config(b'{"ociVersion": "1.0.2", "pad": "' + b"x" * (40 * MiB) + b'"}'),
         ("config.json", "too large")),
    Case("config-is-fifo", lambda b: ((b / "config.json").unlink(), os.mkfifo(b / "config.json")),
         ("config.json", "not a regular file")),
    Case("config-is-device", lambda b: ((b / "config.json").unlink(), char_device(b / "config.json")),
         ("config.json", "not a regular file")),
    Case("config-oci-version-missing", drop_key("ociVersion"), ("ociVersion",)),
    Case("config-oci-version-number", config_key("ociVersion", value=1), ("ociVersion",)),
    Case("config-root-string", config_key("root", value="rootfs"), ("root",)),
    Case("config-root-path-number", config_key("root", "path", value=7), ("root.path",)),
    Case("config-annotations-list", config_key("annotations", value=["org.runphi.runtime"]), ("annotations",)),
    Case("config-annotation-number", config_key("annotations", "org.runphi.other", value=3), ("annotations",)),
    Case("config-terminal-string", config_key("process", "terminal", value="yes"), ("process.terminal",)),
    Case("config-hooks-string", config_key("hooks", value="/bin/true"), ("hooks",)),
    Case("config-memory-limit-string", config_key("linux", "resources", "memory", "limit", value="1G"),
         ("limit",)),
    Case("config-cpus-number", config_key("linux", "resources", "cpu", "cpus", value=3), ("cpus",)),
    # --- rootfs ---
    Case("root-missing-no-rootfs", lambda b: (drop_key("root")(b), os.rename(b / "rootfs", b / "elsewhere")),
         ("boot description",)),
    Case("root-relative-absent", config_key("root", "path", value="nowhere"), ("boot description",)),
    Case("root-absolute-absent", config_key("root", "path", value="/nonexistent-runphi-rootfs"),
         ("boot description",)),
    Case("root-is-a-file", rootfs_is_a_file, ("boot description",)),
    # --- the boot description ---
    Case("boot-missing", lambda b: (b / "rootfs" / "boot" / "config.json").unlink(), ("no boot description",)),
    Case("boot-malformed", raw_boot(b"{memory: 16}"), ("boot description", "invalid")),
    Case("boot-truncated", raw_boot(b'{"os_var": "baremetal", "inm'), ("boot description", "invalid")),
    Case("boot-array", raw_boot(b"[1, 2]"), ("boot description", "invalid")),
    Case("boot-wrong-type", boot_fields(memory="lots"), ("boot description", "memory")),
    Case("boot-huge", raw_boot(b'{"os_var": "baremetal", "pad": "' + b"x" * (40 * MiB) + b'"}'),
         ("boot description", "too large")),
    Case("boot-absolute-symlink", boot_description_is(symlink_to("/etc/hostname")), ("absolute symlink",)),
    Case("boot-dir-absolute-symlink", boot_dir_absolute_symlink, ("absolute symlink",)),
    Case("boot-climbing-symlink", boot_description_is(symlink_to("../../../../../../../../etc/hostname")),
         ("outside the image",)),
    Case("boot-symlink-loop", boot_description_is(symlink_loop), ("symbolic links",)),
    Case("boot-is-fifo", boot_description_is(fifo), ("boot description",)),
    Case("boot-is-device", boot_description_is(char_device), ("boot description",)),
    Case("inmate-dotdot", boot_fields(inmate="/boot/../../../etc/hostname"), ("'..'",)),
    Case("inmate-absolute-symlink", inmate_is(symlink_to("/etc/hostname")), ("absolute symlink",)),
    Case("inmate-climbing-symlink", inmate_is(symlink_to("../../../../../../etc/hostname")),
         ("outside the image",)),
    Case("inmate-symlink-loop", inmate_is(symlink_loop), ("symbolic links",)),
    Case("inmate-missing", boot_fields(inmate="/boot/none.bin"), ("none.bin", "not a file")),
    Case("inmate-directory", boot_fields(inmate="/boot"), ("not a file",)),
    Case("inmate-fifo", inmate_is(fifo), ("not a file",)),
    Case("inmate-device", inmate_is(char_device), ("not a file",)),
    Case("inmate-nul", boot_fields(inmate="/boot/boot.bin\u0000x"), ("NUL",)),
    Case("inmate-huge", inmate_is(sparse_file(8 << 30)), ("boot.bin", "larger than")),
    Case("inmate-bigger-than-cell-ram", inmate_is(sparse_file(17 << 20)), ("boot.bin", "larger than")),
    Case("linux-dtb-outside", boot_fields(os_var="linux", dtb="/../../etc/hostname"), ("'..'",)),
    Case("memory-negative", boot_fields(memory=-16), ("memory", "positive")),
    Case("memory-zero", boot_fields(memory=0), ("memory", "positive")),
    Case("memory-absurd", boot_fields(memory=1 << 40), ("memory", "no greater than")),
    Case("memory-overflow", raw_boot(b'{"inmate": "/boot/boot.bin", "memory": 1' + b"0" * 40 + b"}"),
         ("memory", "no greater than")),
    Case("memory-too-much-for-board", boot_fields(memory=4096), ("cell RAM", "free")),
    Case("vcpus-more-than-board", boot_fields(vcpus=8), ("CPU(s) requested",)),
    Case("vcpus-negative", boot_fields(vcpus=-2), ("vcpus", "positive")),
    Case("vcpus-absurd", boot_fields(vcpus=100_000), ("vcpus", "no greater than")),
    Case("pinning-missing-cpu", boot_fields(vcpu_pinning=[{"vcpu": 0, "pcpu": 99}]), ("CPUs 99",)),
    Case("pinning-root-cpu", boot_fields(vcpu_pinning=[{"vcpu": 0, "pcpu": 0}]), ("CPUs 0",)),
    Case("pinning-negative", boot_fields(vcpu_pinning=[{"vcpu": 0, "pcpu": -1}]), ("vcpu_pinning",)),
    Case("address-garbage", boot_fields(starting_vaddress="zzz"), ("starting_vaddress",)),
    Case("address-negative", boot_fields(starting_vaddress=-4096), ("starting_vaddress",)),
    Case("address-too-big", boot_fields(starting_vaddress=hex(1 << 64)), ("starting_vaddress",)),
    # --- OCI resources the board cannot satisfy ---
    Case("cpuset-missing-cpus", config_key("linux", "resources", "cpu", "cpus", value="64-65"), ("CPUs 64-65",)),
    Case("cpuset-garbage", config_key("linux", "resources", "cpu", "cpus", value="1-x"),
         ("linux.resources.cpu.cpus",)),
    Case("cpuset-reversed", config_key("linux", "resources", "cpu", "cpus", value="5-2"),
         ("linux.resources.cpu.cpus",)),
    Case("cpu-quota-absurd", edit_config(lambda c: set_path(c, ("linux", "resources", "cpu"),
                                                            {"quota": 10**12, "period": 1})), ("CPU",)),
    Case("shutdown-annotation-garbage", config_key("annotations", "org.runphi.shutdown-timeout-ms", value="soon"),
         ("shutdown-timeout-ms",)),
    # --- hooks ---
    Case("hook-missing-path", hook("createRuntime", "/nonexistent/runphi-hook"), ("createRuntime",)),
    Case("hook-relative-path", hook("createRuntime", "relative/hook"), ("createRuntime",)),
    Case("hook-hangs", hanging_hook, ("createRuntime", "timeout of 1 s")),
    # --- terminal ---
    Case("terminal-without-socket", config_key("process", "terminal", value=True), ("--console-socket",)),
    Case("socket-without-terminal", no_change, ("process.terminal",), extra=("--console-socket", "/nonexistent.sock")),
    # --- ids ---
    Case("id-slash", no_change, ("invalid container id",), container_id="a/b", names_id=False),
    Case("id-dotdot", no_change, ("invalid container id",), container_id="..", names_id=False),
    Case("id-dot", no_change, ("invalid container id",), container_id=".", names_id=False),
    Case("id-empty", no_change, ("invalid container id",), container_id="", names_id=False),
    Case("id-newline", no_change, ("invalid container id",), container_id="a\nb", names_id=False),
    Case("id-1kib", no_change, ("invalid container id",), container_id="k" * 1024, names_id=False),
    Case("id-parent-path", no_change, ("invalid container id",), container_id="../escape", names_id=False),
]


def test_there_are_at_least_fifty_cases():
    assert len(CASES) >= 50
    assert len({case.name for case in CASES}) == len(CASES)


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `path` (not following links): relative name -> (mode, size)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            info = os.lstat(full)
            out[str(full.relative_to(path))] = (info.st_mode, info.st_size)
    return out


def assert_no_side_effect(zic, cid: str, bundle_before: dict, bundle: Path) -> None:
    assert zic.board.cells() == {}, "a cell was left behind"
    ledger = zic.node / "jailhouse-ledger.json"
    if ledger.exists():
        assert json.loads(ledger.read_text()).get("allocations", {}) == {}, "ledger entry left behind"
    if cid and "/" not in cid and cid not in (".", ".."):
        assert not (zic.root / cid).exists(), "state directory left behind"
    if zic.root.exists():
        assert sorted(os.listdir(zic.root)) == [], "something was left in the state root"
    assert live_runphi_descendants() == [], "a monitor was left running"
    assert not (zic.base / "hostile.pid").exists(), "a pid file was written"
    assert snapshot(bundle) == bundle_before, "the bundle was changed"
    assert not (zic.base / "escape").exists()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_hostile_input_is_one_clear_error_and_no_side_effect(zic, case: Case):
    bundle = zic.bundle("b", GUEST)
    case.prepare(bundle)
    before = snapshot(bundle)
    result = zic.run("create", "--bundle", str(bundle), "--pid-file", str(zic.base / "hostile.pid"),
                     *case.extra, case.container_id, timeout=120)
    assert result.returncode == 1, f"exit {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    line = lines[0]
    for words in case.words:
        assert words in line, f"{words!r} not in {line!r}"
    if case.names_id:
        assert case.container_id in line, f"the line does not name the container: {line!r}"
    assert result.stdout == ""
    assert_no_side_effect(zic, case.container_id, before, bundle)


def test_an_id_with_a_nul_byte_is_refused(tmp_path):
    """argv cannot carry NUL, but the verb entry point must refuse it too (ids also come from APIs)."""
    code = ("import sys\nfrom runphi.cli import run_cli\n"
            "sys.exit(run_cli(['--root', sys.argv[1], 'state', 'a\\x00b']))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "root")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "invalid container id" in lines[0], lines
    assert not (tmp_path / "root").exists()


def test_numeric_ids_never_touch_the_cell_with_that_number(zic):
    """`jailhouse cell destroy 1` means cell *id* 1: an id like "1" must be addressed by name."""
    zic.create("first", zic.bundle("a", GUEST))
    first_id = (zic.board.sysfs / "cells").joinpath("1", "name").read_text().strip()
    assert first_id == "first", "the test expects the first cell to get id 1"
    zic.create("1", zic.bundle("b", GUEST))
    zic.run("start", "1", check=True)
    zic.run("kill", "1", "KILL", check=True)
    assert zic.run("delete", "--force", "1").returncode == 0
    assert zic.board.cells() == {"first": "shut down"}, "deleting container 1 touched cell id 1"
    assert zic.status("first") == "created"
    zic.create("0", zic.bundle("c", GUEST))
    assert zic.run("delete", "--force", "0").returncode == 0
    assert (zic.board.sysfs / "cells" / "0").is_dir(), "the root cell (id 0) must never be touched"
    assert zic.board.cells() == {"first": "shut down"}
