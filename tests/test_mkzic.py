"""mkzic: boot descriptions, bundles and OCI image archives (no containerd needed).

The archive checks re-derive everything from the raw bytes with the standard
library (tarfile, gzip, hashlib, json) instead of mkzic's own models, so a
wrong model cannot confirm itself.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runphi.image import BootDescriptionFile
from tools.mkzic import (
    BootDescription,
    Description,
    MkzicError,
    assemble,
    build_image_archive,
    decode_description,
    encode_description,
    parse_image_name,
)
from tools.mkzic.cli import main
from tools.mkzic.tarball import gzip_bytes, tar_bytes

REPO = Path(__file__).resolve().parent.parent
INMATE = bytes(range(256)) * 3 + b"\x00\x00\xa0\xe3"
HELLO_FLAGS = ["--os-var", "baremetal", "--starting-vaddress", "0x70000000", "--memory", "16", "--vcpus", "1"]


def run_mkzic(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a fresh interpreter, as users do."""
    return subprocess.run(
        [sys.executable, "-m", "tools.mkzic", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


@pytest.fixture
def inmate(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "hello.bin"
    path.parent.mkdir()
    path.write_bytes(INMATE)
    return path


def read_layout(archive: Path) -> dict[str, bytes]:
    """Every regular file of an archive by name."""
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def blob(files: dict[str, bytes], digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    assert algorithm == "sha256"
    return files[f"blobs/sha256/{hexdigest}"]


def check_descriptor(files: dict[str, bytes], descriptor: dict, media_type: str) -> bytes:
    """The blob a descriptor points at, after checking its media type, size and digest."""
    assert descriptor["mediaType"] == media_type
    data = blob(files, descriptor["digest"])
    assert len(data) == descriptor["size"]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
    return data


# --- determinism -------------------------------------------------------------


def test_two_builds_give_identical_bytes(tmp_path: Path, inmate: Path) -> None:
    first = run_mkzic("--inmate", inmate, *HELLO_FLAGS, "--archive", tmp_path / "a.tar", "--name", "hello:1")
    os.utime(inmate, (1_000_000, 1_000_000))  # a different mtime on the input must not matter
    second = run_mkzic("--inmate", inmate, *HELLO_FLAGS, "--archive", tmp_path / "b.tar", "--name", "hello:1")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = (tmp_path / "a.tar").read_bytes(), (tmp_path / "b.tar").read_bytes()
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    assert first.stdout.split()[:3] == second.stdout.split()[:3]


def test_different_inputs_give_different_digests(tmp_path: Path, inmate: Path) -> None:
    zic = assemble(Description(known=BootDescriptionFile(memory=16)), {"inmate": inmate})
    inmate.write_bytes(INMATE + b"\x01")
    other = assemble(Description(known=BootDescriptionFile(memory=16)), {"inmate": inmate})
    name = parse_image_name("hello")
    assert build_image_archive(zic, name).manifest.digest != build_image_archive(other, name).manifest.digest


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.from_regex(r"boot/[a-z0-9_]{1,12}(\.[a-z]{1,3})?", fullmatch=True), st.binary(max_size=300), max_size=4))
def test_tar_and_gzip_are_pure_functions_of_their_entries(files: dict[str, bytes]) -> None:
    data = tar_bytes(files)
    assert data == tar_bytes(dict(files))
    assert gzip_bytes(data) == gzip_bytes(data)
    assert gzip.decompress(gzip_bytes(data)) == data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert {m.name: tar.extractfile(m).read() for m in members if m.isfile()} == files
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)


# --- archive structure -------------------------------------------------------


def test_archive_is_a_valid_oci_layout(tmp_path: Path, inmate: Path) -> None:
    archive = tmp_path / "hello.tar"
    result = run_mkzic("--inmate", inmate, *HELLO_FLAGS, "--archive", archive, "--name", "hello")
    assert result.returncode == 0, result.stderr
    files = read_layout(archive)

    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/"):
            assert name == "blobs/sha256/" + hashlib.sha256(data).hexdigest()

    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [entry] = index["manifests"]
    assert entry["annotations"] == {
        "io.containerd.image.name": "docker.io/library/hello:latest",
        "org.opencontainers.image.ref.name": "latest",
    }
    assert entry["platform"] == {"architecture": "arm64", "os": "linux"}
    assert result.stdout.split() == ["image", "docker.io/library/hello:latest", entry["digest"], str(archive)]

    manifest = json.loads(check_descriptor(files, entry, "application/vnd.oci.image.manifest.v1+json"))
    assert manifest["schemaVersion"] == 2
    config = json.loads(check_descriptor(files, manifest["config"], "application/vnd.oci.image.config.v1+json"))
    [layer_descriptor] = manifest["layers"]
    layer_gz = check_descriptor(files, layer_descriptor, "application/vnd.oci.image.layer.v1.tar+gzip")

    assert (config["architecture"], config["os"]) == ("arm64", "linux")
    assert config["config"]["Cmd"] == ["/boot/hello.bin"]
    layer = gzip.decompress(layer_gz)
    assert layer_gz[4:8] == b"\x00\x00\x00\x00"  # gzip header mtime
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}

    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["boot", "boot/config.json", "boot/hello.bin"]
        assert members["boot"].isdir()
        assert tar.extractfile("boot/hello.bin").read() == INMATE
        description = json.loads(tar.extractfile("boot/config.json").read())
    assert description == {
        "os_var": "baremetal",
        "inmate": "/boot/hello.bin",
        "starting_vaddress": "0x70000000",
        "memory": 16,
        "vcpus": 1,
    }


