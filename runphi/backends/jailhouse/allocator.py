"""Node-wide resource ledger and allocator: CPUs, cell RAM, UART slots, ivshmem BDFs, RPUs.

One JSON ledger per node (`<state_dir>/jailhouse-ledger.json`) records what every
container holds. It is changed only under an exclusive `flock` on
`<state_dir>/jailhouse-ledger.lock` and replaced atomically (temp file, fsync,
rename), so concurrent `create`s never hand out the same resource and a crash
never leaves a half-written ledger.

Free CPUs are the root cell's *current* `cpus_assigned_list` (sysfs) that the
platform lets cells have, minus the ledger; the root always keeps one CPU. Free RAM
is the platform's pools minus the ledger, so released segments coalesce by
construction; requests are placed best fit with the platform's alignment.
A request is all or nothing: on failure nothing is recorded and the error names
every missing resource and what is free.

Crash safety: next to the ledger, every allocation is also kept as its own claim
file (`<state_dir>/jailhouse-claims/<id>.json`, with the cell name and the
allocating process), written before the ledger and removed after it. When the
ledger is missing while claims exist, or is corrupt, it is rebuilt from the claims
that reality still backs — a cell of that name exists in the hypervisor's cell
list, or the process that allocated is still alive (a create in flight) — with one
warning, and the verb carries on. Claims that nothing backs are dropped.
"""

from __future__ import annotations

import fcntl
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from runphi.backends.jailhouse.cpulist import CpuListError, format_cpu_list, parse_cpu_list
from runphi.backends.jailhouse.errors import AllocationError
from runphi.backends.jailhouse.names import cell_name
from runphi.errors import MALFORMED_INPUT
from runphi.pausepoint import pause_point
from runphi.backends.jailhouse.platform import MiB, PAGE_SIZE, Platform

if TYPE_CHECKING:
    from runphi.image import BootDescription
    from runphi.oci import Config

LEDGER_NAME = "jailhouse-ledger.json"
LOCK_NAME = "jailhouse-ledger.lock"
CLAIMS_DIR = "jailhouse-claims"
LEDGER_VERSION = 1


class ResourceRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What one ZIC asks for. `cpus` (explicit set) wins over `cpu_count`."""

    cpus: frozenset[int] | None = None
    cpu_count: int = 1
    memory: int = 64 * MiB
    network: bool = False
    rpu: bool = False


class Segment(msgspec.Struct, frozen=True):
    """Physical memory [start, start + size)."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


class Allocation(msgspec.Struct, frozen=True, kw_only=True):
    """What one container holds. `ram` covers the main RAM then, if any, the low RAM.

    `uart_slot` indexes `Platform.uarts` (None on a shared-UART platform);
    `ivshmem_slot` is the PCI slot of the network link (bdf = slot << 3).
    """

    container_id: str
    cpus: frozenset[int] = frozenset()
    ram: Segment
    main_ram_size: int
    uart_slot: int | None = None
    ivshmem_slot: int | None = None
    rpus: frozenset[int] = frozenset()


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """One allocation on its own (what a ledger rebuild starts from)."""

    allocation: Allocation
    cell_name: str
    #: The allocating process (pid, start time): alive = its create is still in flight.
    pid: int
    start_time: int


class Ledger(msgspec.Struct, kw_only=True):
    """The ledger file: which platform, and every container's allocation."""

    version: int = LEDGER_VERSION
    platform: str = ""
    allocations: dict[str, Allocation] = {}


