"""The node resource ledger shared by every backend: CPUs, cell RAM, UART slots, ivshmem links, RPUs.

One JSON ledger per node (`<state_dir>/jailhouse-ledger.json`; the file names
predate other backends and are kept so existing nodes keep their ledger) records
what every container holds, whichever backend runs it. It is changed only under an
exclusive `flock` on `<state_dir>/jailhouse-ledger.lock` and replaced atomically
(temp file, fsync, rename), so concurrent `create`s never hand out the same
resource and a crash never leaves a half-written ledger.

A backend supplies a platform (anything satisfying `LedgerPlatform`) and three
callables to `NodeLedger`: the root's current CPU set (the host side, e.g.
Jailhouse's root cell), the names of the cells that exist now, and the cell name
of a container id.

Free CPUs are the root's *current* CPUs that the platform lets cells have, minus
the ledger; the root always keeps `platform.root_keeps_cpus` of them. Free RAM is
the platform's pools minus the ledger, so released segments coalesce by
construction; requests are placed best fit with the platform's alignment.
A request is all or nothing: on failure nothing is recorded and the error names
every missing resource and what is free.

Crash safety: next to the ledger, every allocation is also kept as its own claim
file (`<state_dir>/jailhouse-claims/<id>.json`, with the cell name and the
allocating process), written before the ledger and removed after it. When the
ledger is missing while claims exist, or is corrupt, it is rebuilt from the claims
that reality still backs — a cell of that name exists now (as the backend reports
it), or the process that allocated is still alive (a create in flight) — with one
warning, and the verb carries on. Claims that nothing backs are dropped.
"""

from __future__ import annotations

import fcntl
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import msgspec

from runphi.backends.cpulist import CpuListError, format_cpu_list, parse_cpu_list
from runphi.errors import MALFORMED_INPUT, RunphiError
from runphi.files import atomic_write
from runphi.pausepoint import pause_point

if TYPE_CHECKING:
    from runphi.image import BootDescription
    from runphi.oci import Config

__all__ = [
    "CLAIMS_DIR", "LEDGER_NAME", "LEDGER_VERSION", "LOCK_NAME", "PAGE_SIZE", "MiB",
    "Allocation", "AllocationError", "Claim", "Ledger", "LedgerIvshmem", "LedgerMemory", "LedgerPlatform",
    "LedgerPool", "LedgerRpu", "NodeLedger", "ResourceRequest", "Segment", "best_fit", "free_segments",
    "request_from",
]

PAGE_SIZE = 0x1000
MiB = 1 << 20

LEDGER_NAME = "jailhouse-ledger.json"
LOCK_NAME = "jailhouse-ledger.lock"
CLAIMS_DIR = "jailhouse-claims"
LEDGER_VERSION = 1


class AllocationError(RunphiError):
    """Node resources cannot be allocated or released."""


# --- what the ledger reads of a platform (read-only, so frozen Structs satisfy it) ---


class LedgerPool(Protocol):
    """Physical RAM [start, end) the root can give to cells."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


class LedgerMemory(Protocol):
    """Where cell RAM comes from: each allocation is `low_ram_size` + the request, `alignment`-aligned."""

    @property
    def pools(self) -> Sequence[LedgerPool]: ...

    @property
    def low_ram_size(self) -> int: ...

    @property
    def alignment(self) -> int: ...

    @property
    def default_size(self) -> int: ...


class LedgerIvshmem(Protocol):
    """The network links a cell can get: one slot each (Jailhouse: an ivshmem PCI slot)."""

    @property
    def slots(self) -> Sequence[int]: ...

    @property
    def kind(self) -> str:
        """What a link is, in the messages ("ivshmem", "tap")."""


class LedgerRpu(Protocol):
    """A real-time core a cell can get."""

    @property
    def id(self) -> int: ...


class LedgerPlatform(Protocol):
    """One board as the ledger sees it: what the root may give away."""

    @property
    def name(self) -> str: ...

    @property
    def memory(self) -> LedgerMemory: ...

    @property
    def cell_cpu_set(self) -> frozenset[int]:
        """CPUs the root may give to cells."""
        ...

    @property
    def root_keeps_cpus(self) -> int:
        """How many CPUs the root (the host) always keeps."""
        ...

    @property
    def per_cell_uarts(self) -> bool:
        """Whether each cell gets a UART slot of its own (else none is allocated)."""
        ...

    @property
    def uarts(self) -> Sequence[object]:
        """The UART slots (only their number counts)."""
        ...

    @property
    def ivshmem(self) -> LedgerIvshmem | None: ...

    @property
    def default_console(self) -> str:
        """A ZIC's console when its image does not say ("uart", "hypervisor")."""
        ...

    @property
    def offers_hypervisor_console(self) -> bool:
        """Whether the hypervisor console can be leased to a ZIC."""
        ...

    @property
    def rpus(self) -> Sequence[LedgerRpu]: ...


