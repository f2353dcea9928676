"""Property tests for the simulator's pure pieces: sysfs formats, console ring,
script escapes, and the client's strtoll."""

from __future__ import annotations

import ctypes
import errno

from hypothesis import given
from hypothesis import strategies as st

from tools.jailhouse_sim.engines.script import unescape
from tools.jailhouse_sim.hvconsole import RING_SIZE, HvConsole
from tools.jailhouse_sim.sysfs import cpu_bitmap, cpu_list

cpu_sets = st.sets(st.integers(min_value=0, max_value=63))


def parse_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        cpus |= set(range(int(low), int(high or low) + 1))
    return cpus


@given(cpu_sets)
def test_cpu_list_round_trips_and_merges_ranges(cpus):
    text = cpu_list(cpus)
    assert parse_list(text) == cpus
    assert len(text.split(",")) == len([c for c in cpus if c - 1 not in cpus]) or not cpus


@given(cpu_sets)
def test_cpu_bitmap_is_zero_padded_hex_in_32_bit_chunks(cpus):
    text = cpu_bitmap(cpus, 64)
    assert text.count(",") == 1 and all(len(chunk) == 8 for chunk in text.split(","))
    assert int(text.replace(",", ""), 16) == sum(1 << c for c in cpus)


def test_cpu_bitmap_for_small_boards():
    assert (cpu_bitmap({2, 3}, 8), cpu_bitmap({0, 1}, 4), cpu_bitmap(set(), 4)) == ("0c", "3", "0")


@given(st.lists(st.text(min_size=0, max_size=300), max_size=30))
def test_console_ring_keeps_the_last_2048_bytes_and_reports_what_was_missed(lines):
    console = HvConsole()
    written = b""
    for line in lines:
        console.write(line)
        written += line.encode("utf-8", "replace")
    first = console.read(0, 0, enabled=True, follow=False)
    if len(written) > RING_SIZE:
        assert first.data == f"<missed {len(written) - RING_SIZE} bytes of console log>\n".encode()
        first = console.read(first.head, 0, enabled=True, follow=False)
    assert first.data == written[-RING_SIZE:] and first.head == len(written)
    assert console.read(first.head, 0, enabled=True, follow=False).data == b""


def test_console_when_never_enabled_is_eagain():
    assert HvConsole().read(0, 0, enabled=False, follow=False).error == errno.EAGAIN


@given(st.binary(max_size=64))
def test_hex_escapes_produce_any_byte(data):
    expected = data.replace(b"\n", b"\r\n")
    assert unescape("".join(f"\\x{b:02x}" for b in data)) == expected


def _client_strtoll():
    namespace: dict = {"__name__": "jailhouse_client"}
    from importlib import resources

    exec(compile((resources.files("tools.jailhouse_sim") / "jailhouse_client.py").read_text(), "client", "exec"),
         namespace)
    return namespace["strtoll"]


strtoll = _client_strtoll()
libc = ctypes.CDLL(None, use_errno=True)
libc.strtoll.restype = ctypes.c_longlong
libc.strtoll.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]


def c_strtoll(text: str) -> int | None:
    """glibc's strtoll accepting only a full, non-overflowing conversion."""
    raw = text.encode()
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    buffer = ctypes.create_string_buffer(raw)
    end_ptr = ctypes.cast(buffer, ctypes.c_char_p)
    value = libc.strtoll(end_ptr, ctypes.byref(end), 0)
    consumed = ctypes.cast(end, ctypes.c_void_p).value - ctypes.addressof(buffer)
    if ctypes.get_errno() or consumed != len(raw):
        return None
    return value


@given(st.one_of(
    st.from_regex(r"\A[ \t]?[+-]?(0[xX][0-9a-fA-F]{0,18}|0[0-9]{0,22}|[0-9]{1,21})[g ]?\Z"),
    st.text(alphabet="0123456789xX+- abcdef", max_size=8),
))
def test_client_strtoll_matches_glibc(text):
    assert strtoll(text) == c_strtoll(text)
