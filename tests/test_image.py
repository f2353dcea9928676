"""Boot description: runPHI's fields and defaults, unknown keys, and path traversal refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from runphi.image import (
    BootDescriptionError,
    BootDescriptionFile,
    decode_description_file,
    find_boot_description,
    load_boot_description,
    resolve_in_rootfs,
)


def image(tmp_path: Path, description: dict | str, files: tuple[str, ...] = ("boot/boot.bin",), name: str = "config.json") -> Path:
    rootfs = tmp_path / "rootfs"
    (rootfs / "boot").mkdir(parents=True, exist_ok=True)
    for f in files:
        (rootfs / f).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / f).write_bytes(b"\x00")
    text = description if isinstance(description, str) else json.dumps(description)
    (rootfs / "boot" / name).write_text(text)
    return rootfs


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def debug(self, msg: str, **context) -> None:
        self.lines.append((msg, context))


def test_defaults(tmp_path: Path) -> None:
    rootfs = image(tmp_path, {})
    d = load_boot_description(rootfs)
    assert d.inmate == rootfs / "boot" / "boot.bin"
    assert (d.os_var, d.starting_vaddress, d.net, d.rpu_req, d.memory_mib, d.vcpus, d.pinned_cpus) == (
        "", None, False, False, None, None, None
    )


def test_runphi_zephyr_description(tmp_path: Path) -> None:
    rootfs = image(
        tmp_path,
        {"os_var": "zephyr", "inmate": "/boot/zephyr.bin", "starting_vaddress": "0x70000000", "net": "veth0",
         "memory": 32, "vcpu_pinning": [{"vcpu": 0, "pcpu": 2}, {"vcpu": 1, "pcpu": 3}]},
        files=("boot/zephyr.bin",),
    )  # fmt: skip
    d = load_boot_description(rootfs)
    assert d.inmate == rootfs / "boot" / "zephyr.bin"
    assert (d.starting_vaddress, d.net, d.memory_mib, d.pinned_cpus) == (0x70000000, True, 32, {2, 3})


def test_linux_description_resolves_kernel_dtb_initrd(tmp_path: Path) -> None:
    rootfs = image(
        tmp_path,
        {"os_var": "linux", "kernel": "/boot/Image", "dtb": "boot/inmate.dtb", "ramdisk": "/boot/rootfs.cpio.gz"},
        files=("boot/Image", "boot/inmate.dtb", "boot/rootfs.cpio.gz"),
    )
    d = load_boot_description(rootfs)
    assert d.is_linux and d.inmate == d.kernel == rootfs / "boot" / "Image"
    assert d.dtb == rootfs / "boot" / "inmate.dtb" and d.initrd == rootfs / "boot" / "rootfs.cpio.gz"


@pytest.mark.parametrize("net", ["no", "none", "", False, None])
def test_net_off_values(tmp_path: Path, net) -> None:
    assert load_boot_description(image(tmp_path, {"net": net})).net is False


def test_configuration_json_is_accepted_and_config_json_preferred(tmp_path: Path) -> None:
    rootfs = image(tmp_path, {"memory": 8}, name="configuration.json")
    assert load_boot_description(rootfs).memory_mib == 8
    (rootfs / "boot" / "config.json").write_text('{"memory": 16}')
    assert load_boot_description(rootfs).memory_mib == 16


def test_unknown_keys_are_kept_and_logged_at_debug(tmp_path: Path) -> None:
    log = Recorder()
    d = load_boot_description(image(tmp_path, {"isolcpu": "1", "accelerators": [], "disk_size": 3}), log)
    assert d.ignored_keys == ("accelerators", "disk_size", "isolcpu")
    assert log.lines == [("boot description: ignoring keys runphi does not use",
                          {"file": "/boot/config.json", "keys": "disk_size,isolcpu"})]  # fmt: skip


def test_missing_description_is_reported(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    assert find_boot_description(tmp_path / "rootfs") is None
    with pytest.raises(BootDescriptionError, match="no boot description in the image"):
        load_boot_description(tmp_path / "rootfs")


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("{not json", "is invalid"),
        ({"memory": "lots"}, "Expected `int | null`, got `str`"),
        ({"memory": 0}, "memory = 0 in /boot/config.json must be a positive number"),
        ({"starting_vaddress": "0xZZ"}, "is not a number"),
        ({"inmate": "/boot/missing.bin"}, "inmate '/boot/missing.bin' named by /boot/config.json is not a file"),
    ],
)
def test_bad_descriptions(tmp_path: Path, description, reason: str) -> None:
    with pytest.raises(BootDescriptionError) as err:
        load_boot_description(image(tmp_path, description))
    assert reason in str(err.value)


# --- the file schema (what mkzic writes) ---


def test_the_file_schema_records_only_what_the_file_gives() -> None:
    fields, unknown = decode_description_file(b'{"zz": 1, "memory": 8, "aa": {"b": 2}}')
    assert fields == BootDescriptionFile(memory=8)
    assert [(key, bytes(raw)) for key, raw in unknown.items()] == [("zz", b"1"), ("aa", b'{"b": 2}')]
    assert msgspec.json.encode(fields) == b'{"memory":8}'
    assert msgspec.json.encode(BootDescriptionFile()) == b"{}"


def test_the_file_schema_writes_explicit_defaults_back() -> None:
    given = b'{"os_var":"","inmate":"/boot/boot.bin","vcpu_pinning":[],"netconf":"","rpu_req":false}'
    assert msgspec.json.encode(decode_description_file(given)[0]) == given


@pytest.mark.parametrize("key", ["os_var", "inmate", "vcpu_pinning", "netconf", "rpu_req"])
def test_null_is_refused_where_an_absent_field_has_a_default(tmp_path: Path, key: str) -> None:
    with pytest.raises(BootDescriptionError, match=rf"got `null` - at `\$\.{key}`"):
        load_boot_description(image(tmp_path, {key: None}))


# --- traversal ---


def test_dotdot_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"x")
    with pytest.raises(BootDescriptionError, match="contains '..'"):
        load_boot_description(image(tmp_path, {"inmate": "/boot/../../secret"}))


def test_absolute_symlink_is_refused(tmp_path: Path) -> None:
    rootfs = image(tmp_path, {"inmate": "/boot/link.bin"})
    os.symlink("/etc/passwd", rootfs / "boot" / "link.bin")
    with pytest.raises(BootDescriptionError, match=r"/boot/link.bin is an absolute symlink to '/etc/passwd'"):
        load_boot_description(rootfs)


def test_relative_symlink_escaping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside.bin").write_bytes(b"x")
    rootfs = image(tmp_path, {"inmate": "/boot/link.bin"})
    os.symlink("../../outside.bin", rootfs / "boot" / "link.bin")
    with pytest.raises(BootDescriptionError, match="resolves outside the image"):
        load_boot_description(rootfs)


def test_symlinked_directory_escaping_is_refused(tmp_path: Path) -> None:
    rootfs = image(tmp_path, {"inmate": "/img/boot.bin"})
    os.symlink("/", rootfs / "img")
    with pytest.raises(BootDescriptionError, match="absolute symlink"):
        load_boot_description(rootfs)


def test_a_description_behind_an_absolute_boot_link_is_not_in_the_image(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere", rootfs / "boot")
    assert find_boot_description(rootfs) is None
    with pytest.raises(BootDescriptionError, match="boot description directory '/boot': /boot is an absolute symlink"):
        load_boot_description(rootfs)


def test_the_description_itself_linking_out_is_refused(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "boot").mkdir(parents=True)
    (tmp_path / "host.json").write_text("{}")
    os.symlink(tmp_path / "host.json", rootfs / "boot" / "config.json")
    with pytest.raises(BootDescriptionError, match="absolute symlink"):
        find_boot_description(rootfs)


def test_relative_symlinks_inside_are_followed(tmp_path: Path) -> None:
    rootfs = image(tmp_path, {"inmate": "/boot/current"}, files=("images/v2/zephyr.bin",))
    os.symlink("../images/v2/zephyr.bin", rootfs / "boot" / "current")
    assert load_boot_description(rootfs).inmate == rootfs / "images" / "v2" / "zephyr.bin"


def test_symlink_loops_are_refused(tmp_path: Path) -> None:
    rootfs = image(tmp_path, {"inmate": "/boot/a"})
    os.symlink("b", rootfs / "boot" / "a")
    os.symlink("a", rootfs / "boot" / "b")
    with pytest.raises(BootDescriptionError, match="too many levels of symbolic links"):
        load_boot_description(rootfs)


def test_resolution_never_leaves_the_root(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "a").mkdir(parents=True)
    os.symlink("../../..", rootfs / "a" / "up")
    with pytest.raises(BootDescriptionError, match="outside the image"):
        resolve_in_rootfs(rootfs, "/a/up/etc/passwd", "inmate")
    assert resolve_in_rootfs(rootfs, "a/./x", "inmate") == rootfs / "a" / "x"
