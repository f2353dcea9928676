"""The Jailhouse backend on the simulated board (``tools/jailhouse_sim``), as contract setups.

Two setups share this code and differ in their guests: the ``script`` engine runs
declarative fake guests, the ``qemu`` engine real aarch64 inmates
(``tools/inmates``) under qemu-system-aarch64. One board per test module and setup;
each test gets its own state root and node state dir (so its own ledger).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.test_lifecycle_harness import Board, board_in_tempdir, guest_script

from .contract import Guest, GuestBundles, GuestImage, InUse

#: The boot description of every contract guest: bare metal, loaded and started at 0x70000000.
BOOT = {"os_var": "baremetal", "starting_vaddress": "0x70000000", "memory": 16}
#: The simulated board has CPUs 0-7: a guest pinned to CPU 31 cannot be placed.
UNHOSTABLE_BOOT = {**BOOT, "vcpu_pinning": [{"vcpu": 0, "pcpu": 31}]}

SCRIPT_GUESTS = {
    Guest.POWERS_OFF: GuestImage(guest_script("print contract guest: powering off\\n", "shutdown"),
                                 b"contract guest: powering off\r\n"),
    Guest.RUNS_FOREVER: GuestImage(guest_script("print contract guest: ticking\\n", "tick 50 tick"),
                                   b"contract guest: ticking\r\n"),
    Guest.CRASHES: GuestImage(guest_script("print contract guest: crashing\\n", "fault 0xdead0000"),
                              b"contract guest: crashing\r\n"),
}

#: Which inmate of tools/inmates plays each behaviour (each prints its banner first).
QEMU_INMATES = {Guest.POWERS_OFF: "hello", Guest.RUNS_FOREVER: "ticker", Guest.CRASHES: "crash"}


def qemu_guests(inmates: Path) -> dict[Guest, GuestImage]:
    """The built inmates as contract guests, with their known banners."""
    return {guest: GuestImage((inmates / f"{program}.bin").read_bytes(),
                              f"Hello from runphi inmate {program}\r\n".encode())
            for guest, program in QEMU_INMATES.items()}


class JailhouseSimMachine:
    """One simulated board and the guests of its engine; makes each test's target."""

    def __init__(self, name: str, board: Board, guests: Mapping[Guest, GuestImage], boot_timeout: float) -> None:
        self.name = name
        self.board = board
        self.guests = dict(guests)
        self.boot_timeout = boot_timeout

    def target(self, base: Path) -> JailhouseSimTarget:
        return JailhouseSimTarget(self, base)


class JailhouseSimTarget(GuestBundles):
    """:class:`~tests.backend_contract.contract.BackendTarget` for Jailhouse on the simulator."""

    boot = BOOT
    unhostable_boot = UNHOSTABLE_BOOT

    def __init__(self, machine: JailhouseSimMachine, base: Path) -> None:
        self.name = machine.name
        self.board = machine.board
        self.guests = machine.guests
        self.boot_timeout = machine.boot_timeout
        self.base = base
        self.node = base / "node"
        config = base / "runphi.toml"
        config.write_text('backend = "jailhouse"\n\n[jailhouse]\npoll_interval_ms = 20\n')
        self.env = dict(os.environ)
        self.env.update({
            "RUNPHI_CONFIG": str(config),
            "RUNPHI_BACKEND": "jailhouse",
            "RUNPHI_JAILHOUSE": str(self.board.tool),
            "RUNPHI_SYSFS": str(self.board.sysfs),
            "RUNPHI_PLATFORM": "sim-qemu-arm64",
            "RUNPHI_STATE_DIR": str(self.node),
        })

    def fail_next_launch(self) -> None:
        """The next ``cell load`` fails (EINVAL): the cell exists and its resources are taken then."""
        self.board.inject("--op", "load", "--errno", "EINVAL")

    def destroy_behind_runphis_back(self, cell_name: str) -> None:
        result = self.board.jailhouse("cell", "destroy", "--name", cell_name)
        assert result.returncode == 0, f"jailhouse cell destroy {cell_name}: {result.stderr}"

    def in_use(self) -> InUse:
        """Cells from the driver's sysfs; allocations from the node ledger; claims from their directory."""
        return InUse.on_node(self.node, self.board.cells())

    def config(self):
        from runphi.config import load_runtime_config

        return load_runtime_config(self.env)

    def scrub(self) -> None:
        self.board.inject("--clear")
        for name in self.board.cells():
            self.board.jailhouse("cell", "destroy", "--name", name)


@contextmanager
def script_machine(request: pytest.FixtureRequest) -> Iterator[JailhouseSimMachine]:
    """A simulated board with the script engine (needs nothing beyond Python)."""
    with board_in_tempdir("rphi-bc-", engine="script") as board:
        yield JailhouseSimMachine("jailhouse-script", board, SCRIPT_GUESTS, boot_timeout=20)


@contextmanager
def qemu_machine(request: pytest.FixtureRequest) -> Iterator[JailhouseSimMachine]:
    """A simulated board with the QEMU engine; skips (with the reason) without QEMU or gcc."""
    inmates = request.getfixturevalue("built_inmates")
    with board_in_tempdir("rphi-bcq-", engine="qemu") as board:
        yield JailhouseSimMachine("jailhouse-qemu", board, qemu_guests(inmates), boot_timeout=90)