def test_arch_flag_sets_config_and_index_platform(tmp_path: Path, inmate: Path) -> None:
    archive = tmp_path / "x.tar"
    assert main(["--inmate", str(inmate), "--archive", str(archive), "--name", "team/zic:2", "--arch", "amd64"]) == 0
    files = read_layout(archive)
    [entry] = json.loads(files["index.json"])["manifests"]
    assert entry["platform"]["architecture"] == "amd64"
    assert entry["annotations"]["io.containerd.image.name"] == "docker.io/team/zic:2"
    manifest = json.loads(blob(files, entry["digest"]))
    assert json.loads(blob(files, manifest["config"]["digest"]))["architecture"] == "amd64"


# --- bundle ------------------------------------------------------------------


def test_bundle_config_is_an_oci_runtime_config(tmp_path: Path, inmate: Path) -> None:
    bundle = tmp_path / "hello"
    result = run_mkzic(
        "--inmate", inmate, *HELLO_FLAGS, "--bundle", bundle,
        "--cpus", "1.5", "--cpuset", "2-3", "--memory-limit", "64",
        "--annotation", "org.runphi.runtime=runphi", "--terminal",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"bundle {bundle}\n"
    spec = json.loads((bundle / "config.json").read_bytes())
    assert spec["ociVersion"].startswith("1.0.")
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    assert spec["process"]["args"] == ["/boot/hello.bin"]
    assert spec["process"]["cwd"] == "/"
    assert spec["process"]["terminal"] is True
    assert spec["process"]["user"] == {"uid": 0, "gid": 0}
    assert spec["annotations"] == {"org.runphi.runtime": "runphi"}
    assert spec["hostname"] == "hello"
    assert spec["linux"]["resources"] == {
        "cpu": {"quota": 150000, "period": 100000, "cpus": "2-3"},
        "memory": {"limit": 64 * 1024 * 1024},
    }
    assert (bundle / "rootfs/boot/hello.bin").read_bytes() == INMATE
    assert json.loads((bundle / "rootfs/boot/config.json").read_bytes())["inmate"] == "/boot/hello.bin"

    from runphi.oci import load_config  # the runtime's own reading of the same file

    config = load_config(bundle)
    assert config.rootfs(bundle) == bundle / "rootfs"
    assert config.process.terminal is True
    assert (config.linux.resources.cpu.quota, config.linux.resources.cpu.period) == (150000, 100000)
    assert config.linux.resources.memory.limit == 64 * 1024 * 1024
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "rootfs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hello", "in"]  # no staging left behind


def test_bundle_without_resource_flags_has_no_resources(tmp_path: Path, inmate: Path) -> None:
    assert main(["--inmate", str(inmate), "--bundle", str(tmp_path / "b")]) == 0
    spec = json.loads((tmp_path / "b/config.json").read_bytes())
    assert "resources" not in spec["linux"]
    assert "annotations" not in spec
    assert spec["process"]["terminal"] is False


