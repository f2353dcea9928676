"""mkzic's image archive against the real containerd: import, list, check, unpack.

Uses the private containerd fixture (tests/conftest.py); skips only when it does.
The image is arm64, so import names the platform (this may be an x86 host).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.mkzic.cli import main as mkzic_main

pytestmark = pytest.mark.containerd

PLATFORM = "linux/arm64"
INMATE = b"\x1f\x20\x03\xd5" * 64 + b"zic-image-test"


def build_archive(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A hello-style ZIC archive named ``name``; returns (archive, inmate file)."""
    inmate = tmp_path / "hello.bin"
    inmate.write_bytes(INMATE)
    archive = tmp_path / "hello.tar"
    assert mkzic_main(["--inmate", str(inmate), "--os-var", "baremetal", "--starting-vaddress", "0x70000000",
                       "--memory", "16", "--vcpus", "1", "--archive", str(archive), "--name", name]) == 0
    return archive, inmate


def manifest_digest(archive: Path) -> str:
    import tarfile

    with tarfile.open(archive) as tar:
        return json.loads(tar.extractfile("index.json").read())["manifests"][0]["digest"]


def ok(result) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    return result.stdout.decode()


@pytest.fixture
def imported(containerd, tmp_path: Path):
    """The archive imported into the private containerd; removed afterwards."""
    name = f"mkzic-test/{tmp_path.name.lower().replace('_', '-')}:1"
    archive, _ = build_archive(tmp_path, name)
    ok(containerd.ctr("images", "import", "--platform", PLATFORM, str(archive)))
    full = f"docker.io/{name}"
    try:
        yield full, archive
    finally:
        containerd.ctr("images", "rm", "--sync", full)


def test_import_keeps_the_full_name_and_digest(containerd, imported) -> None:
    full, archive = imported
    listing = ok(containerd.ctr("images", "ls"))
    [row] = [line.split() for line in listing.splitlines() if line.startswith(full + " ")]
    assert row[1] == "application/vnd.oci.image.manifest.v1+json"
    assert row[2] == manifest_digest(archive)
    assert PLATFORM in row
    check = ok(containerd.ctr("images", "check", f"name=={full}"))
    [status] = [line.split() for line in check.splitlines() if line.startswith(full + " ")]
    assert status[3:5] == ["complete", "(2/2)"], check  # manifest's config + layer present
    assert status[-1] == "true", check  # unpacked into the snapshotter


def test_snapshot_unpacks_the_boot_description_and_inmate(containerd, imported, tmp_path: Path) -> None:
    full, _ = imported
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    ok(containerd.ctr("images", "mount", "--platform", PLATFORM, full, str(mountpoint)))
    try:
        description = json.loads((mountpoint / "boot/config.json").read_bytes())
        inmate = (mountpoint / "boot/hello.bin").read_bytes()
        entries = sorted(p.relative_to(mountpoint).as_posix() for p in mountpoint.rglob("*"))
    finally:
        ok(containerd.ctr("images", "unmount", "--rm", str(mountpoint)))
    assert description == {"os_var": "baremetal", "inmate": "/boot/hello.bin",
                           "starting_vaddress": "0x70000000", "memory": 16, "vcpus": 1}
    assert inmate == INMATE
    assert entries == ["boot", "boot/config.json", "boot/hello.bin"]


def test_import_without_platform_on_a_foreign_host_is_refused_not_corrupted(containerd, tmp_path: Path) -> None:
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("on an arm64 host the default platform matches the image")
    archive, _ = build_archive(tmp_path, "mkzic-test/foreign:1")
    result = containerd.ctr("images", "import", str(archive))
    assert result.returncode != 0
    assert b"filtered out" in result.stderr
    assert "docker.io/mkzic-test/foreign:1" not in ok(containerd.ctr("images", "ls", "-q"))
