"""Building the test inmates: what ``ensure_built`` produces and when it rebuilds."""

from __future__ import annotations

import struct
import subprocess

import pytest

from tools.inmates import build as inmates

_missing = inmates.missing_tools()
if _missing:
    pytest.skip(f"building the inmates needs the cross toolchain: {_missing}", allow_module_level=True)

ELF_MAGIC = b"\x7fELF"
EM_AARCH64 = 183


def elf_entry_and_machine(data: bytes) -> tuple[int, int]:
    """e_entry and e_machine of a little-endian ELF64 header."""
    assert data[:4] == ELF_MAGIC and data[4] == 2 and data[5] == 1, "not a little-endian ELF64"
    (machine,) = struct.unpack_from("<H", data, 18)
    (entry,) = struct.unpack_from("<Q", data, 24)
    return entry, machine


def test_every_program_is_a_raw_aarch64_image_entered_at_the_load_address():
    out = inmates.ensure_built()
    for program in inmates.PROGRAMS:
        raw = (out / f"{program}.bin").read_bytes()
        entry, machine = elf_entry_and_machine((out / f"{program}.elf").read_bytes())
        assert machine == EM_AARCH64
        assert entry == inmates.LOAD_ADDRESS
        # A raw image, not an ELF: `cell load -a` copies it byte for byte.
        assert raw[:4] != ELF_MAGIC and 0 < len(raw) < 64 * 1024


def test_up_to_date_outputs_are_not_rebuilt_and_missing_ones_are():
    out = inmates.ensure_built()
    stamps = {p: (out / f"{p}.bin").stat().st_mtime_ns for p in inmates.PROGRAMS}
    inmates.ensure_built()
    assert {p: (out / f"{p}.bin").stat().st_mtime_ns for p in inmates.PROGRAMS} == stamps
    (out / "crash.bin").unlink()
    assert inmates.image_path("crash").stat().st_size > 0


def test_make_agrees_everything_is_current():
    inmates.ensure_built()
    question = subprocess.run(
        ["make", "-q", "-C", str(inmates.INMATES_DIR), f"LOAD_ADDRESS={inmates.LOAD_ADDRESS:#x}",
         f"FLOOD_BYTES={inmates.FLOOD_BYTES}"],
        capture_output=True,
    )  # fmt: skip
    assert question.returncode == 0, question.stdout + question.stderr


def test_unknown_program_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown inmate 'nope'; known: hello, echo"):
        inmates.image_path("nope")
