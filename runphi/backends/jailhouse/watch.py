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

from runphi.backends.base import BackendError, BackendUnavailable, CellNotFound
from runphi.backends.jailhouse.driver import JailhouseDriver, check_result, destroy_argv, shutdown_argv


class JailhouseCellWatch:
    """One cell on one Jailhouse, as the monitor sees it."""

    def __init__(self, tool: str, sysfs: str, cell_name: str, tool_timeout: float) -> None:
        self.tool = tool
        self.name = cell_name
        self.tool_timeout = tool_timeout
        self.driver = JailhouseDriver(tool, sysfs, timeout=tool_timeout)
        self._cell_id: int | None = None

    def read_state(self) -> tuple[bool, str | None]:
        try:
            if not self.driver.available():
                return False, None
            return True, self._state()
        except BackendUnavailable:
            return False, None

    def _state(self) -> str | None:
        if self._cell_id is not None:
            base = self.driver.cells_dir / str(self._cell_id)
            try:
                if (base / "name").read_text().rstrip("\n") == self.name[:31]:
                    return (base / "state").read_text().rstrip("\n")
            except OSError:
                pass
        self._cell_id = self.driver.cell_id(self.name)
        if self._cell_id is None:
            return None
        try:
            return (self.driver.cells_dir / str(self._cell_id) / "state").read_text().rstrip("\n")
        except OSError:
            return None

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


def open_cell_watch(setup) -> JailhouseCellWatch:
    """The watch for a monitor's :class:`~runphi.monitor.MonitorSetup`."""
    return JailhouseCellWatch(setup.backend_config["tool"], setup.backend_config["sysfs"], setup.cell_name,
                              setup.tool_timeout)
