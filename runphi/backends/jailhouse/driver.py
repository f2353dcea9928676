"""Talks to Jailhouse: runs the ``jailhouse`` tool and reads its sysfs tree.

Guarantees:

* every tool call has a deadline; a tool that hangs is killed and reported as
  :class:`~runphi.backends.base.ToolTimeout`;
* a failing call becomes a typed :class:`~runphi.backends.base.BackendError`
  whose message says, in user terms, what went wrong (the tool only ever exits
  0 or 1 and names the errno in ``<IOCTL>: <strerror>`` on stderr);
* cells are addressed by name; a name the tool would read as a numeric ID is
  passed with ``--name``;
* sysfs is read directly (state, CPUs, statistics), never through ``cell list``.

The argv builders and :func:`check_result` are shared with the monitor, which
runs the same commands through trio instead of :mod:`subprocess`.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import msgspec

from runphi.backends.base import (
    GONE,
    BackendError,
    BackendUnavailable,
    CellNotFound,
    CellState,
    CellStatistics,
    CellStatus,
    InvalidConfiguration,
    OperationDenied,
    PoolUse,
    ResourceBusy,
    ToolTimeout,
)
from runphi.pausepoint import pause_point

DEFAULT_TOOL_TIMEOUT = 10.0

#: Jailhouse's cell states (sysfs `state`, jailhouse.md §2.3) in runphi's terms. A
#: cell never started reads `shut down` too: Jailhouse cannot tell CREATED.
_STATES = {
    "running": CellState.RUNNING,
    "running/locked": CellState.RUNNING,
    "shut down": CellState.SHUT_DOWN,
    "failed": CellState.FAILED,
    "Comm ABI mismatch": CellState.FAILED,
}


def read_attribute(path: str) -> str | None:
    """One small sysfs attribute without its newline, or None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode(errors="replace").rstrip("\n")
    except OSError:
        return None
    finally:
        os.close(fd)


def cell_status(text: str | None) -> CellStatus:
    """A cell's sysfs `state` text (None: no such cell) as a :class:`CellStatus`."""
    if text is None:
        return GONE
    return CellStatus(_STATES.get(text, CellState.UNKNOWN), text)


class LoadImage(msgspec.Struct, frozen=True):
    """One `cell load` argument: a file, or a string (loaded with its NUL), at an address."""

    file: str | None = None
    string: str | None = None
    address: int | None = None


class RpuImage(msgspec.Struct, frozen=True):
    """An Omnivisor `-r` load: firmware name under /lib/firmware and the rCPU index."""

    firmware: str
    rcpu: int


def looks_like_cell_id(token: str) -> bool:
    """True when the tool would read `token` as a numeric cell ID.

    Mirrors its rule: ``strtoll(token, &end, 0)`` consumed the whole string, no
    overflow, value ≥ 0 (so ``""``, ``"7"``, ``"0x1f"``, ``"010"`` are IDs).
    """
    if token == "":
        return True
    text = token.lstrip(" \t\n\v\f\r")
    negative = text[:1] == "-"
    if text[:1] in ("+", "-"):
        text = text[1:]
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        value = int(text[2:], 16)
    elif re.fullmatch(r"0[0-7]*", text):
        value = int(text, 8)
    elif re.fullmatch(r"[1-9][0-9]*", text):
        value = int(text, 10)
    else:
        return False
    if negative:
        value = -value
    return 0 <= value < 2**63


def cell_ref(name: str) -> list[str]:
    """The argv words that address cell `name` unambiguously."""
    return ["--name", name] if looks_like_cell_id(name) else [name]


def create_argv(tool: str, cell_file: str) -> list[str]:
    return [tool, "cell", "create", cell_file]


