"""lifecycle: create -> start -> first console byte, kill -> exit, delete, exit/failure detection.

    python -m tools.bench.lifecycle [--quick]      (or: python -m tools.bench lifecycle)

Real ZICs on the simulator, driven through the real ``runphi`` CLI, the monitor
adopted by this process as by containerd's shim:

* first byte: from invoking ``create`` to the guest's first byte on the
  monitor's stdout (a pipe held here), and from ``start`` to it;
* kill: from invoking ``kill TERM`` to the monitor's exit becoming visible
  (its pidfd turns readable); delete: the verb's wall time;
* detection: a guest that powers itself off (exit 0) or traps (``failed``, exit
  139). The cell's sysfs ``state`` file is written at the transition, so its
  mtime is when the hypervisor changed state; detection latency is the time
  from then to the monitor's exit. Budget: <= 200 ms (every sample).

Both for script guests and, when QEMU and the aarch64 cross compiler are
there, the ``hello`` inmate under the simulator's QEMU engine (a real guest
that prints and powers off through PSCI).
"""

from __future__ import annotations

import os
import select
import sys
import time
from pathlib import Path

from .harness import Budget, Check, Options, Series, SuiteResult, standalone
from .zic import ExitWatch, Node, guest_script, sim_node

DETECTION_BUDGET_S = 0.2


def _cell_state_file(node: Node, cell_name: str) -> Path:
    """The sysfs ``state`` file of the cell called ``cell_name``."""
    for entry in node.sim.sysfs_path("cells").iterdir():
        try:
            if (entry / "name").read_text().strip() == cell_name:
                return entry / "state"
        except FileNotFoundError:
            continue
    raise RuntimeError(f"no cell named {cell_name!r} in the simulator's sysfs")


def _first_byte(fd: int, timeout: float) -> float:
    """perf_counter when ``fd`` delivered its first byte."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready or not os.read(fd, 1):
        raise TimeoutError(f"no console byte within {timeout} s")
    return time.perf_counter()


class Sample:
    """One container's timings."""

    def __init__(self) -> None:
        self.create_to_byte = self.start_to_byte = self.stop_to_exit = self.delete = 0.0
        self.detection: float | None = None
        self.status = -1


def one_lifecycle(node: Node, cid: str, guest: bytes, *, stop: str, timeout: float = 30.0) -> Sample:
    """create, start, first byte; then ``stop`` = "kill" (runphi kill TERM) or "self" (the guest ends)."""
    sample = Sample()
    bundle = node.bundle(cid, guest)
    out_r, out_w = os.pipe()
    try:
        begin = time.perf_counter()
        pid = node.create(cid, bundle, stdout=out_w)
        os.close(out_w)
        out_w = -1
        watch = ExitWatch(pid)
        started = time.perf_counter()
        node.run("start", cid)
        first = _first_byte(out_r, timeout)
        sample.create_to_byte, sample.start_to_byte = first - begin, first - started
        state_file = _cell_state_file(node, _cell_name(node, cid))
        if stop == "kill":
            killing = time.perf_counter()
            node.run("kill", cid, "TERM")
            sample.status, seen = watch.wait(timeout)
            sample.stop_to_exit = seen - killing
        else:
            sample.status, seen = watch.wait(timeout)
            seen_wall = time.time_ns() - int((time.perf_counter() - seen) * 1e9)
            sample.detection = (seen_wall - os.stat(state_file).st_mtime_ns) / 1e9
        node.monitors.pop(cid, None)
        deleting = time.perf_counter()
        node.run("delete", cid)
        sample.delete = time.perf_counter() - deleting
    finally:
        os.close(out_r)
        if out_w >= 0:
            os.close(out_w)
    return sample


def _cell_name(node: Node, cid: str) -> str:
    """The Jailhouse cell name runphi gave ``cid`` (the id itself when it fits, as here)."""
    from runphi.backends.jailhouse.names import cell_name

    return cell_name(cid)


def measure_guest(result: SuiteResult, node: Node, label: str, *, printing: bytes, ending: bytes,
                  failing: bytes | None, runs: int, warmup: int, expect_exit: int = 0) -> list[float]:
    """Series for one kind of guest; returns the detection latencies measured."""
    killed = [one_lifecycle(node, f"{label}-k{i}", printing, stop="kill") for i in range(warmup + runs)][warmup:]
    ended = [one_lifecycle(node, f"{label}-e{i}", ending, stop="self") for i in range(runs)]
    result.add(Series(f"{label}: create -> first byte", tuple(s.create_to_byte for s in killed)))
    result.add(Series(f"{label}: start -> first byte", tuple(s.start_to_byte for s in killed)))
    result.add(Series(f"{label}: kill TERM -> exit seen", tuple(s.stop_to_exit for s in killed)))
    result.add(Series(f"{label}: delete", tuple(s.delete for s in killed)))
    detections = result.add(Series(f"{label}: guest exit -> monitor exit", tuple(s.detection for s in ended)))
    result.checks.append(Check(f"{label}: kill TERM exits 143", all(s.status == 143 for s in killed),
                               f"statuses {sorted({s.status for s in killed})}"))
    result.checks.append(Check(f"{label}: guest power-off exits {expect_exit}",
                               all(s.status == expect_exit for s in ended),
                               f"statuses {sorted({s.status for s in ended})}"))
    found = list(detections.samples)
    if failing is not None:
        failed = [one_lifecycle(node, f"{label}-f{i}", failing, stop="self") for i in range(runs)]
        failure = result.add(Series(f"{label}: cell failed -> monitor exit", tuple(s.detection for s in failed)))
        result.checks.append(Check(f"{label}: failed cell exits 139", all(s.status == 139 for s in failed),
                                   f"statuses {sorted({s.status for s in failed})}"))
        found += failure.samples
    return found


def run(options: Options) -> SuiteResult:
    result = SuiteResult("lifecycle")
    runs = options.count(10, 1)
    with sim_node() as node:
        detections = measure_guest(
            result, node, "script",
            printing=guest_script("print up\\n", "halt"),
            ending=guest_script("print up\\n", "sleep 100", "shutdown"),
            failing=guest_script("print up\\n", "sleep 100", "fault"),
            runs=runs, warmup=options.warmup)
    qemu = _qemu_guest()
    if isinstance(qemu, str):
        result.info["qemu guests"] = f"not measured: {qemu}"
    else:
        with sim_node(engine="qemu") as node:
            # The hello inmate prints and powers itself off; the kill series needs a guest that
            # stays up: the ticker inmate.
            detections += measure_guest(result, node, "qemu", printing=qemu[1], ending=qemu[0], failing=None,
                                        runs=options.count(5, 1), warmup=options.warmup)
    result.budgets.append(Budget("exit/failure detection (worst sample)", max(detections) * 1e3,
                                 DETECTION_BUDGET_S * 1e3, "<=", "ms",
                                 "sysfs state mtime -> monitor exit; monitor polls sysfs"))
    return result


def _qemu_guest() -> tuple[bytes, bytes] | str:
    """(hello image, ticker image), or why the QEMU guests cannot run here."""
    import shutil

    from tools.inmates import build as inmates
    from tools.jailhouse_sim.engines.qemu import DEFAULT_BINARY

    if shutil.which(DEFAULT_BINARY) is None:
        return f"{DEFAULT_BINARY} is not installed"
    reason = inmates.missing_tools()
    if reason:
        return reason
    return inmates.image_path("hello").read_bytes(), inmates.image_path("ticker").read_bytes()


if __name__ == "__main__":
    sys.exit(standalone("lifecycle", run))
