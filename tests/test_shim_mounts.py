"""runphi.shim.mounts: containerd's rootfs mounts, and the read-only snapshot view of ``shim start``.

Option parsing, the view's mount list and ``ctr`` output parsing are pure. The rest mounts
for real (root only) and checks /proc/self/mountinfo; the snapshot view runs against a
private containerd (tests/conftest.py's fixture) with an imported ZIC image and a plain one.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import stat
from pathlib import Path

import pytest

from runphi.image import find_boot_description
from runphi.shim.mounts import (
    MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT, MS_SHARED,
    MountError, MountSpec, ctr_binary, mount_all, parse_ctr_mounts, parse_mount_options, read_only_view,
    snapshot_view, unmount_all,
)
from tools.testbed.containerd import NAMESPACE

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def mounted(target: Path) -> list[list[str]]:
    """The /proc/self/mountinfo lines whose mount point is ``target`` (split into fields)."""
    wanted = os.path.realpath(target)
    with open("/proc/self/mountinfo") as info:
        lines = [line.split() for line in info]
    # Mount points are octal-escaped (\040 for a space); tmp paths here have none.
    return [fields for fields in lines if fields[4] == wanted]


def mounted_under(directory: Path) -> list[str]:
    """Every mount point at or below ``directory``."""
    prefix = os.path.realpath(directory)
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4] for line in info]
    return [point for point in points if point == prefix or point.startswith(prefix + "/")]


@pytest.fixture
def target(tmp_path: Path):
    """An empty directory to mount on; whatever a test leaves mounted is taken down (and reported)."""
    path = tmp_path / "target"
    path.mkdir()
    yield path
    leftovers = mounted_under(tmp_path)
    unmount_all(path)
    assert not leftovers, f"left mounted: {leftovers}"


def layer(base: Path, name: str, files: dict[str, str]) -> Path:
    """A directory ``base/name`` holding ``files`` (path → text)."""
    directory = base / name
    directory.mkdir(parents=True)
    for relative, text in files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    return directory


# ---- option parsing --------------------------------------------------------------------------


def test_overlay_options_are_all_data_in_order():
    options = ["index=off", "workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs"]
    parsed = parse_mount_options(options)
    assert (parsed.flags, parsed.propagation) == (0, 0)
    assert parsed.data == "index=off,workdir=/s/2/work,upperdir=/s/2/fs,lowerdir=/s/1/fs"


def test_bind_options_are_flags():
    parsed = parse_mount_options(["rbind", "ro"])
    assert parsed.flags == MS_BIND | MS_REC | MS_RDONLY
    assert parsed.data == ""
    assert parse_mount_options(["bind", "rw"]).flags == MS_BIND


def test_flags_and_data_mixed():
    parsed = parse_mount_options(["nosuid", "size=64k", "nodev", "noexec", "mode=755", "relatime", "defaults"])
    assert parsed.flags == MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME
    assert parsed.data == "size=64k,mode=755"  # "defaults" means nothing, and is no data either


def test_later_words_win():
    assert parse_mount_options(["ro", "rw"]).flags == 0
    assert parse_mount_options(["rw", "ro"]).flags == MS_RDONLY
    assert parse_mount_options(["nosuid", "suid", "noexec", "exec"]).flags == 0
    assert parse_mount_options(["remount", "ro"]).flags == MS_REMOUNT | MS_RDONLY


def test_propagation_is_kept_apart_from_the_flags():
    parsed = parse_mount_options(["rbind", "rprivate"])
    assert parsed.flags == MS_BIND | MS_REC
    assert parsed.propagation == MS_PRIVATE | MS_REC
    assert parse_mount_options(["shared"]).propagation == MS_SHARED


def test_loop_is_refused_with_one_line():
    with pytest.raises(MountError, match="^mount option \"loop\" is not supported"):
        parse_mount_options(["loop", "ro"])


# ---- the read-only view's mounts -------------------------------------------------------------


def test_overlay_view_puts_the_upper_first_and_drops_upper_and_work():
    snapshot = MountSpec("overlay", "overlay", ["index=off", "workdir=/s/3/work", "upperdir=/s/3/fs",
                                                "lowerdir=/s/2/fs:/s/1/fs"])
    assert read_only_view([snapshot]) == [
        MountSpec("overlay", "overlay", ["index=off", "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs", "ro"])]


def test_view_of_a_lone_layer_is_a_read_only_bind():
    assert read_only_view([MountSpec("overlay", "overlay", ["lowerdir=/s/1/fs"])]) == [
        MountSpec("bind", "/s/1/fs", ["rbind", "ro"])]


def test_view_of_a_bind_snapshot_is_read_only():
    assert read_only_view([MountSpec("bind", "/s/native/2", ["rbind", "rw"])]) == [
        MountSpec("bind", "/s/native/2", ["rbind", "ro"])]


# ---- ctr's output ----------------------------------------------------------------------------


def test_ctr_mount_lines_are_parsed():
    output = ("mount -t overlay overlay /tmp/v -o index=off,workdir=/r/2/work,upperdir=/r/2/fs,lowerdir=/r/1/fs\n"
              "mount -t bind /r/native/2 /tmp/v -o rbind,rw\n")
    assert parse_ctr_mounts(output, "/tmp/v") == [
        MountSpec("overlay", "overlay", ["index=off", "workdir=/r/2/work", "upperdir=/r/2/fs", "lowerdir=/r/1/fs"]),
        MountSpec("bind", "/r/native/2", ["rbind", "rw"]),
    ]


def test_ctr_mount_line_with_spaces_in_source_and_target():
    output = "mount -t bind /var/lib/my root/snap 2 /tmp/my view -o rbind,rw\n"
    assert parse_ctr_mounts(output, "/tmp/my view") == [MountSpec("bind", "/var/lib/my root/snap 2", ["rbind", "rw"])]


def test_ctr_mount_line_without_options():
    assert parse_ctr_mounts("mount -t tmpfs tmpfs /v -o \n", "/v") == [MountSpec("tmpfs", "tmpfs", [])]


@pytest.mark.parametrize("output", ["", "\n", "umount /v\n", "mount -t overlay overlay /elsewhere -o x\n"])
def test_unparsable_ctr_output_is_one_line_error(output):
    with pytest.raises(MountError) as raised:
        parse_ctr_mounts(output, "/v")
    assert "\n" not in str(raised.value)


def test_ctr_binary_next_to_containerd(tmp_path):
    (tmp_path / "containerd").write_text("")
    ctr = tmp_path / "ctr"
    ctr.write_text("#!/bin/sh\n")
    ctr.chmod(0o755)
    assert ctr_binary(str(tmp_path / "containerd")) == str(ctr)


def test_ctr_binary_falls_back_to_path(tmp_path):
    on_path = shutil.which("ctr") or "ctr"
    (tmp_path / "ctr").write_text("not executable")
    assert ctr_binary(str(tmp_path / "containerd")) == on_path
    assert ctr_binary("containerd") == on_path  # relative: not resolved against the cwd (the bundle)
    assert ctr_binary("") == on_path


# ---- real mounts -----------------------------------------------------------------------------


@needs_root
def test_overlay_of_two_directories(tmp_path, target):
    lower = layer(tmp_path, "lower", {"a": "lower a", "b": "lower b"})
    upper = layer(tmp_path, "upper", {"b": "upper b"})
    work = tmp_path / "work"
    work.mkdir()
    mount_all([MountSpec("overlay", "overlay", ["index=off", f"workdir={work}", f"upperdir={upper}",
                                                f"lowerdir={lower}"])], target)
    [fields] = mounted(target)
    assert fields[fields.index("-") + 1] == "overlay"
    assert (target / "a").read_text() == "lower a"
    assert (target / "b").read_text() == "upper b"
    (target / "c").write_text("new")
    assert (upper / "c").read_text() == "new"
    unmount_all(target)
    assert mounted(target) == []
    assert list(target.iterdir()) == []


@needs_root
def test_read_only_bind(tmp_path, target):
    source = layer(tmp_path, "source", {"file": "hello"})
    mount_all([MountSpec("bind", str(source), ["rbind", "ro"])], target)
    [fields] = mounted(target)
    assert fields[5].split(",")[0] == "ro"  # per-mount options
    assert (target / "file").read_text() == "hello"
    with pytest.raises(OSError) as raised:
        (target / "new").write_text("x")
    assert raised.value.errno == errno.EROFS
    unmount_all(target)
    assert mounted(target) == []


@needs_root
def test_propagation_gets_its_own_call(tmp_path, target):
    source = layer(tmp_path, "source", {})
    mount_all([MountSpec("bind", str(source), ["rbind", "rw", "shared"])], target)
    [fields] = mounted(target)
    assert any(field.startswith("shared:") for field in fields[6:fields.index("-")]), fields
    mount_all([MountSpec("bind", str(source), ["remount", "private"])], target)  # stacks nothing
    [fields] = mounted(target)
    assert not any(field.startswith("shared:") for field in fields[6:fields.index("-")]), fields
    unmount_all(target)
    assert mounted(target) == []


@needs_root
def test_a_failing_mount_unmounts_the_ones_before_it(tmp_path, target):
    first = layer(tmp_path, "first", {"file": "x"})
    mounts = [MountSpec("bind", str(first), ["rbind", "rw"]),
              MountSpec("bind", str(first), ["rbind", "ro"]),
              MountSpec("overlay", "overlay", [f"lowerdir={tmp_path / 'missing'}:{first}"])]
    with pytest.raises(MountError) as raised:
        mount_all(mounts, target)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"cannot mount overlay overlay (options lowerdir={tmp_path / 'missing'}:")
    assert message.endswith(f"on {target}: No such file or directory")
    assert mounted_under(tmp_path) == []


@needs_root
def test_a_missing_target_fails_cleanly(tmp_path):
    source = layer(tmp_path, "source", {})
    with pytest.raises(MountError, match=r"on .*/nowhere: No such file or directory$"):
        mount_all([MountSpec("bind", str(source), ["rbind"])], tmp_path / "nowhere")
    assert mounted_under(tmp_path) == []


@needs_root
def test_unmount_all_is_idempotent(tmp_path, target):
    unmount_all(target)  # nothing mounted
    unmount_all(tmp_path / "does-not-exist")
    source = layer(tmp_path, "source", {})
    mount_all([MountSpec("bind", str(source), ["rbind"])], target)
    unmount_all(target)
    unmount_all(target)
    assert mounted(target) == []


@needs_root
def test_unmount_all_takes_down_a_stack(tmp_path, target):
    for index in range(3):
        source = layer(tmp_path, f"source{index}", {"which": str(index)})
        mount_all([MountSpec("bind", str(source), ["rbind"])], target)
    assert (target / "which").read_text() == "2"
    assert len(mounted(target)) == 3
    unmount_all(target)
    assert mounted(target) == []


@needs_root
def test_a_busy_mount_is_detached(tmp_path, target):
    source = layer(tmp_path, "source", {"file": "still readable"})
    mount_all([MountSpec("bind", str(source), ["rbind"])], target)
    with open(target / "file") as held:
        unmount_all(target)
        assert mounted(target) == []
        assert held.read() == "still readable"


@needs_root
def test_overlay_options_longer_than_a_page(tmp_path, target):
    depth = 60
    layers = [layer(tmp_path / ("long-directory-name-" * 3), f"layer-{index:03d}", {f"f{index}": str(index)})
              for index in range(depth)]
    options = ["lowerdir=" + ":".join(str(path) for path in layers)]
    assert len(options[0]) > os.sysconf("SC_PAGE_SIZE")
    fds_before = set(os.listdir("/proc/self/fd"))
    mount_all([MountSpec("overlay", "overlay", options)], target)
    assert sorted(path.name for path in target.iterdir()) == sorted(f"f{index}" for index in range(depth))
    assert set(os.listdir("/proc/self/fd")) == fds_before  # the layers' descriptors are closed again
    unmount_all(target)


@needs_root
def test_read_only_view_of_an_overlay_writes_nothing(tmp_path, target):
    lower = layer(tmp_path, "lower", {"boot/config.json": "{}", "kept": "lower", "changed": "lower"})
    upper = layer(tmp_path, "upper", {"changed": "upper"})
    os.mknod(upper / "kept", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # an overlay whiteout: deleted
    work = tmp_path / "work"
    work.mkdir()
    snapshot = MountSpec("overlay", "overlay", ["index=off", f"workdir={work}", f"upperdir={upper}",
                                                f"lowerdir={lower}"])
    mount_all(read_only_view([snapshot]), target)
    assert (target / "changed").read_text() == "upper"
    assert not (target / "kept").exists()
    assert find_boot_description(target) == target / "boot/config.json"
    with pytest.raises(OSError) as raised:
        (target / "boot/new").write_text("x")
    assert raised.value.errno == errno.EROFS
    unmount_all(target)
    assert sorted(path.name for path in upper.iterdir()) == ["changed", "kept"]
    assert list(work.iterdir()) == []


# ---- the snapshot view against containerd ----------------------------------------------------

GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def host_image(path: Path, name: str, zic: bool) -> Path:
    """An image archive for this host's platform (``ctr containers create`` has no ``--platform``).

    The ZIC is mkzic's; the plain image reuses mkzic's packer on contents without a
    boot description (a /boot that holds something else, to be sure that is not enough).
    """
    from tools.mkzic import (BootDescription, Description, ZicContents, assemble, build_image_archive,
                             parse_image_name, write_archive)

    if zic:
        inmate = path.parent / f"{name}.bin"
        inmate.write_bytes(b"\x1f\x20\x03\xd5" * 16)
        contents = assemble(Description(known=BootDescription(os_var="baremetal", starting_vaddress="0x70000000",
                                                              memory=16, vcpus=1)), {"inmate": inmate})
    else:
        contents = ZicContents(description=Description(known=BootDescription()),
                               files={"/boot/vmlinuz": b"not a ZIC", "/etc/hostname": b"plain\n"},
                               process_args=["/bin/true"])
    machine = platform.machine()
    archive = build_image_archive(contents, parse_image_name(f"{name}:1"), GO_ARCH.get(machine, machine))
    return write_archive(path, archive)


@pytest.fixture(scope="module")
def images(containerd, tmp_path_factory):
    """A ZIC image and a plain image imported into the private containerd: name by kind."""
    directory = tmp_path_factory.mktemp("images")
    names = {"zic": "docker.io/library/view-zic:1", "plain": "docker.io/library/view-plain:1"}
    for kind, name in names.items():
        archive = host_image(directory / f"{kind}.tar", name.split("/")[-1].removesuffix(":1"), kind == "zic")
        imported = containerd.ctr("images", "import", str(archive))
        assert imported.returncode == 0, imported.stderr
    yield names
    for name in names.values():
        containerd.ctr("images", "rm", "--sync", name)


@pytest.fixture
def container(containerd):
    """Factory: ``container(id, *create_args)`` makes a container record (no task); all removed afterwards."""
    made = []

    def create(cid: str, *args: str) -> str:
        created = containerd.ctr("containers", "create", *args, cid)
        assert created.returncode == 0, created.stderr
        made.append(cid)
        return cid

    yield create
    for cid in made:
        containerd.ctr("containers", "delete", cid)


def open_view(containerd, cid: str):
    return snapshot_view(ctr_binary(shutil.which("containerd") or ""), str(containerd.address), NAMESPACE, cid)


def upper_dir(containerd, snapshotter: str, cid: str) -> Path | None:
    """The snapshot's writable directory, from containerd (to check the view wrote nothing)."""
    listing = containerd.ctr("snapshots", "--snapshotter", snapshotter, "mounts", "/t", cid)
    [spec] = parse_ctr_mounts(listing.stdout.decode(), "/t")
    uppers = [option.removeprefix("upperdir=") for option in spec.options if option.startswith("upperdir=")]
    return Path(uppers[0]) if uppers else Path(spec.source)