def load_argv(tool: str, name: str, images: Sequence[LoadImage], rpus: Sequence[RpuImage] = ()) -> list[str]:
    argv = [tool, "cell", "load", *cell_ref(name)]
    for image in images:
        if image.string is not None:
            argv += ["-s", image.string]
        elif image.file is not None:
            argv.append(image.file)
        else:
            raise ValueError("a load image needs a file or a string")
        if image.address is not None:
            argv += ["-a", hex(image.address)]
    # The Omnivisor tool only accepts -r groups after all ordinary images.
    for rpu in rpus:
        argv += ["-r", rpu.firmware, str(rpu.rcpu)]
    return argv


def start_argv(tool: str, name: str) -> list[str]:
    return [tool, "cell", "start", *cell_ref(name)]


def shutdown_argv(tool: str, name: str) -> list[str]:
    return [tool, "cell", "shutdown", *cell_ref(name)]


def destroy_argv(tool: str, name: str) -> list[str]:
    return [tool, "cell", "destroy", *cell_ref(name)]


# errno text (glibc strerror) → (error class, what it means for each operation).
_STRERROR_CLASS = {
    "Device or resource busy": ResourceBusy,
    "Operation not permitted": OperationDenied,
    "No such file or directory": CellNotFound,
    "Invalid argument": InvalidConfiguration,
    "File exists": ResourceBusy,
    "Cannot allocate memory": ResourceBusy,
    "Argument list too long": InvalidConfiguration,
    "No such device": BackendUnavailable,
}

_EXPLANATIONS = {
    ("create", "Device or resource busy"): "a CPU or ivshmem device it needs is owned by another cell",
    ("create", "File exists"): "a cell with this name already exists",
    ("create", "Operation not permitted"): "another cell is running/locked and forbids reconfiguration",
    ("create", "Invalid argument"): "the hypervisor rejected the cell configuration (format, revision or not enabled)",
    ("create", "Cannot allocate memory"): "the hypervisor's memory pool is exhausted",
    ("create", "Argument list too long"): "the cell configuration is too large for the hypervisor",
    ("load", "Invalid argument"): "an image does not fit a loadable memory region of the cell",
    ("load", "Device or resource busy"): "the cell's RAM could not be mapped for loading",
    ("load", "Operation not permitted"): "the cell refused to be stopped for loading",
    ("shutdown", "Operation not permitted"): "the cell refused the shutdown request",
    ("destroy", "Operation not permitted"): "another cell is running/locked and forbids reconfiguration",
    ("start", "Invalid argument"): "the hypervisor refused to start it",
}


def check_result(op: str, name: str, returncode: int, stderr: str) -> None:
    """Raise the typed error for a failed `jailhouse cell <op>`; return on success.

    The tool exits 0 or 1 only; the cause is the `<IOCTL_NAME>: <strerror>` line.
    """
    if returncode == 0:
        return
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    detail = lines[-1] if lines else f"exit status {returncode}, no message"
    errno_text = detail.split(": ", 1)[1] if ": " in detail else ""
    if detail.startswith("opening /dev/jailhouse"):
        raise BackendUnavailable(
            f"jailhouse cell {op} {name!r} failed: Jailhouse is not available ({detail}): "
            "is the jailhouse module loaded and the hypervisor enabled?"
        )
    if op != "create" and errno_text == "No such file or directory" and detail.startswith("JAILHOUSE_"):
        raise CellNotFound(f"cell {name!r} does not exist ({detail})")
    cls = _STRERROR_CLASS.get(errno_text, BackendError)
    why = _EXPLANATIONS.get((op, errno_text))
    text = f"jailhouse cell {op} {name!r} failed: {why} ({detail})" if why else f"jailhouse cell {op} {name!r} failed: {detail}"
    raise cls(text)