def request_from(config: Config | None, boot: BootDescription | None, platform: Platform) -> ResourceRequest:
    """The resources a ZIC asks for, by precedence.

    CPUs: boot `vcpu_pinning` pcpus, boot `vcpus`, OCI `linux.resources.cpu.cpus`,
    ceil(quota/period), else 1. Memory: boot `memory` (MiB), OCI memory limit, else
    the platform default; rounded up to whole pages. Network and RPU from the boot
    description. Raises AllocationError for an unparsable OCI cpuset.
    """
    cpu = config.linux.resources.cpu if config and config.linux and config.linux.resources else None
    mem = config.linux.resources.memory if config and config.linux and config.linux.resources else None
    explicit: frozenset[int] | None = None
    count = 1
    if boot is not None and boot.pinned_cpus:
        explicit = boot.pinned_cpus
    elif boot is not None and boot.vcpus:
        count = boot.vcpus
    elif cpu is not None and cpu.cpus:
        try:
            explicit = parse_cpu_list(cpu.cpus)
        except CpuListError as exc:
            raise AllocationError(f"linux.resources.cpu.cpus: {exc}") from None
    elif cpu is not None and cpu.quota and cpu.quota > 0 and cpu.period and cpu.period > 0:
        count = math.ceil(cpu.quota / cpu.period)
    if boot is not None and boot.memory_mib:
        memory = boot.memory_mib * MiB
    elif mem is not None and mem.limit and mem.limit > 0:
        memory = mem.limit
    else:
        memory = platform.memory.default_size
    return ResourceRequest(
        cpus=explicit,
        cpu_count=len(explicit) if explicit is not None else count,
        memory=_round_up(memory, PAGE_SIZE),
        network=bool(boot and boot.net),
        rpu=bool(boot and boot.rpu_req),
    )


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def free_segments(pools: list[Segment], used: list[Segment]) -> list[Segment]:
    """The parts of `pools` not covered by `used`, ascending, adjacent pieces merged."""
    free: list[Segment] = []
    busy = sorted(used, key=lambda s: s.start)
    for pool in sorted(pools, key=lambda s: s.start):
        cursor = pool.start
        for seg in busy:
            if seg.end <= cursor or seg.start >= pool.end:
                continue
            if seg.start > cursor:
                free.append(Segment(cursor, seg.start - cursor))
            cursor = max(cursor, seg.end)
        if cursor < pool.end:
            free.append(Segment(cursor, pool.end - cursor))
    merged: list[Segment] = []
    for seg in free:
        if merged and merged[-1].end == seg.start:
            merged[-1] = Segment(merged[-1].start, merged[-1].size + seg.size)
        else:
            merged.append(seg)
    return merged


def best_fit(free: list[Segment], size: int, alignment: int) -> Segment | None:
    """The aligned placement of `size` bytes in the smallest free segment that fits it."""
    best: tuple[int, int] | None = None  # (leftover, start)
    for seg in free:
        start = _round_up(seg.start, alignment)
        if start + size <= seg.end:
            candidate = (seg.size - size, start)
            if best is None or candidate < best:
                best = candidate
    return None if best is None else Segment(best[1], size)


def _size_text(size: int) -> str:
    return f"{size // MiB} MiB" if size % MiB == 0 else f"{size:#x} bytes"


def _describe_free(free: list[Segment]) -> str:
    return ", ".join(f"{_size_text(s.size)} at {s.start:#x}" for s in free) or "none"