def test_bundle_and_archive_carry_the_same_description(tmp_path: Path, inmate: Path) -> None:
    assert main(["--inmate", str(inmate), *HELLO_FLAGS, "--bundle", str(tmp_path / "b"),
                 "--archive", str(tmp_path / "a.tar"), "--name", "hello"]) == 0
    files = read_layout(tmp_path / "a.tar")
    [entry] = json.loads(files["index.json"])["manifests"]
    manifest = json.loads(blob(files, entry["digest"]))
    layer = gzip.decompress(blob(files, manifest["layers"][0]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        in_image = tar.extractfile("boot/config.json").read()
    assert in_image == (tmp_path / "b/rootfs/boot/config.json").read_bytes()


# --- boot descriptions -------------------------------------------------------


def test_config_file_keeps_its_paths_and_unknown_fields(tmp_path: Path, inmate: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "os_var": "zephyr",
        "inmate": "/boot/zephyr.bin",
        "starting_vaddress": "0x70000000",
        "memory": 8,
        "accelerators": [{"core": 0, "inmate": "/boot/acc.bin"}],
        "steer_irq": True,
    }))
    assert main(["--config", str(config), "--inmate", str(inmate), "--vcpus", "2", "--memory", "32",
                 "--bundle", str(tmp_path / "b")]) == 0
    rootfs = tmp_path / "b/rootfs"
    assert (rootfs / "boot/zephyr.bin").read_bytes() == INMATE
    assert not (rootfs / "boot/hello.bin").exists()
    written = json.loads((rootfs / "boot/config.json").read_bytes())
    assert written == {
        "os_var": "zephyr",
        "inmate": "/boot/zephyr.bin",
        "starting_vaddress": "0x70000000",
        "memory": 32,
        "vcpus": 2,
        "accelerators": [{"core": 0, "inmate": "/boot/acc.bin"}],
        "steer_irq": True,
    }


def test_linux_guest_files_land_in_boot(tmp_path: Path) -> None:
    for name in ("Image", "guest.dtb", "rootfs.cpio"):
        (tmp_path / name).write_bytes(name.encode())
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ramdisk": "/boot/initrd.img"}))
    assert main(["--config", str(config), "--os-var", "linux", "--inmate", str(tmp_path / "Image"),
                 "--dtb", str(tmp_path / "guest.dtb"), "--initrd", str(tmp_path / "rootfs.cpio"),
                 "--vcpu-pinning", "0:2,1:3", "--bundle", str(tmp_path / "b")]) == 0
    boot = tmp_path / "b/rootfs/boot"
    assert sorted(p.name for p in boot.iterdir()) == ["Image", "config.json", "guest.dtb", "initrd.img"]
    assert (boot / "initrd.img").read_bytes() == b"rootfs.cpio"
    written = json.loads((boot / "config.json").read_bytes())
    assert written == {
        "os_var": "linux",
        "inmate": "/boot/Image",
        "ramdisk": "/boot/initrd.img",
        "dtb": "/boot/guest.dtb",
        "vcpu_pinning": [{"vcpu": 0, "pcpu": 2}, {"vcpu": 1, "pcpu": 3}],
    }


def test_numeric_addresses_and_empty_paths_are_read_as_runphi_reads_them(tmp_path: Path, inmate: Path) -> None:
    description = decode_description(b'{"starting_vaddress": 1879048192, "kernel": "", "dtb": ""}', "t")
    zic = assemble(description, {"inmate": inmate})
    written = json.loads(zic.files["/boot/config.json"])
    assert written["starting_vaddress"] == 1879048192
    assert written["kernel"] == "" and written["dtb"] == ""
    assert sorted(zic.files) == ["/boot/config.json", "/boot/hello.bin"]


def test_description_decoding_types_fields_as_found_in_the_wild() -> None:
    description = decode_description(b'{"net": false, "rpu_req": true, "memory": 64, "future": {"x": 1}}', "t")
    assert description.known.net is False
    assert description.known.rpu_req is True
    assert list(description.passthrough) == ["future"]


# --- bad input: one line, exit 1, nothing written ----------------------------


