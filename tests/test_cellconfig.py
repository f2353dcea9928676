"""The `.cell` writer and reader: shipped vectors byte-exact, round trips, precise errors."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runphi.backends.jailhouse.cellconfig import (
    CELL_PASSIVE_COMMREG,
    CELL_VIRTUAL_CONSOLE_PERMITTED,
    MEM_COMM_REGION,
    PROFILES,
    AmbiguousCellConfigError,
    Architecture,
    CacheRegion,
    CellConfig,
    Console,
    IrqChip,
    MemoryRegion,
    PciCapability,
    PciDevice,
    PioRegion,
    QosDevice,
    get_profile,
    read_cell,
    write_cell,
)
from runphi.backends.jailhouse.cellrender import cell_to_c, describe_cell
from runphi.backends.jailhouse.errors import CellConfigError

SHARED = Path(os.environ.get("RUNPHI_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
VECTORS = SHARED / "vectors"
VECTOR_FILES = sorted(VECTORS.glob("*.cell")) if VECTORS.is_dir() else []
needs_vectors = pytest.mark.skipif(not VECTOR_FILES, reason=f"no .cell vectors in {VECTORS} (set RUNPHI_SHARED)")


def rev14_hashes() -> dict[str, tuple[int, str]]:
    """Cell name -> (size, sha256) of the upstream rev-14 builds, from the vectors README table."""
    text = (VECTORS / "README.md").read_text()
    rows = re.findall(r"^\| ([\w.-]+) \| (\d+) \| `([0-9a-f]{64})` \|$", text, re.M)
    return {name: (int(size), digest) for name, size, digest in rows}


@needs_vectors
@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.name)
def test_vector_reads_and_writes_back_identically(path: Path) -> None:
    data = path.read_bytes()
    profile, config = read_cell(data)
    assert profile.name == "runphi-rev13"
    assert write_cell(config, profile) == data


@needs_vectors
@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.name)
def test_vector_in_rev14_matches_upstream_build(path: Path) -> None:
    hashes = rev14_hashes()
    assert len(hashes) == 3
    _, config = read_cell(path.read_bytes())
    out = write_cell(msgspec.structs.replace(config, architecture=Architecture.ARM64), PROFILES["rev14"])
    size, digest = hashes[config.name]
    assert len(out) == size
    assert hashlib.sha256(out).hexdigest() == digest
    profile, again = read_cell(out)
    assert profile.name == "rev14"
    assert again == msgspec.structs.replace(config, architecture=Architecture.ARM64)


@needs_vectors
def test_zephyr_demo_decodes_field_by_field() -> None:
    _, c = read_cell((VECTORS / "runphi-fork-rev13-qemu-arm64-zephyr-demo.cell").read_bytes())
    assert c.name == "qemu-arm64-zephyr-demo"
    assert c.flags == CELL_PASSIVE_COMMREG | CELL_VIRTUAL_CONSOLE_PERMITTED
    assert c.cpus == {0, 1}
    assert (len(c.memory_regions), len(c.irqchips), len(c.pci_devices)) == (13, 1, 2)
    assert c.vpci_irq_base == 108 and c.cpu_reset_address == 0x70000000
    assert c.console == Console(address=0x09000000, size=0, type=3, flags=3)
    assert c.memory_regions[9] == MemoryRegion(phys_start=0x09000000, virt_start=0x09000000, size=0x1000, flags=0x93)
    assert c.memory_regions[10] == MemoryRegion(phys_start=0x7F900000, virt_start=0, size=0x10000, flags=0x47)
    assert c.memory_regions[12].flags & MEM_COMM_REGION and c.memory_regions[12].virt_start == 0x80000000
    assert c.irqchips[0].irqs() == [33, 140, 141]
    net = c.pci_devices[1]
    assert (net.bdf, net.shmem_regions_start, net.shmem_dev_id, net.shmem_peers, net.shmem_protocol) == (8, 5, 1, 2, 1)


@needs_vectors
def test_describe_names_every_flag() -> None:
    data = (VECTORS / "runphi-fork-rev13-qemu-arm64-zephyr-demo.cell").read_bytes()
    profile, config = read_cell(data)
    text = describe_cell(config, profile, len(data))
    for expected in (
        "PASSIVE_COMMREG|VIRTUAL_CONSOLE_PERMITTED",
        "READ|WRITE|IO|ROOTSHARED",
        "READ|WRITE|EXECUTE|DMA|LOADABLE",
        "READ|WRITE|COMM_REGION",
        "PL011",
        "ACCESS_MMIO|REGDIST_4",
        "irqs: 33, 140, 141",
        "(VETH)",
        "808 bytes",
    ):
        assert expected in text


# --- round trips over random valid configs ---

u8, u16, u32, u64 = (st.integers(0, 2**bits - 1) for bits in (8, 16, 32, 64))
names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_."), min_size=1, max_size=31)


def regions(colors: bool):
    return st.builds(
        MemoryRegion,
        phys_start=u64,
        virt_start=u64,
        size=u64,
        flags=u64,
        colors=u64 if colors else st.just(0),
    )


pci_devices = st.builds(
    PciDevice,
    type=u8,
    iommu=u8,
    domain=u16,
    bdf=u16,
    bar_mask=st.tuples(u32, u32, u32, u32, u32, u32),
    caps_start=u16,
    num_caps=u16,
    num_msi_vectors=u8,
    msi_64bits=st.booleans(),
    msi_maskable=st.booleans(),
    num_msix_vectors=u16,
    msix_region_size=u16,
    msix_address=u64,
    shmem_regions_start=u32,
    shmem_dev_id=u8,
    shmem_peers=u8,
    shmem_protocol=u16,
)


@st.composite
def cell_configs(draw, profile):
    set_size = draw(st.sampled_from([0, 1, 4, 8, 16]))
    rcpu_size = draw(st.sampled_from([0, 8])) if profile.has_rcpu_set else 8
    small = st.lists
    return CellConfig(
        name=draw(names),
        flags=draw(u32),
        id=draw(u32),
        architecture=draw(st.sampled_from(Architecture)) if profile.has_architecture else None,
        cpus=draw(st.frozensets(st.integers(0, set_size * 8 - 1), max_size=8)) if set_size else frozenset(),
        cpu_set_size=set_size,
        rcpus=draw(st.frozensets(st.integers(0, 63), max_size=4)) if profile.has_rcpu_set and rcpu_size else frozenset(),
        rcpu_set_size=rcpu_size,
        memory_regions=tuple(draw(small(regions(profile.region_size == 40), max_size=5))),
        cache_regions=tuple(draw(small(st.builds(CacheRegion, start=u32, size=u32, type=u8, flags=u16), max_size=2))),
        irqchips=tuple(
            draw(small(st.builds(IrqChip, address=u64, id=u32, pin_base=u32, pin_bitmap=st.tuples(u32, u32, u32, u32)), max_size=2))
        ),
        pio_regions=tuple(draw(small(st.builds(PioRegion, base=u16, length=u16), max_size=2))),
        pci_devices=tuple(draw(small(pci_devices, max_size=2))),
        pci_caps=tuple(draw(small(st.builds(PciCapability, id=u16, start=u16, len=u16, flags=u16), max_size=2))),
        stream_ids=tuple(draw(small(u32, max_size=2))),
        qos_devices=tuple(
            draw(small(st.builds(QosDevice, name=st.text("abcxyz_0", max_size=15), flags=u8, base=u32), max_size=2))
            if profile.has_qos_devices
            else ()
        ),
        vpci_irq_base=draw(u32),
        cpu_reset_address=draw(u64),
        msg_reply_timeout=draw(u64),
        console=draw(st.builds(Console, address=u64, size=u32, type=u16, flags=u16, divider=u32, gate_nr=u32, clock_reg=u64)),
    )


# The only profiles whose files can share bytes (see read_cell).
AMBIGUOUS_PAIR = {"rev14", "omnivisor-rev14"}

_ZERO_CACHE = CacheRegion(start=0, size=0, type=0)
_ZERO_CAP = PciCapability(id=0, start=0, len=0)
_ZERO_IRQCHIP = IrqChip(address=0, pin_base=0)
_ZERO_QOS = QosDevice(name="", flags=0, base=0)
_X86_EMPTY = CellConfig(name="0", architecture=Architecture.X86, cpu_set_size=0, rcpu_set_size=0)


def _rpu_demo_region(index: int) -> MemoryRegion:
    """1 MiB of RAM at 0x40000000 + index MiB; the first one colored."""
    base = 0x40000000 + index * 0x100000
    return MemoryRegion(phys_start=base, virt_start=base, size=0x100000, flags=3, colors=0xF0 if index == 0 else 0)


# An Omnivisor cell with rCPUs and colored RAM (fork-only content) whose bytes are also a rev14 file:
# 8-byte rCPU set, 5 regions, 2 PCI devices, 1 stream id solve read_cell's length equation.
RPU_DEMO = CellConfig(
    name="rpu-demo", architecture=Architecture.ARM64, cpus=frozenset({2, 3}), rcpus=frozenset({0, 1}),
    memory_regions=tuple(_rpu_demo_region(i) for i in range(5)), stream_ids=(0x870,),
    pci_devices=(PciDevice(type=3, bdf=8), PciDevice(type=3, bdf=16)),
)  # fmt: skip

# Configs whose bytes are also a valid file of the other profile of the pair: the first three
# are what hypothesis found (shrunk), the last is RPU_DEMO.
FOUND_EXAMPLES: dict[str, list[CellConfig]] = {
    "omnivisor-rev14": [
        msgspec.structs.replace(_X86_EMPTY, cache_regions=(_ZERO_CACHE,), pci_caps=(_ZERO_CAP,) * 2, stream_ids=(0,)),
        msgspec.structs.replace(
            _X86_EMPTY, cache_regions=(_ZERO_CACHE,) * 2, irqchips=(_ZERO_IRQCHIP,), stream_ids=(0,)
        ),
        msgspec.structs.replace(
            _X86_EMPTY, pio_regions=(PioRegion(base=0, length=0),), stream_ids=(0,), qos_devices=(_ZERO_QOS,) * 2
        ),
        RPU_DEMO,
    ],
}


def assert_ambiguous(data: bytes, error: AmbiguousCellConfigError, written: str) -> None:
    """`data` is a file of both profiles of the pair, read as two configs that each re-encode to it."""
    assert {p.name for p in error.profiles} == AMBIGUOUS_PAIR and written in AMBIGUOUS_PAIR
    assert "valid as both rev14 and omnivisor-rev14" in str(error)
    readings = [read_cell(data, p)[1] for p in error.profiles]
    assert readings[0] != readings[1]
    for p, config in zip(error.profiles, readings):
        assert write_cell(config, p) == data


def check_round_trip(config: CellConfig, profile) -> None:
    """Exact round trip in `profile`; detection finds `profile`, or refuses the bytes as ambiguous."""
    data = write_cell(config, profile)
    assert read_cell(data, profile) == (profile, config)
    try:
        detected, decoded = read_cell(data)
    except AmbiguousCellConfigError as exc:
        assert_ambiguous(data, exc, profile.name)
        return
    assert detected == profile and decoded == config


@pytest.mark.parametrize("profile_name", list(PROFILES))
def test_round_trip_random_configs(profile_name: str) -> None:
    profile = get_profile(profile_name)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cell_configs(profile))
    def check(config: CellConfig) -> None:
        check_round_trip(config, profile)

    for found in FOUND_EXAMPLES.get(profile_name, ()):
        check = example(found)(check)
    check()


def test_bytes_of_both_rev14_profiles_are_refused_by_detection() -> None:
    omnivisor, rev14 = PROFILES["omnivisor-rev14"], PROFILES["rev14"]
    data = write_cell(FOUND_EXAMPLES["omnivisor-rev14"][0], omnivisor)
    with pytest.raises(AmbiguousCellConfigError, match="valid as both rev14 and omnivisor-rev14") as info:
        read_cell(data)
    assert_ambiguous(data, info.value, "omnivisor-rev14")
    # rev14 reads the fork's counts 4 bytes early: its cache region as an irqchip, its caps as stream ids
    _, upstream = read_cell(data, rev14)
    assert upstream.irqchips == (_ZERO_IRQCHIP,) and upstream.stream_ids == (0, 0) and not upstream.cache_regions
    assert upstream.vpci_irq_base == 1  # the fork's num_stream_ids


def test_a_fork_file_with_fork_only_content_can_be_ambiguous() -> None:
    """So "upstream wins" would misread real fork files: detection refuses instead."""
    data = write_cell(RPU_DEMO, PROFILES["omnivisor-rev14"])
    with pytest.raises(AmbiguousCellConfigError):
        read_cell(data)
    _, upstream = read_cell(data, PROFILES["rev14"])
    assert len(upstream.memory_regions) == 8 and not upstream.cpus  # rcpu_set_size read as a count


def test_rev14_config_with_the_same_bytes_is_refused_too() -> None:
    """Ambiguity is a property of the bytes: writing the rev14 reading gives the same refusal."""
    omnivisor, rev14 = PROFILES["omnivisor-rev14"], PROFILES["rev14"]
    for found in FOUND_EXAMPLES["omnivisor-rev14"]:
        data = write_cell(found, omnivisor)
        _, upstream = read_cell(data, rev14)
        check_round_trip(upstream, rev14)
        with pytest.raises(AmbiguousCellConfigError):
            read_cell(write_cell(upstream, rev14))


# --- reader errors ---


@needs_vectors
def test_every_truncation_is_a_precise_error() -> None:
    data = (VECTORS / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell").read_bytes()
    fork = PROFILES["runphi-rev13"]
    for cut in range(len(data)):
        with pytest.raises(CellConfigError, match=r"\d+ bytes"):
            read_cell(data[:cut], fork)


@needs_vectors
def test_truncated_fork_file_is_never_detected_as_fork() -> None:
    """A cut fork file can be a well-formed upstream rev-13 file by length; never the fork again."""
    data = (VECTORS / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell").read_bytes()
    for cut in range(len(data)):
        try:
            profile, _ = read_cell(data[:cut])
        except CellConfigError:
            continue
        assert profile.name == "rev13" and cut == 484


@needs_vectors
def test_garbled_files_are_refused_with_the_reason() -> None:
    data = (VECTORS / "runphi-fork-rev13-qemu-arm64-inmate-demo.cell").read_bytes()
    cases = {
        b"XXCELL" + data[6:]: "expected JHCELL",
        data[:6] + (15).to_bytes(2, "little") + data[8:]: "expected JHCELL",
        data + b"\0": "the file has 553 bytes",
        data[:8] + b"inmate-demo\0garbage" + data[8 + 19 :]: "NUL-terminated",
        b"ELF\x7f" * 40: "expected JHCELL",
    }
    for garbled, reason in cases.items():
        with pytest.raises(CellConfigError, match=re.escape(reason)):
            read_cell(garbled)


def test_short_input_names_the_minimum_size() -> None:
    with pytest.raises(CellConfigError, match=r"3 bytes, shorter than any cell header \(132 bytes\)"):
        read_cell(b"JHC")


def test_bad_architecture_byte_is_refused() -> None:
    data = bytearray(write_cell(CellConfig(name="a", architecture=Architecture.ARM64), PROFILES["rev14"]))
    data[5] = 9
    with pytest.raises(CellConfigError, match="unsupported architecture byte 9"):
        read_cell(bytes(data))


# --- writer errors ---


def test_writer_refuses_what_the_profile_cannot_carry() -> None:
    with pytest.raises(CellConfigError, match="cannot carry qos_devices"):
        write_cell(CellConfig(name="a", qos_devices=(QosDevice(name="q", flags=1, base=0),)), PROFILES["rev13"])
    with pytest.raises(CellConfigError, match="cannot carry rcpus"):
        write_cell(CellConfig(name="a", rcpus=frozenset({0})), PROFILES["runphi-rev13"])
    with pytest.raises(CellConfigError, match="needs an architecture"):
        write_cell(CellConfig(name="a"), PROFILES["rev14"])
    region = MemoryRegion(phys_start=0, virt_start=0, size=0x1000, flags=3, colors=1)
    with pytest.raises(CellConfigError, match="cannot carry memory region colors"):
        write_cell(CellConfig(name="a", memory_regions=(region,)), PROFILES["rev12"])


def test_writer_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(CellConfigError, match="1 to 31 bytes"):
        write_cell(CellConfig(name="x" * 32), PROFILES["rev13"])
    with pytest.raises(CellConfigError, match="CPU 64 does not fit a 8-byte set"):
        write_cell(CellConfig(name="a", cpus=frozenset({64})), PROFILES["rev13"])
    with pytest.raises(CellConfigError, match="memory region 0 cannot be encoded"):
        region = MemoryRegion(phys_start=2**64, virt_start=0, size=0, flags=0)
        write_cell(CellConfig(name="a", memory_regions=(region,)), PROFILES["rev13"])


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(CellConfigError, match="runphi-rev13"):
        get_profile("rev99")


# --- C source ---

has_gcc = shutil.which("gcc") and shutil.which("objcopy")


@pytest.mark.skipif(not has_gcc, reason="gcc/objcopy not installed")
@needs_vectors
@pytest.mark.parametrize("profile_name", list(PROFILES))
def test_c_source_compiles_to_the_same_bytes(profile_name: str, tmp_path: Path) -> None:
    profile = PROFILES[profile_name]
    _, config = read_cell((VECTORS / "runphi-fork-rev13-qemu-arm64-zephyr-demo.cell").read_bytes())
    config = msgspec.structs.replace(
        config,
        architecture=Architecture.ARM64,
        qos_devices=(QosDevice(name="fifteen-chars-x", flags=5, base=0xFD700000),) if profile.has_qos_devices else (),
        rcpus=frozenset({1}) if profile.has_rcpu_set else frozenset(),
        stream_ids=(0x870,),
    )
    src = tmp_path / "cell.c"
    src.write_text(cell_to_c(config, profile))
    subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", "-c", "-o", tmp_path / "cell.o", src], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".data", tmp_path / "cell.o", tmp_path / "cell.cell"], check=True)
    assert (tmp_path / "cell.cell").read_bytes() == write_cell(config, profile)