#: Annotation: with the hypervisor console leased to another ZIC, run without a console.
CONSOLE_OPTIONAL_ANNOTATION = "org.runphi.console-optional"


class ResourceRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What one ZIC asks for. `cpus` (explicit set) wins over `cpu_count`."""

    cpus: frozenset[int] | None = None
    cpu_count: int = 1
    memory: int = 64 * MiB
    network: bool = False
    rpu: bool = False
    #: The console it streams: "uart" (a UART slot where the platform has them),
    #: "hypervisor" (the lease of the hypervisor console), "none".
    console: str = "uart"
    #: With the hypervisor console leased to another ZIC: run without a console instead of failing.
    console_optional: bool = False


class Segment(msgspec.Struct, frozen=True):
    """Physical memory [start, start + size)."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


class Allocation(msgspec.Struct, frozen=True, kw_only=True):
    """What one container holds. `ram` covers the main RAM then, if any, the low RAM.

    `uart_slot` indexes the platform's `uarts` (None on a shared-UART platform);
    `ivshmem_slot` is the PCI slot of the network link (bdf = slot << 3).
    """

    container_id: str
    cpus: frozenset[int] = frozenset()
    ram: Segment
    main_ram_size: int
    uart_slot: int | None = None
    ivshmem_slot: int | None = None
    rpus: frozenset[int] = frozenset()
    #: Holds the lease of the hypervisor console (its cell writes with the debug-console hypercall).
    hypervisor_console: bool = False


class ResourceUse(msgspec.Struct, frozen=True, kw_only=True):
    """One kind of node resource: how much of it ZICs hold, and how much is free."""

    resource: str
    used: int
    free: int


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


