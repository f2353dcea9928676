"""The backend contract: what runphi promises for a ZIC whatever backend runs it.

Every test runs once per backend setup (``conftest.BACKEND_SETUPS``). Most drive the
real front end as a shim does (``runphi create/start/kill/delete``, the test process
adopting and reaping the monitor); the ``protocol`` tests call the backend protocol
(``runphi.backends.base``) through the registry directly. Exit statuses are the
DESIGN §4 table (docs/exit-codes.md); "resources" are what the setup reports in use
(cells, ledger entries, claims).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runphi.backends.base import CellRecord, CellState, LaunchRequest
from runphi.errors import RunphiError
from tests.test_lifecycle_failures import live_runphi_descendants
from tests.test_lifecycle_harness import wait_exit, wait_for

from .contract import BackendTarget, Guest, RuntimeCli

#: How long a monitor may take to exit once its cell has stopped, crashed or vanished (seconds).
EXIT_TIMEOUT = 60.0


# ---- helpers -----------------------------------------------------------------------------

def open_backend(target: BackendTarget, warnings: list[str] | None = None):
    """The target's backend, obtained as the verbs obtain it (``registry.open_backend``)."""
    from runphi.backends.registry import open_backend as registry_open

    return registry_open(target.config(), (warnings if warnings is not None else []).append)


def stored_cell(cli: RuntimeCli, container_id: str) -> CellRecord:
    """The cell record ``launch`` returned for the container, as runphi stored it."""
    from runphi.store import Store

    return Store(cli.root).read(container_id).cell


def cell_state(target: BackendTarget, cell: CellRecord) -> CellState:
    """The backend's view of the cell, through the protocol."""
    return open_backend(target).cell_state(cell).state


def running_guest(target: BackendTarget, cli: RuntimeCli, container_id: str, guest: Guest) -> int:
    """Create and start a ZIC of ``guest`` and wait for its first output; the monitor's pid."""
    pid = cli.started(container_id, target.bundle(container_id, guest))
    cli.console_until(container_id, target.first_output(guest), timeout=target.boot_timeout)
    return pid


def exit_status(target: BackendTarget, pid: int) -> int:
    """The monitor's exit status as the shim sees it (it is our adopted child)."""
    return wait_exit(pid, timeout=target.boot_timeout + EXIT_TIMEOUT)


def assert_nothing_held(target: BackendTarget, cli: RuntimeCli, container_id: str) -> None:
    """No cell, ledger entry or claim on the node; no trace of the container in runphi."""
    in_use = target.in_use()
    assert in_use.empty, f"resources left behind: {in_use}"
    assert cli.container_ids() == [], "a container state directory was left behind"
    assert cli.run("state", container_id).returncode != 0, "runphi still knows the container"


def launch_request(cli: RuntimeCli, container_id: str, bundle: Path) -> LaunchRequest:
    """What ``create`` hands the backend for ``bundle`` (its own container directory included)."""
    from runphi.oci import load_config

    config = load_config(bundle)
    directory = cli.base / "protocol" / container_id
    directory.mkdir(parents=True)
    return LaunchRequest(container_id=container_id, bundle=str(bundle), rootfs=str(config.rootfs(bundle)),
                         container_dir=str(directory), config=config)


def close_console(fd: int) -> None:
    """The caller owns ``LaunchedCell.console_fd``; the protocol tests do not read it."""
    if fd >= 0:
        os.close(fd)


# ---- 1. launch → start → first console bytes -------------------------------------------

def test_started_guest_s_first_console_bytes_arrive_unaltered(target, cli):
    """The console carries the guest's output from its very first byte: nothing lost, nothing added."""
    pid = cli.started("first-bytes", target.bundle("first-bytes", Guest.POWERS_OFF))
    expected = target.first_output(Guest.POWERS_OFF)
    seen = cli.console_until("first-bytes", expected, timeout=target.boot_timeout)
    assert seen.startswith(expected), f"the console began with {seen[:200]!r}, not {expected!r}"
    assert exit_status(target, pid) == 0


