"""The Jailhouse driver's pure parts: cell addressing, argv, error mapping, list syntax.

The driver against a live (simulated) hypervisor is in tests/test_driver_sim.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runphi.backends.base import (
    BackendError,
    BackendUnavailable,
    CellNotFound,
    InvalidConfiguration,
    OperationDenied,
    ResourceBusy,
)
from runphi.backends.jailhouse.driver import (
    LoadImage,
    RpuImage,
    cell_ref,
    check_result,
    load_argv,
    looks_like_cell_id,
    parse_cpu_list,
)


@pytest.mark.parametrize("token", ["", "0", "7", "12", "0x1f", "0X1F", "010", "+3", "-0", " 5"])
def test_tokens_the_tool_reads_as_ids(token):
    assert looks_like_cell_id(token)
    assert cell_ref(token) == ["--name", token]


@pytest.mark.parametrize("token", ["zic1", "08", "0x", "-1", "5 ", "1a", "abc-12", "0x1g", "12.5"])
def test_tokens_the_tool_reads_as_names(token):
    assert not looks_like_cell_id(token)
    assert cell_ref(token) == [token]


@given(st.integers(min_value=0, max_value=2**40))
def test_every_decimal_number_is_an_id(n):
    assert looks_like_cell_id(str(n))


def test_load_argv_orders_images_then_rpu_groups():
    argv = load_argv("jh", "123", [LoadImage(file="/img.bin", address=0x70000000),
                                  LoadImage(string="args", address=0x1000), LoadImage(file="/x")],
                     [RpuImage(firmware="fw.elf", rcpu=0)])
    assert argv == ["jh", "cell", "load", "--name", "123", "/img.bin", "-a", "0x70000000",
                    "-s", "args", "-a", "0x1000", "/x", "-r", "fw.elf", "0"]


@pytest.mark.parametrize(
    ("op", "stderr", "cls", "words"),
    [
        ("create", "JAILHOUSE_CELL_CREATE: Device or resource busy\n", ResourceBusy, "owned by another cell"),
        ("create", "JAILHOUSE_CELL_CREATE: File exists\n", ResourceBusy, "already exists"),
        ("create", "JAILHOUSE_CELL_CREATE: Operation not permitted\n", OperationDenied, "running/locked"),
        ("load", "JAILHOUSE_CELL_LOAD: Invalid argument\n", InvalidConfiguration, "does not fit"),
        ("start", "JAILHOUSE_CELL_START: No such file or directory\n", CellNotFound, "does not exist"),
        ("shutdown", "JAILHOUSE_CELL_LOAD: No such file or directory\n", CellNotFound, "does not exist"),
        ("destroy", "JAILHOUSE_CELL_DESTROY: Operation not permitted\n", OperationDenied, "running/locked"),
        ("start", "opening /dev/jailhouse: No such file or directory\n", BackendUnavailable, "module loaded"),
        ("start", "JAILHOUSE_CELL_START: Interrupted system call\n", BackendError, "Interrupted"),
        ("start", "", BackendError, "exit status 1"),
    ],
)
def test_failures_become_typed_errors_in_user_terms(op, stderr, cls, words):
    with pytest.raises(cls) as err:
        check_result(op, "zic1", 1, stderr)
    message = str(err.value)
    assert words in message and "zic1" in message
    assert "\n" not in message


def test_success_is_silent():
    check_result("start", "zic1", 0, "")


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("", set()), ("\n", set()), ("0-1\n", {0, 1}), ("0,3", {0, 3}), ("1-3,5,7-8", {1, 2, 3, 5, 7, 8})],
)
def test_kernel_cpu_list_syntax(text, cpus):
    assert parse_cpu_list(text) == cpus


@given(st.sets(st.integers(min_value=0, max_value=63)))
def test_cpu_list_round_trip(cpus):
    # Render in kernel list syntax (ranges joined, singletons), then parse back.
    parts, run = [], []
    for cpu in sorted(cpus):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    assert parse_cpu_list(",".join(parts) + "\n") == cpus
