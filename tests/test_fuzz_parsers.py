"""Property tests: the parsers that read strangers' bytes never fail with anything but their
own error class — no IndexError, struct.error, UnicodeDecodeError or RecursionError escapes.

Covers config.json (runphi.oci), the image's boot description (runphi.image) and the
binary `.cell` reader (cellconfig.read_cell), from random bytes, from random JSON
values, and from mutations (truncation, bit flips, splices) of valid documents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runphi.backends.jailhouse.cellconfig import PROFILES, read_cell, write_cell
from runphi.backends.jailhouse.errors import CellConfigError
from runphi.errors import BundleError
from runphi.image import BootDescription, BootDescriptionError, parse_boot_description
from runphi.oci import Config, read_config

SETTINGS = settings(max_examples=int(os.environ.get("RUNPHI_FUZZ_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) \
    | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)

CONFIG_KEYS = ["ociVersion", "process", "root", "annotations", "hooks", "linux", "hostname"]
BOOT_KEYS = ["os_var", "inmate", "starting_vaddress", "kernel", "dtb", "initrd", "ramdisk", "cpio", "net",
             "netconf", "rpu_req", "memory", "vcpus", "vcpu_pinning"]

GOOD_CONFIG = {"ociVersion": "1.0.2", "process": {"terminal": False, "args": ["/boot/boot.bin"], "cwd": "/"},
               "root": {"path": "rootfs"}, "annotations": {"org.runphi.runtime": "runphi"},
               "linux": {"resources": {"cpu": {"cpus": "1-2"}, "memory": {"limit": 67108864}}}}
GOOD_BOOT = {"os_var": "baremetal", "inmate": "/boot/boot.bin", "starting_vaddress": "0x70000000",
             "memory": 16, "vcpus": 1, "vcpu_pinning": [{"vcpu": 0, "pcpu": 2}]}


def keyed_documents(keys: list[str], good: dict) -> st.SearchStrategy[bytes]:
    """Documents with the real keys holding random JSON values (type confusion)."""
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys)).map(
        lambda changes: json.dumps({**good, **changes}).encode())


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, byte overwrites and splices of a valid document."""
    cut = st.integers(0, len(valid)).map(lambda n: valid[:n])
    flip = st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
        lambda p: valid[:p[0]] + bytes([p[1]]) + valid[p[0] + 1:])
    splice = st.tuples(st.integers(0, len(valid)), st.binary(max_size=16)).map(
        lambda p: valid[:p[0]] + p[1] + valid[p[0]:])
    return cut | flip | splice


def any_bytes(valid: bytes, keys: list[str], good: dict) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=512) | mutations(valid) | keyed_documents(keys, good) \
        | json_values.map(lambda v: json.dumps(v).encode())


# --- config.json --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-bundle")


@SETTINGS
@given(data=any_bytes(json.dumps(GOOD_CONFIG).encode(), CONFIG_KEYS, GOOD_CONFIG))
@example(data=b'{"ociVersion": "\xff"}')
@example(data=b"[" * 50_000)
def test_config_json_reader_only_raises_bundle_error(bundle_dir: Path, data: bytes):
    (bundle_dir / "config.json").write_bytes(data)
    try:
        raw, config = read_config(bundle_dir)
    except BundleError as exc:
        assert "\n" not in str(exc).strip(), "an error must be one line"
        return
    assert isinstance(config, Config) and raw == data


# --- boot description ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-rootfs")
    (root / "boot").mkdir()
    (root / "boot" / "boot.bin").write_bytes(b"\0" * 64)
    (root / "boot" / "config.json").write_text("{}")
    (root / "boot" / "up").symlink_to("../..")
    (root / "boot" / "abs").symlink_to("/etc/hostname")
    return root


path_like = st.sampled_from(["/boot/boot.bin", "/boot/up/etc/hostname", "/boot/abs", "../../etc/hostname",
                             "/boot/../boot/boot.bin", "/boot/boot.bin\0", "", "/", "/boot"]) \
    | st.text(alphabet="/.ab\0", max_size=20)


@SETTINGS
@given(data=any_bytes(json.dumps(GOOD_BOOT).encode(), BOOT_KEYS, GOOD_BOOT)
       | st.fixed_dictionaries({}, optional={k: path_like for k in ("inmate", "kernel", "dtb", "initrd")})
       .map(lambda d: json.dumps(d).encode()))
@example(data=b'{"memory": 1' + b"0" * 40 + b"}")
@example(data=b'{"inmate": "/boot/abs"}')
def test_boot_description_parser_only_raises_its_error(rootfs: Path, data: bytes):
    try:
        boot = parse_boot_description(data, rootfs, rootfs / "boot" / "config.json")
    except BootDescriptionError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert isinstance(boot, BootDescription)
    root = os.path.realpath(rootfs)
    for path in (boot.inmate, boot.kernel, boot.dtb, boot.initrd):
        if path is not None:
            # Whatever it accepted resolves inside the image: no host file can be named.
            assert os.path.realpath(path).startswith(root + os.sep), path
    assert boot.memory_mib is None or boot.memory_mib > 0
    assert boot.vcpus is None or boot.vcpus > 0


# --- the .cell reader ---------------------------------------------------------------------

def vectors() -> list[bytes]:
    """The shipped `.cell` vectors from the reference material (none when it is absent:
    the cells written below still give every profile a valid starting point)."""
    from tests.conftest import REPO_ROOT

    shared = Path(os.environ.get("RUNPHI_SHARED") or REPO_ROOT.parent / "shared")
    return [p.read_bytes() for p in sorted((shared / "vectors").glob("*.cell"))]


VECTORS = vectors()


def _written_cells() -> list[bytes]:
    """One cell of our own per profile (valid inputs that need no shared material)."""
    from runphi.backends.jailhouse import cellconfig as cc

    config = cc.CellConfig(name="fuzz", architecture=cc.Architecture.ARM64, cpus=frozenset({1}), memory_regions=(
        cc.MemoryRegion(phys_start=0x50000000, virt_start=0x70000000, size=0x100000, flags=cc.MEM_READ),))
    return [write_cell(config, profile) for profile in PROFILES.values()]


VALID_CELLS = VECTORS + _written_cells()


@SETTINGS
@given(data=st.binary(max_size=2048) | st.sampled_from(VALID_CELLS).flatmap(mutations),
       profile=st.none() | st.sampled_from(sorted(PROFILES)))
def test_cell_reader_only_raises_cell_config_error(data: bytes, profile: str | None):
    try:
        read_cell(data, PROFILES[profile] if profile else None)
    except CellConfigError as exc:
        assert str(exc)


@pytest.mark.parametrize("index", range(len(VALID_CELLS)))
def test_every_valid_cell_still_reads(index: int):
    read_cell(VALID_CELLS[index])