@needs_root
@pytest.mark.containerd
@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
@pytest.mark.parametrize("kind", ["zic", "plain"])
def test_snapshot_view_finds_the_boot_description_exactly_for_the_zic(containerd, images, container,
                                                                      kind, snapshotter):
    cid = container(f"view-{kind}-{snapshotter}", "--snapshotter", snapshotter, images[kind])
    writable = upper_dir(containerd, snapshotter, cid)
    before = sorted(writable.rglob("*"))
    with open_view(containerd, cid) as view:
        assert view is not None
        assert mounted(view) != []
        assert (view / "boot").is_dir()
        found = find_boot_description(view)
        if kind == "zic":
            assert found == view / "boot/config.json"
            assert json.loads(found.read_bytes())["os_var"] == "baremetal"
        else:
            assert found is None
            assert (view / "etc/hostname").read_text() == "plain\n"
    assert mounted_under(view) == []
    assert not view.exists()
    assert sorted(writable.rglob("*")) == before  # nothing was written into the snapshot


@needs_root
@pytest.mark.containerd
def test_snapshot_view_of_a_container_without_snapshot_is_none(containerd, container, tmp_path):
    rootfs = layer(tmp_path, "rootfs", {"boot/config.json": "{}"})
    cid = container("view-rootfs", "--rootfs", str(rootfs))
    with open_view(containerd, cid) as view:
        assert view is None


@needs_root
@pytest.mark.containerd
def test_snapshot_view_unmounts_when_the_block_raises(containerd, images, container):
    cid = container("view-raises", images["zic"])
    with pytest.raises(RuntimeError):
        with open_view(containerd, cid) as view:
            assert view is not None
            raise RuntimeError("the caller failed")
    assert mounted_under(view) == []
    assert not view.exists()


@needs_root
@pytest.mark.containerd
def test_snapshot_view_of_an_unknown_container_is_one_line_error(containerd):
    with pytest.raises(MountError) as raised:
        with open_view(containerd, "no-such-container"):
            pass
    message = str(raised.value)
    assert message.startswith("`ctr containers info no-such-container` failed: ")
    assert "not found" in message and "\n" not in message


def test_snapshot_view_without_ctr_is_one_line_error(tmp_path):
    with pytest.raises(MountError, match=r"^cannot run .*/no-ctr to ask containerd .*: No such file or directory$"):
        with snapshot_view(str(tmp_path / "no-ctr"), "/nonexistent.sock", "default", "c"):
            pass