@pytest.mark.parametrize(
    ("extra", "config", "expected"),
    [
        ([], None, "no inmate image given"),
        (["--inmate", "{inmate}"], {"dtb": "/boot/guest.dtb"}, "names dtb = /boot/guest.dtb but no such file"),
        (["--inmate", "{inmate}"], {"kernel": "/etc/passwd"}, "is not a file path under /boot/"),
        (["--inmate", "{inmate}"], {"inmate": "/boot/../etc/x"}, "is not a file path under /boot/"),
        (["--inmate", "{inmate}"], {"inmate": "/boot/config.json"}, "is the boot description itself"),
        (["--inmate", "{inmate}"], {"starting_vaddress": "0x7g000000"}, "is not an address"),
        (["--inmate", "{inmate}"], {"memory": "lots"}, "boot description"),
        (["--inmate", "{inmate}"], {"vcpus": 0}, "must be positive"),
        (["--inmate", "{inmate}", "--kernel", "{inmate}"], {}, "would both be /boot/hello.bin"),
        (["--inmate", "{missing}"], None, "cannot read the inmate file"),
        (["--inmate", "{inmate}", "--name", "Hello"], None, "invalid repository part"),
        (["--inmate", "{inmate}", "--name", "hello@sha256:00"], None, "has a digest"),
        (["--inmate", "{inmate}", "--memory", "-1"], None, "must be positive"),
        (["--inmate", "{inmate}", "--vcpu-pinning", "0-2"], None, "is not VCPU:PCPU"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_writes_nothing(
    tmp_path: Path, inmate: Path, extra: list[str], config: dict | None, expected: str
) -> None:
    args = [a.format(inmate=inmate, missing=tmp_path / "nope.bin") for a in extra]
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
        args += ["--config", str(tmp_path / "config.json")]
    if "--name" not in args:
        args += ["--name", "hello"]
    out = tmp_path / "out"
    out.mkdir()
    result = run_mkzic(*args, "--bundle", out / "b", "--archive", out / "a.tar")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mkzic: "), result.stderr
    assert expected in result.stderr
    assert list(out.iterdir()) == []


def test_existing_bundle_is_refused_and_left_untouched(tmp_path: Path, inmate: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "mine").write_text("keep")
    result = run_mkzic("--inmate", inmate, "--bundle", bundle)
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert [p.name for p in bundle.iterdir()] == ["mine"]


def test_failed_archive_write_removes_the_bundle_just_written(tmp_path: Path, inmate: Path) -> None:
    result = run_mkzic("--inmate", inmate, "--bundle", tmp_path / "b",
                       "--archive", tmp_path / "no-such-dir" / "a.tar", "--name", "hello")
    assert result.returncode == 1
    assert "cannot write image archive" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "nothing to build"),
        (["--archive", "a.tar"], "--archive needs an image name"),
        (["--archive", "a.tar", "--name", "x", "--cpus", "1"], "--cpus only apply to a bundle"),
        (["--bundle", "b", "--bogus"], "unrecognized arguments: --bogus"),
        (["--archive", "a.tar", "--name", "x", "--arch", "ARM 64"], "is not an OCI architecture name"),
    ],
)
def test_usage_mistakes_are_one_line_exit_1(tmp_path: Path, inmate: Path, args: list[str], expected: str) -> None:
    result = run_mkzic("--inmate", inmate, *args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --- image names -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "full"),
    [
        ("hello", "docker.io/library/hello:latest"),
        ("hello:1.0", "docker.io/library/hello:1.0"),
        ("team/zic", "docker.io/team/zic:latest"),
        ("docker.io/library/hello:v2", "docker.io/library/hello:v2"),
        ("localhost/zic:dev", "localhost/zic:dev"),
        ("registry.local:5000/a/b-c_d.e:1", "registry.local:5000/a/b-c_d.e:1"),
    ],
)
def test_image_names_normalise_like_containerd(name: str, full: str) -> None:
    assert parse_image_name(name).full() == full


@pytest.mark.parametrize("name", ["", "UPPER", "a//b", "a:", "a:-x", "-a", "a/b@sha256:1234", "reg.io/"])
def test_invalid_image_names_are_refused(name: str) -> None:
    with pytest.raises(MkzicError):
        parse_image_name(name)


@given(st.from_regex(r"([a-z0-9]{1,8}\.[a-z]{2,3}(:[0-9]{2,4})?/)?[a-z0-9]{1,8}(/[a-z0-9]{1,8})?(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,10})?", fullmatch=True))
def test_normalised_names_are_fixed_points(name: str) -> None:
    once = parse_image_name(name)
    assert parse_image_name(once.full()) == once


def test_description_struct_roundtrips_through_json() -> None:
    known = BootDescriptionFile(os_var="zephyr", memory=4, net="none")
    assert msgspec.json.decode(msgspec.json.encode(known), type=BootDescriptionFile) == known