class Allocator:
    """Allocation and release of node resources for one platform, under the ledger lock.

    `state_dir` holds the ledger; `sysfs` is the Jailhouse sysfs root (its
    `cells/0/cpus_assigned_list` is the root cell's current CPU set).
    """

    def __init__(self, platform: Platform, state_dir: Path, sysfs: Path,
                 warn: Callable[[str], None] | None = None) -> None:
        self.platform = platform
        self.state_dir = Path(state_dir)
        self.sysfs = Path(sysfs)
        self._warn = warn or _warn_on_stderr

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_NAME

    # --- ledger I/O ---

    @contextmanager
    def _locked(self, exclusive: bool = True) -> Iterator[Ledger]:
        """Hold the ledger lock (shared for readers); yields the current ledger (writers save explicitly)."""
        from runphi.files import unsafe_dir_reason

        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise AllocationError(f"cannot make the node state directory {self.state_dir}: {exc.strerror}") from None
        problem = unsafe_dir_reason(self.state_dir)
        if problem:
            raise AllocationError(f"node state directory {self.state_dir} {problem}")
        try:
            fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AllocationError(f"cannot open the resource ledger lock in {self.state_dir}: {exc.strerror}") from None
        try:
            # A rebuild writes: readers take the lock exclusively too when it is needed.
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive or self._needs_rebuild() else fcntl.LOCK_SH)
            yield self._read()
        finally:
            os.close(fd)  # releases the flock

    @property
    def claims_dir(self) -> Path:
        return self.state_dir / CLAIMS_DIR

    def _needs_rebuild(self) -> bool:
        try:
            msgspec.json.decode(self.ledger_path.read_bytes(), type=Ledger)
        except FileNotFoundError:
            return any(self.claims_dir.glob("*.json"))
        except (OSError, *MALFORMED_INPUT):
            return True
        return False

    def _read(self) -> Ledger:
        """The ledger; rebuilt from the claims (with a warning) when missing or corrupt."""
        try:
            data = self.ledger_path.read_bytes()
        except FileNotFoundError:
            if not any(self.claims_dir.glob("*.json")):
                return Ledger(platform=self.platform.name)
            return self._rebuild("is missing")
        except OSError as exc:
            raise AllocationError(f"cannot read the resource ledger {self.ledger_path}: {exc.strerror}") from None
        try:
            ledger = msgspec.json.decode(data, type=Ledger)
        except MALFORMED_INPUT as exc:
            return self._rebuild(f"is corrupt ({exc})")
        if ledger.allocations and ledger.platform != self.platform.name:
            raise AllocationError(
                f"resource ledger {self.ledger_path} belongs to platform {ledger.platform!r}, not "
                f"{self.platform.name!r}; release its containers or fix [jailhouse] platform"
            )
        ledger.platform = self.platform.name
        return ledger

    def _rebuild(self, why: str) -> Ledger:
        """A new ledger from the claims reality backs (caller holds the lock exclusively)."""
        cells = self._cell_names()
        kept: dict[str, Allocation] = {}
        dropped: list[str] = []
        for path in sorted(self.claims_dir.glob("*.json")):
            claim = self._read_claim(path)
            if claim is not None and (claim.cell_name in cells or _alive(claim.pid, claim.start_time)):
                kept[claim.allocation.container_id] = claim.allocation
            else:
                dropped.append(path.stem)
                path.unlink(missing_ok=True)
        ledger = Ledger(platform=self.platform.name, allocations=kept)
        self._write(ledger)
        self._warn(f"resource ledger {self.ledger_path} {why}: rebuilt from {len(kept)} claim(s) backed by a "
                   f"cell or a live create" + (f", dropped stale claims of {', '.join(dropped)}" if dropped else ""))
        return ledger

    def _read_claim(self, path: Path) -> Claim | None:
        try:
            return msgspec.json.decode(path.read_bytes(), type=Claim)
        except (OSError, *MALFORMED_INPUT):
            return None

    def _cell_names(self) -> frozenset[str]:
        """Names of the cells the hypervisor lists now (empty when it is not enabled)."""
        names = set()
        try:
            entries = list((self.sysfs / "cells").iterdir())
        except OSError:
            return frozenset()
        for entry in entries:
            try:
                names.add((entry / "name").read_text().rstrip("\n"))
            except OSError:
                continue
        return frozenset(names)

    def _write_claim(self, allocation: Allocation) -> None:
        from runphi.procfs import process_start_time

        pid = os.getpid()
        claim = Claim(allocation=allocation, cell_name=cell_name(allocation.container_id), pid=pid,
                      start_time=process_start_time(pid) or 0)
        try:
            self.claims_dir.mkdir(mode=0o700, exist_ok=True)
            _atomic_write(self.claims_dir / f"{allocation.container_id}.json", msgspec.json.encode(claim))
        except OSError as exc:
            raise AllocationError(f"cannot write the resource claim of {allocation.container_id} in "
                                  f"{self.claims_dir}: {exc.strerror}", container_id=allocation.container_id) from None

    def _remove_claim(self, container_id: str) -> None:
        (self.claims_dir / f"{container_id}.json").unlink(missing_ok=True)

    def _write(self, ledger: Ledger) -> None:
        tmp = self.ledger_path.with_name(f".{LEDGER_NAME}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.encode(ledger))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.ledger_path)
            dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise AllocationError(f"cannot write the resource ledger {self.ledger_path}: {exc.strerror}") from None

    # --- queries ---

    def root_cpus(self) -> frozenset[int]:
        """The root cell's current CPUs, from sysfs (kernel list syntax)."""
        path = self.sysfs / "cells" / "0" / "cpus_assigned_list"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise AllocationError(
                f"Jailhouse is not enabled ({path} does not exist): enable the hypervisor before creating ZICs"
            ) from None
        except OSError as exc:
            raise AllocationError(f"cannot read the root cell's CPUs from {path}: {exc.strerror}") from None
        try:
            return parse_cpu_list(text)
        except CpuListError as exc:
            raise AllocationError(f"root cell CPU list {path}: {exc}") from None

    def allocations(self) -> list[Allocation]:
        """Every recorded allocation (what a ledger rebuild compares with reality)."""
        with self._locked(exclusive=False) as ledger:
            return list(ledger.allocations.values())

    # --- changes ---

    def allocate(self, container_id: str, request: ResourceRequest) -> Allocation:
        """Reserve everything `request` needs for `container_id`, or nothing.

        Raises AllocationError if the container already holds resources, or naming
        every resource that is short together with what is free.
        """
        with self._locked() as ledger:
            if container_id in ledger.allocations:
                raise AllocationError(
                    f"container {container_id} already holds node resources; delete it first",
                    container_id=container_id,
                )
            allocation = self._plan(container_id, request, list(ledger.allocations.values()))
            ledger.allocations[container_id] = allocation
            self._write_claim(allocation)
            self._write(ledger)
        pause_point("create:allocated")
        return allocation

    def release(self, container_id: str) -> Allocation | None:
        """Give back what `container_id` holds; returns it, or None if it held nothing."""
        pause_point("delete:cell-destroyed")
        with self._locked() as ledger:
            allocation = ledger.allocations.pop(container_id, None)
            if allocation is not None:
                self._write(ledger)
            self._remove_claim(container_id)
            return allocation

    def preview(self, container_id: str, request: ResourceRequest, root_cpus: frozenset[int] | None = None) -> Allocation:
        """What `allocate` would reserve now, without recording it.

        A container already in the ledger gets its recorded allocation. `root_cpus`
        stands in for the sysfs CPU list (for planning on a machine without Jailhouse).
        """
        others: list[Allocation] = []
        if self.state_dir.is_dir():  # no state dir: nothing allocated on this node yet
            with self._locked(exclusive=False) as ledger:
                held = ledger.allocations.get(container_id)
                if held is not None:
                    return held
                others = list(ledger.allocations.values())
        if root_cpus is None:
            return self._plan(container_id, request, others)
        return _FixedRoot(self.platform, self.state_dir, self.sysfs, root_cpus)._plan(container_id, request, others)

    def replace_all(self, allocations: list[Allocation]) -> None:
        """Overwrite the ledger with `allocations` (for rebuilding it from reality)."""
        with self._locked() as ledger:
            ledger.allocations = {a.container_id: a for a in allocations}
            for stale in set(p.stem for p in self.claims_dir.glob("*.json")) - set(ledger.allocations):
                self._remove_claim(stale)
            for allocation in allocations:
                self._write_claim(allocation)
            self._write(ledger)

    # --- the decision, pure given the ledger ---

    def _plan(self, container_id: str, request: ResourceRequest, held: list[Allocation]) -> Allocation:
        missing: list[str] = []
        cpus = self._pick_cpus(request, held, missing) if not request.rpu or request.cpus else frozenset()
        ram, main_size = self._pick_ram(request, held, missing)
        uart = self._pick_uart(held, missing)
        slot = self._pick_ivshmem(held, missing) if request.network else None
        rpus = self._pick_rpu(held, missing) if request.rpu else frozenset()
        if missing:
            raise AllocationError(
                f"cannot create container {container_id} on {self.platform.name}: " + "; ".join(missing),
                container_id=container_id,
            )
        assert ram is not None
        return Allocation(
            container_id=container_id, cpus=cpus, ram=ram, main_ram_size=main_size,
            uart_slot=uart, ivshmem_slot=slot, rpus=rpus,
        )  # fmt: skip

    def _pick_cpus(self, request: ResourceRequest, held: list[Allocation], missing: list[str]) -> frozenset[int]:
        root = self.root_cpus()
        taken = frozenset().union(*(a.cpus for a in held))
        root_left = root - taken
        givable = sorted((root_left & self.platform.cell_cpu_set))
        # the root keeps at least one CPU: never give away its last one
        max_give = min(len(givable), len(root_left) - 1)
        if request.cpus is not None:
            wanted = request.cpus
            unavailable = wanted - frozenset(givable)
            if unavailable or len(wanted) > max_give:
                why = f"CPUs {format_cpu_list(unavailable)} are not free" if unavailable else "the root cell must keep one CPU"
                missing.append(
                    f"CPUs {format_cpu_list(wanted)} requested, {why} "
                    f"(free for cells: {format_cpu_list(givable[:max_give]) or 'none'})"
                )
                return frozenset()
            return wanted
        if request.cpu_count < 1 or request.cpu_count > max_give:
            missing.append(
                f"{request.cpu_count} CPU(s) requested, {max(max_give, 0)} free for cells "
                f"({format_cpu_list(givable[:max_give]) or 'none'}; the root cell keeps at least one)"
            )
            return frozenset()
        return frozenset(givable[: request.cpu_count])

    def _pick_ram(self, request: ResourceRequest, held: list[Allocation], missing: list[str]) -> tuple[Segment | None, int]:
        layout = self.platform.memory
        if request.memory <= 0:
            missing.append(f"{request.memory} bytes of cell RAM requested: a cell needs a positive amount")
            return None, request.memory
        total = request.memory + layout.low_ram_size
        pools = [Segment(p.start, p.size) for p in layout.pools]
        free = free_segments(pools, [a.ram for a in held])
        placed = best_fit(free, total, layout.alignment)
        if placed is None:
            missing.append(
                f"{_size_text(total)} of cell RAM requested ({layout.alignment:#x}-aligned), "
                f"free: {_describe_free(free)}"
            )
        return placed, request.memory

    def _pick_uart(self, held: list[Allocation], missing: list[str]) -> int | None:
        if not self.platform.per_cell_uarts:
            return None
        used = {a.uart_slot for a in held}
        for index in range(len(self.platform.uarts)):
            if index not in used:
                return index
        missing.append(f"a console UART requested, all {len(self.platform.uarts)} UART slots are in use")
        return None

    def _pick_ivshmem(self, held: list[Allocation], missing: list[str]) -> int | None:
        ivshmem = self.platform.ivshmem
        if ivshmem is None:
            missing.append(f"networking requested, platform {self.platform.name} has no ivshmem links")
            return None
        used = {a.ivshmem_slot for a in held}
        for slot in ivshmem.slots:
            if slot not in used:
                return slot
        missing.append(f"a network link requested, all {len(ivshmem.slots)} ivshmem links are in use")
        return None

    def _pick_rpu(self, held: list[Allocation], missing: list[str]) -> frozenset[int]:
        if not self.platform.rpus:
            missing.append(f"an RPU requested (rpu_req), platform {self.platform.name} has none")
            return frozenset()
        used = frozenset().union(*(a.rpus for a in held))
        for rpu in self.platform.rpus:
            if rpu.id not in used:
                return frozenset({rpu.id})
        missing.append(f"an RPU requested, all {len(self.platform.rpus)} RPUs are in use")
        return frozenset()


def _alive(pid: int, start_time: int) -> bool:
    from runphi.procfs import process_start_time

    return pid > 0 and process_start_time(pid) == start_time


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _warn_on_stderr(message: str) -> None:
    import sys

    sys.stderr.write(f"runphi: warning: {message}\n")
    sys.stderr.flush()


class _FixedRoot(Allocator):
    """An allocator whose root CPU set is given instead of read from sysfs (previews)."""

    def __init__(self, platform: Platform, state_dir: Path, sysfs: Path, root: frozenset[int]) -> None:
        super().__init__(platform, state_dir, sysfs)
        self._root = root

    def root_cpus(self) -> frozenset[int]:
        return self._root