# ---- 2. guest power-off → 0 ------------------------------------------------------------

def test_guest_power_off_exits_0_and_leaves_the_cell_shut_down(target, cli):
    """A guest that powers itself off ends its container with status 0; the cell stays, shut down."""
    pid = cli.started("poweroff", target.bundle("poweroff", Guest.POWERS_OFF))
    assert exit_status(target, pid) == 0
    assert cli.state("poweroff")["status"] == "stopped"
    assert cell_state(target, stored_cell(cli, "poweroff")) is CellState.SHUT_DOWN
    assert target.first_output(Guest.POWERS_OFF).decode() in cli.run("logs", "poweroff", check=True).stdout


# ---- 3. guest fault → cell failed → 139 --------------------------------------------------

def test_guest_fault_fails_the_cell_and_exits_139(target, cli):
    """A faulting guest fails its cell (with parked CPUs); the container ends with status 139."""
    pid = cli.started("crash", target.bundle("crash", Guest.CRASHES))
    assert exit_status(target, pid) == 139
    assert cli.state("crash")["status"] == "stopped"
    cell = stored_cell(cli, "crash")
    backend = open_backend(target)
    assert backend.cell_state(cell).state is CellState.FAILED
    assert backend.failed_cpus(cell), "a failed cell reports no parked CPU"
    assert target.first_output(Guest.CRASHES).decode() in cli.run("logs", "crash", check=True).stdout


# ---- 4. cell destroyed behind runphi's back → 255 ------------------------------------------

def test_cell_destroyed_behind_runphis_back_exits_255(target, cli):
    """A cell destroyed with the hypervisor's own tool ends its container with 255; delete then
    releases what it held."""
    pid = running_guest(target, cli, "vanish", Guest.RUNS_FOREVER)
    cell = stored_cell(cli, "vanish")
    target.destroy_behind_runphis_back(cell.cell_name)
    assert exit_status(target, pid) == 255
    assert cli.state("vanish")["status"] == "stopped"
    assert cell_state(target, cell) is CellState.GONE
    cli.run("delete", "vanish", check=True)
    assert_nothing_held(target, cli, "vanish")


# ---- 5. kill TERM → 143, kill KILL → 137 ------------------------------------------------

@pytest.mark.parametrize(("signal_name", "code"), [("TERM", 143), ("KILL", 137)])
def test_kill_of_a_running_guest_exits_128_plus_signal(target, cli, signal_name, code):
    """``kill`` of a guest that would run forever stops its cell and ends the container with 128+N."""
    pid = running_guest(target, cli, "killed", Guest.RUNS_FOREVER)
    cell = stored_cell(cli, "killed")
    assert cell_state(target, cell) is CellState.RUNNING
    cli.run("kill", "killed", signal_name, check=True)
    assert exit_status(target, pid) == code
    assert cli.state("killed")["status"] == "stopped"
    assert cell_state(target, cell) in (CellState.SHUT_DOWN, CellState.GONE)


# ---- 6. a launch failing half-way leaves nothing --------------------------------------------

def refused_bundle(target: BackendTarget, how: str, name: str) -> Path:
    """A bundle whose launch fails: the board refuses it half-way, or it asks for the impossible."""
    if how == "board-refuses-half-way":
        target.fail_next_launch()
        return target.bundle(name, Guest.RUNS_FOREVER)
    return target.unhostable_bundle(name)


@pytest.mark.parametrize("how", ["board-refuses-half-way", "asks-for-what-the-platform-lacks"])
def test_failed_create_leaves_no_cell_no_ledger_entry_and_the_id_free(target, cli, how):
    """A create whose launch fails exits non-zero with one reason and leaves nothing; the id works again."""
    result = cli.try_create("refused", refused_bundle(target, how, "refused"))
    assert result.returncode != 0, "the launch was expected to fail"
    assert "refused" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not cli.pid_file("refused").exists(), "a failed create wrote a pid file"
    assert_nothing_held(target, cli, "refused")
    assert live_runphi_descendants() == [], "a monitor outlived the failed create"
    cli.create("refused", target.bundle("retry", Guest.RUNS_FOREVER))
    assert target.in_use().holds("refused", stored_cell(cli, "refused").cell_name)