def test_mkzic_writes_through_the_runtime_schema() -> None:
    assert BootDescription is BootDescriptionFile  # the old name stays for callers


def test_description_bytes_keep_schema_order_explicit_defaults_and_passthrough_last() -> None:
    """Pinned bytes: every field given out of order, some at the value runphi assumes when absent."""
    data = (b'{"rpu_req": false, "future": [1], "netconf": "", "net": "no", "vcpu_pinning": [], "vcpus": 1,'
            b' "memory": 8, "dtb": "/boot/d", "cpio": "/boot/c", "initrd": "/boot/i", "ramdisk": "/boot/r",'
            b' "kernel": null, "starting_vaddress": 4096, "inmate": "/boot/boot.bin", "os_var": ""}')
    assert encode_description(decode_description(data, "t")) == (
        b'{\n  "os_var": "",\n  "inmate": "/boot/boot.bin",\n  "starting_vaddress": 4096,\n  "ramdisk": "/boot/r",\n'
        b'  "initrd": "/boot/i",\n  "cpio": "/boot/c",\n  "dtb": "/boot/d",\n  "memory": 8,\n  "vcpus": 1,\n'
        b'  "vcpu_pinning": [],\n  "net": "no",\n  "netconf": "",\n  "rpu_req": false,\n  "future": [\n    1\n  ]\n}\n'
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"vcpu_pinning": [{"vcpu": 0, "pcpu": 2}, {"vcpu": 1, "pcpu": 3, "note": 1}]}',
         "boot description t: Object contains unknown field `note` - at `$.vcpu_pinning[1]`"),
        (b'{"os_var": null}', "boot description t: Expected `str`, got `null` - at `$.os_var`"),
    ],
)
def test_descriptions_runphi_would_refuse_or_mkzic_could_not_carry_are_refused(data: bytes, expected: str) -> None:
    with pytest.raises(MkzicError) as raised:
        decode_description(data, "t")
    assert raised.value.what == expected


def test_an_absurdly_nested_description_is_one_error_not_a_traceback() -> None:
    with pytest.raises(MkzicError) as raised:
        decode_description(b'{"future": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "t")
    assert raised.value.what == "boot description t nests too deeply to be a boot description"


def test_initrd_file_honours_a_cpio_path_and_missing_synonyms_point_at_initrd(tmp_path: Path, inmate: Path) -> None:
    (tmp_path / "r.cpio").write_bytes(b"cpio")
    description = decode_description(b'{"os_var": "linux", "cpio": "/boot/rootfs.cpio"}', "t")
    zic = assemble(description, {"inmate": inmate, "initrd": tmp_path / "r.cpio"})
    assert zic.files["/boot/rootfs.cpio"] == b"cpio"
    assert zic.description.known.initrd is None  # the file's name is already recorded as cpio
    with pytest.raises(MkzicError) as raised:
        assemble(decode_description(b'{"ramdisk": "/boot/r.img"}', "t"), {"inmate": inmate})
    assert "names ramdisk = /boot/r.img but no such file was given: pass --initrd FILE" in raised.value.line()


# --- what runphi reads back --------------------------------------------------


@pytest.mark.parametrize("linux", [False, True])
def test_runphi_reads_the_bundle_it_is_given(tmp_path: Path, inmate: Path, linux: bool) -> None:
    from runphi.image import load_boot_description

    args = ["--inmate", str(inmate), "--starting-vaddress", "0x70000000", "--memory", "24", "--vcpus", "2",
            "--vcpu-pinning", "0:2,1:3", "--bundle", str(tmp_path / "b")]
    if linux:
        (tmp_path / "g.dtb").write_bytes(b"dtb")
        (tmp_path / "r.cpio").write_bytes(b"cpio")
        args += ["--os-var", "linux", "--dtb", str(tmp_path / "g.dtb"), "--initrd", str(tmp_path / "r.cpio")]
    assert main(args) == 0
    rootfs = tmp_path / "b/rootfs"
    description = load_boot_description(rootfs)
    assert description.inmate == rootfs / "boot/hello.bin"
    assert description.starting_vaddress == 0x70000000
    assert (description.memory_mib, description.vcpus, description.pinned_cpus) == (24, 2, frozenset({2, 3}))
    assert description.is_linux is linux
    assert description.dtb == (rootfs / "boot/g.dtb" if linux else None)
    assert description.initrd == (rootfs / "boot/r.cpio" if linux else None)
    assert description.ignored_keys == ()