def request_from(config: Config | None, boot: BootDescription | None, platform: LedgerPlatform) -> ResourceRequest:
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
    annotations = config.annotations if config is not None else {}
    return ResourceRequest(
        cpus=explicit,
        cpu_count=len(explicit) if explicit is not None else count,
        memory=_round_up(memory, PAGE_SIZE),
        network=bool(boot and boot.net),
        rpu=bool(boot and boot.rpu_req),
        console=boot.console if boot is not None and boot.console else platform.default_console,
        console_optional=annotations.get(CONSOLE_OPTIONAL_ANNOTATION, "").lower() in ("true", "1", "yes"),
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


class NodeLedger:
    """Allocation and release of node resources for one platform, under the ledger lock.

    `state_dir` holds the ledger and the claims. The backend supplies `root_cpus`
    (the root's current CPU set; raises AllocationError itself when it cannot be
    read), `live_cells` (names of the cells that exist now, for the rebuild from
    claims) and `cell_name` (a container id's cell name, stored in its claim).
    """

    #: The setting that names the platform, in the error for a ledger of another platform.
    platform_setting: ClassVar[str] = "the platform setting"

    def __init__(self, platform: LedgerPlatform, state_dir: Path, *,
                 root_cpus: Callable[[], frozenset[int]],
                 live_cells: Callable[[], frozenset[str]],
                 cell_name: Callable[[str], str],
                 warn: Callable[[str], None] | None = None) -> None:
        self.platform = platform
        self.state_dir = Path(state_dir)
        self._root_cpus = root_cpus
        self._live_cells = live_cells
        self._cell_name = cell_name
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
                f"{self.platform.name!r}; release its containers or fix {self.platform_setting}"
            )
        ledger.platform = self.platform.name
        return ledger

    def _rebuild(self, why: str) -> Ledger:
        """A new ledger from the claims reality backs (caller holds the lock exclusively)."""
        cells = self._live_cells()
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

    def _write_claim(self, allocation: Allocation) -> None:
        from runphi.procfs import process_start_time

        pid = os.getpid()
        claim = Claim(allocation=allocation, cell_name=self._cell_name(allocation.container_id), pid=pid,
                      start_time=process_start_time(pid) or 0)
        try:
            self.claims_dir.mkdir(mode=0o700, exist_ok=True)
            atomic_write(self.claims_dir / f"{allocation.container_id}.json", msgspec.json.encode(claim))
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
        """The root's current CPUs, as the backend reads them."""
        return self._root_cpus()

    def allocations(self) -> list[Allocation]:
        """Every recorded allocation (what a ledger rebuild compares with reality)."""
        with self._locked(exclusive=False) as ledger:
            return list(ledger.allocations.values())

    def usage(self) -> list[ResourceUse]:
        """How much of each kind of resource the platform lends is held, and how much is free:
        CPUs, cell RAM (bytes), console slots (UARTs and the hypervisor console), network
        links, RPUs."""
        held = self.allocations()
        platform = self.platform
        pool_bytes = sum(pool.end - pool.start for pool in platform.memory.pools)
        uarts = len(platform.uarts) if platform.per_cell_uarts else 0
        slots = uarts + (1 if platform.offers_hypervisor_console else 0)
        slots_used = (sum(1 for a in held if a.uart_slot is not None) if uarts else 0) + sum(
            1 for a in held if a.hypervisor_console)
        links = len(platform.ivshmem.slots) if platform.ivshmem is not None else 0
        counts = {
            "cpus": (len(platform.cell_cpu_set), len(frozenset().union(*(a.cpus for a in held)))),
            "ram_bytes": (pool_bytes, sum(a.ram.size for a in held)),
            "console_slots": (slots, slots_used),
            "links": (links, sum(1 for a in held if a.ivshmem_slot is not None)),
            "rpus": (len(platform.rpus), sum(len(a.rpus) for a in held)),
        }
        return [ResourceUse(resource=name, used=used, free=max(total - used, 0))
                for name, (total, used) in counts.items()]

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
        stands in for the root's current CPU set (for planning on a machine without
        the hypervisor).
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
        return self._with_root(root_cpus)._plan(container_id, request, others)

    def _with_root(self, root: frozenset[int]) -> NodeLedger:
        """A planner like this ledger whose root CPU set is `root` (previews)."""
        return NodeLedger(self.platform, self.state_dir, root_cpus=lambda: root, live_cells=self._live_cells,
                          cell_name=self._cell_name, warn=self._warn)

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
        uart = self._pick_uart(held, missing) if request.console == "uart" else None
        hypervisor = self._pick_hypervisor_console(request, held, missing) if request.console == "hypervisor" else False
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
            uart_slot=uart, ivshmem_slot=slot, rpus=rpus, hypervisor_console=hypervisor,
        )  # fmt: skip

    def _pick_cpus(self, request: ResourceRequest, held: list[Allocation], missing: list[str]) -> frozenset[int]:
        root = self.root_cpus()
        keep = self.platform.root_keeps_cpus
        taken = frozenset().union(*(a.cpus for a in held))
        root_left = root - taken
        givable = sorted((root_left & self.platform.cell_cpu_set))
        # the root keeps `keep` CPUs: never give those away
        max_give = min(len(givable), len(root_left) - keep)
        free = format_cpu_list(givable[:max(max_give, 0)]) or "none"
        if request.cpus is not None:
            wanted = request.cpus
            unavailable = wanted - frozenset(givable)
            if unavailable or len(wanted) > max_give:
                why = (f"CPUs {format_cpu_list(unavailable)} are not free" if unavailable
                       else f"the root cell must keep {'one CPU' if keep == 1 else f'{keep} CPUs'}")
                missing.append(f"CPUs {format_cpu_list(wanted)} requested, {why} (free for cells: {free})")
                return frozenset()
            return wanted
        if request.cpu_count < 1 or request.cpu_count > max_give:
            keeps = f"; the root cell keeps at least {'one' if keep == 1 else keep}" if keep > 0 else ""
            missing.append(f"{request.cpu_count} CPU(s) requested, {max(max_give, 0)} free for cells ({free}{keeps})")
            return frozenset()
        return frozenset(givable[: request.cpu_count])

    def _pick_ram(self, request: ResourceRequest, held: list[Allocation], missing: list[str]) -> tuple[Segment | None, int]:
        layout = self.platform.memory
        if request.memory <= 0:
            missing.append(f"{request.memory} bytes of cell RAM requested: a cell needs a positive amount")
            return None, request.memory
        total = request.memory + layout.low_ram_size
        pools = [Segment(p.start, p.end - p.start) for p in layout.pools]
        free = free_segments(pools, [a.ram for a in held])
        placed = best_fit(free, total, layout.alignment)
        if placed is None:
            missing.append(
                f"{_size_text(total)} of cell RAM requested ({layout.alignment:#x}-aligned), "
                f"free: {_describe_free(free)}"
            )
        return placed, request.memory

    def _pick_hypervisor_console(self, request: ResourceRequest, held: list[Allocation],
                                 missing: list[str]) -> bool:
        """The lease of the hypervisor console, when free; with ``console_optional`` a taken
        lease means no console rather than a failure."""
        if not self.platform.offers_hypervisor_console:
            missing.append(f"the hypervisor console requested, platform {self.platform.name} does not offer it")
            return False
        holder = next((a.container_id for a in held if a.hypervisor_console), None)
        if holder is None:
            return True
        if not request.console_optional:
            missing.append(f"the hypervisor console is leased to container {holder} (one ZIC at a time: its "
                           "ring is untagged); set the annotation org.runphi.console-optional=true to run "
                           "without a console")
        return False

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
        missing.append(f"a network link requested, all {len(ivshmem.slots)} {ivshmem.kind} links are in use")
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


def _warn_on_stderr(message: str) -> None:
    import sys

    sys.stderr.write(f"runphi: warning: {message}\n")
    sys.stderr.flush()


