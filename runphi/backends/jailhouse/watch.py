"""The Jailhouse :class:`~runphi.backends.base.CellWatch`: what a monitor asks of its cell.

State comes from sysfs by the cell's ID (two small reads per poll, the ID
re-resolved by name if the cell changes hands); shutdown and destroy run the
``jailhouse`` tool through trio with the tool deadline; reachability is the
cheapest command that must open the hypervisor device (``jailhouse console``,
output discarded): sysfs files alone can outlive a dead management side.
Imported by the monitor only (trio is already loaded there).
"""

from __future__ import annotations

import subprocess

import trio

from runphi.backends.base import GONE, BackendError, BackendUnavailable, CellNotFound, CellStatus
from runphi.backends.jailhouse.driver import (JailhouseDriver, cell_status, check_result, destroy_argv,
                                              read_attribute, shutdown_argv)


class JailhouseCellWatch:
    """One cell on one Jailhouse, as the monitor sees it."""

    def __init__(self, tool: str, sysfs: str, cell_name: str, tool_timeout: float) -> None:
        self.tool = tool
        self.name = cell_name
        self.tool_timeout = tool_timeout
        self.driver = JailhouseDriver(tool, sysfs, timeout=tool_timeout)
        self._cell_id: int | None = None

    def read_state(self) -> tuple[bool, CellStatus]:
        """(hypervisor reachable through sysfs, the cell's status: GONE if it is gone).

        The common poll is two small reads (name, state) of the cell's known ID;
        only when those fail is the hypervisor checked and the ID looked up again.
        """
        state = self._known_cell_state()
        if state is not None:
            return True, cell_status(state)
        try:
            if not self.driver.available():
                return False, GONE
            self._cell_id = self.driver.cell_id(self.name)
        except BackendUnavailable:
            return False, GONE
        if self._cell_id is None:
            return True, GONE
        return True, cell_status(read_attribute(f"{self.driver.cells_dir / str(self._cell_id)}/state"))

    def _known_cell_state(self) -> str | None:
        """The state under the cached ID if that ID still belongs to our cell, else None."""
        if self._cell_id is None:
            return None
        return self.driver.state_under_id(self._cell_id, self.name)

    def bring_up(self) -> None:
        """A Jailhouse cell lives in the hypervisor: nothing to do in its owner."""

    async def follow(self) -> None:
        """Nothing runs in the background: the state is read from sysfs."""

    async def request_shutdown(self) -> bool:
        return await self._run("shutdown", shutdown_argv(self.tool, self.name))

    async def force_destroy(self) -> bool:
        return await self._run("destroy", destroy_argv(self.tool, self.name))

    async def reachable(self) -> bool:
        with trio.move_on_after(self.tool_timeout):
            try:
                proc = await trio.run_process([self.tool, "console"], stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, capture_stderr=True, check=False)
            except OSError:
                return False
            return b"opening /dev/jailhouse" not in proc.stderr
        return False

    async def _run(self, op: str, argv: list[str]) -> bool:
        """One tool command under the tool deadline; True on success or when the cell is gone."""
        with trio.move_on_after(self.tool_timeout):
            try:
                proc = await trio.run_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              capture_stderr=True, check=False)
            except OSError:
                return False
            try:
                check_result(op, self.name, proc.returncode, proc.stderr.decode(errors="replace"))
            except CellNotFound:
                return True
            except BackendError:
                return False
            return True
        return False


def open_cell_watch(backend_config: dict[str, str], cell_name: str, tool_timeout: float,
                    host_fds: tuple[int, ...] = ()) -> JailhouseCellWatch:
    """The watch of one cell, with the settings ``launch`` put in its WatchSettings (a
    Jailhouse launch hands over no host fds)."""
    return JailhouseCellWatch(backend_config["tool"], backend_config["sysfs"], cell_name, tool_timeout)