class JailhouseDriver:
    """Runs the configured `jailhouse` tool and reads the configured sysfs root."""

    def __init__(self, tool: str, sysfs: str | os.PathLike[str], timeout: float = DEFAULT_TOOL_TIMEOUT):
        self.tool = tool
        self.sysfs = Path(sysfs)
        self.timeout = timeout
        #: ``<sysfs>/cells`` as text, for the per-poll reads of :meth:`state_under_id`.
        self._cells_text = os.fspath(self.sysfs / "cells")

    # ---- tool calls -------------------------------------------------------

    def run(self, op: str, name: str, argv: list[str], timeout: float | None = None) -> None:
        """Run one tool command with a deadline; raise its typed error on failure."""
        deadline = self.timeout if timeout is None else timeout
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=deadline,
                text=True,
                errors="replace",
            )
        except FileNotFoundError:
            raise BackendUnavailable(
                f"the jailhouse tool {self.tool!r} is not installed: set [jailhouse] tool in runphi.toml or RUNPHI_JAILHOUSE"
            ) from None
        except PermissionError:
            raise BackendUnavailable(f"the jailhouse tool {self.tool!r} is not executable") from None
        except subprocess.TimeoutExpired:
            raise ToolTimeout(
                f"jailhouse cell {op} {name!r} did not finish within {deadline:g} s: the hypervisor may be hung"
            ) from None
        check_result(op, name, proc.returncode, proc.stderr)

    def create(self, cell_file: str, name: str) -> None:
        """`cell create`; afterwards the cell exists and is `shut down`."""
        self.run("create", name, create_argv(self.tool, cell_file))
        pause_point("create:cell-created")

    def load(self, name: str, images: Sequence[LoadImage], rpus: Sequence[RpuImage] = ()) -> None:
        """`cell load` of every image at its guest address (-r RPU images last)."""
        self.run("load", name, load_argv(self.tool, name, images, rpus))
        pause_point("create:loaded")

    def start(self, name: str) -> None:
        self.run("start", name, start_argv(self.tool, name))

    def shutdown(self, name: str, timeout: float | None = None) -> None:
        self.run("shutdown", name, shutdown_argv(self.tool, name), timeout)

    def destroy(self, name: str, timeout: float | None = None) -> None:
        self.run("destroy", name, destroy_argv(self.tool, name), timeout)

    # ---- sysfs ------------------------------------------------------------

    @property
    def cells_dir(self) -> Path:
        return self.sysfs / "cells"

    def available(self) -> bool:
        """True when the driver is loaded and the hypervisor enabled."""
        try:
            return (self.sysfs / "enabled").read_text().strip() == "1"
        except OSError:
            return False

    def require_available(self) -> None:
        """Raise :class:`BackendUnavailable` unless the hypervisor is enabled."""
        if not self.available():
            raise BackendUnavailable(
                f"Jailhouse is not enabled ({self.sysfs}/enabled is not 1): enable the hypervisor first"
            )

    def cell_id(self, name: str) -> int | None:
        """The ID of the cell called `name` (compared after the driver's 31-char cut), or None."""
        wanted = name[:31]
        try:
            entries = list(os.scandir(self.cells_dir))
        except FileNotFoundError:
            raise BackendUnavailable(f"Jailhouse sysfs {self.cells_dir} is missing: is the jailhouse module loaded?") from None
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                cell_name = Path(entry.path, "name").read_text().rstrip("\n")
            except OSError:
                continue  # destroyed while we looked
            if cell_name == wanted:
                return int(entry.name)
        return None

    def _known_or_looked_up(self, name: str, known_id: int | None) -> int | None:
        """The cell's ID: ``known_id`` (recorded at create) while it still holds the cell
        called ``name`` — one small read — else looked up by name."""
        if known_id is not None and read_attribute(f"{self._cells_text}/{known_id}/name") == name[:31]:
            return known_id
        return self.cell_id(name)

    def _cell_file(self, name: str, attribute: str, known_id: int | None = None) -> str | None:
        cell = self._known_or_looked_up(name, known_id)
        if cell is None:
            return None
        try:
            return (self.cells_dir / str(cell) / attribute).read_text().rstrip("\n")
        except OSError:
            return None

    def cell_state(self, name: str, known_id: int | None = None) -> str | None:
        """The cell's live state string, or None if no such cell exists.

        With the cell's ``known_id`` (recorded at create) this is two small reads
        (name, state) when that ID still holds the cell; else the cell is looked up by name.
        """
        if known_id is not None:
            state = self.state_under_id(known_id, name)
            if state is not None:
                return state
        return self._cell_file(name, "state")

    def state_under_id(self, cell_id: int, name: str) -> str | None:
        """The state of cell ``cell_id`` if that ID still holds the cell called ``name``, else None.

        Two small reads with plain ``os`` calls: a monitor polls this 20 times a second.
        """
        base = f"{self._cells_text}/{cell_id}"
        if read_attribute(f"{base}/name") != name[:31]:
            return None
        return read_attribute(f"{base}/state")

    def cell_cpus(self, name: str) -> frozenset[int] | None:
        text = self._cell_file(name, "cpus_assigned_list")
        return None if text is None else parse_cpu_list(text)

    def failed_cpus(self, name: str, known_id: int | None = None) -> frozenset[int]:
        """The cell's CPUs parked on a fatal trap (empty when none, or no such cell)."""
        text = self._cell_file(name, "cpus_failed_list", known_id)
        return frozenset() if text is None else parse_cpu_list(text)

    def root_cpus(self) -> frozenset[int]:
        """CPUs the root cell currently owns (the ones a new cell may take)."""
        try:
            return parse_cpu_list((self.cells_dir / "0" / "cpus_assigned_list").read_text())
        except FileNotFoundError:
            raise BackendUnavailable("Jailhouse has no root cell: is the hypervisor enabled?") from None

    def cpu_owner(self, cpu: int) -> str | None:
        """Name of the cell that owns `cpu`, or None."""
        for entry in sorted(os.scandir(self.cells_dir), key=lambda e: e.name):
            try:
                cpus = parse_cpu_list(Path(entry.path, "cpus_assigned_list").read_text())
                if cpu in cpus:
                    return Path(entry.path, "name").read_text().rstrip("\n")
            except OSError:
                continue
        return None

    def statistics(self, name: str, known_id: int | None = None) -> CellStatistics:
        """Exit counters of the cell (`vmexits_<kind>` totals and per CPU)."""
        cell = self._known_or_looked_up(name, known_id)
        if cell is None:
            raise CellNotFound(f"cell {name!r} does not exist")
        base = self.cells_dir / str(cell) / "statistics"
        try:
            total = _read_counters(base)
            per_cpu = {
                int(entry.name[3:]): _read_counters(Path(entry.path))
                for entry in os.scandir(base)
                if entry.is_dir() and entry.name.startswith("cpu") and entry.name[3:].isdigit()
            }
        except FileNotFoundError:
            raise CellNotFound(f"cell {name!r} disappeared while reading its statistics") from None
        return CellStatistics(total=total, per_cpu=per_cpu)


    def pools(self) -> list[PoolUse]:
        """The hypervisor's memory and remap pools (``*_pool_size``/``*_pool_used``, pages);
        empty when the driver is not loaded or the hypervisor not enabled."""
        pools = []
        for name in ("mem", "remap"):
            size = read_attribute(f"{self.sysfs}/{name}_pool_size")
            used = read_attribute(f"{self.sysfs}/{name}_pool_used")
            if size and used and size.isdigit() and used.isdigit() and int(size) > 0:
                pools.append(PoolUse(name=name, size_pages=int(size), used_pages=int(used)))
        return pools


def _read_counters(directory: Path) -> dict[str, int]:
    counters: dict[str, int] = {}
    for entry in os.scandir(directory):
        if entry.name.startswith("vmexits_") and entry.is_file():
            text = Path(entry.path).read_text().strip()
            counters[entry.name.removeprefix("vmexits_")] = max(int(text or 0), 0)
    return counters


def parse_cpu_list(text: str) -> frozenset[int]:
    """Parse kernel list syntax (`0-1,3`, empty) into a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            cpus.update(range(int(low), int(high) + 1))
        else:
            cpus.add(int(part))
    return frozenset(cpus)