def test_protocol_launch_failing_half_way_is_all_or_nothing(target, cli):
    """``Backend.launch`` that fails raises a RunphiError having undone every step it took."""
    backend = open_backend(target)
    request = launch_request(cli, "proto-refused", target.bundle("proto-refused", Guest.RUNS_FOREVER))
    target.fail_next_launch()
    with pytest.raises(RunphiError):
        backend.launch(request)
    in_use = target.in_use()
    assert in_use.empty, f"a failed launch left {in_use}"


# ---- 7. resources released after delete --------------------------------------------------

@pytest.mark.parametrize("stop_first", [True, False], ids=["stopped-then-deleted", "force-deleted-running"])
def test_delete_releases_every_resource(target, cli, stop_first):
    """While the guest runs its cell and resources are held; after delete none are."""
    pid = running_guest(target, cli, "released", Guest.RUNS_FOREVER)
    cell = stored_cell(cli, "released")
    assert target.in_use().holds("released", cell.cell_name)
    if stop_first:
        cli.run("kill", "released", "TERM", check=True)
        assert exit_status(target, pid) == 143
        cli.run("delete", "released", check=True)
    else:
        cli.run("delete", "--force", "released", check=True)
        exit_status(target, pid)  # reaped; how it ended is delete's business
    assert_nothing_held(target, cli, "released")
    assert cell_state(target, cell) is CellState.GONE


# ---- 8. the protocol's own promises ------------------------------------------------------

def test_protocol_launched_cell_is_there_until_destroyed_and_destroy_is_idempotent(target, cli):
    """After ``launch`` the cell exists but is not running (CREATED or SHUT_DOWN, never GONE), under
    the name ``planned_cell_name`` announced, holding its resources; after ``destroy_cell`` it is
    GONE with nothing held, and destroying it again does not raise."""
    warnings: list[str] = []
    backend = open_backend(target, warnings)
    launched = backend.launch(launch_request(cli, "proto", target.bundle("proto", Guest.RUNS_FOREVER)))
    cell = launched.cell
    try:
        close_console(launched.console_fd)
        assert cell.cell_name == backend.planned_cell_name("proto")
        assert backend.cell_state(cell).state in (CellState.CREATED, CellState.SHUT_DOWN)
        assert target.in_use().holds("proto", cell.cell_name)
        backend.destroy_cell(cell.cell_name)
        assert backend.cell_state(cell).state is CellState.GONE
        assert target.in_use().empty
        backend.destroy_cell(cell.cell_name)
        assert backend.cell_state(cell).state is CellState.GONE
        assert backend.failed_cpus(cell) == frozenset()
    finally:
        backend.destroy_cell(cell.cell_name)
    assert warnings == []


def test_protocol_start_runs_the_cell_and_shutdown_keeps_it(target, cli):
    """``start_cell`` makes the cell RUNNING; ``shutdown_cell`` stops it and the cell stays
    (SHUT_DOWN, resources still held) until ``destroy_cell``."""
    backend = open_backend(target)
    launched = backend.launch(launch_request(cli, "proto-run", target.bundle("proto-run", Guest.RUNS_FOREVER)))
    cell = launched.cell
    try:
        close_console(launched.console_fd)
        backend.start_cell(cell.cell_name)
        wait_for(lambda: backend.cell_state(cell).state is CellState.RUNNING, timeout=target.boot_timeout,
                 what="the started cell to run")
        backend.shutdown_cell(cell.cell_name)
        assert backend.cell_state(cell).state is CellState.SHUT_DOWN
        assert target.in_use().holds("proto-run", cell.cell_name)
    finally:
        backend.destroy_cell(cell.cell_name)
    assert backend.cell_state(cell).state is CellState.GONE
    assert target.in_use().empty
