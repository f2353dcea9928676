"""The contract's vocabulary, independent of any backend.

A *backend setup* is one way of running runphi on one backend (Jailhouse on the
simulator with script guests, the same with real QEMU inmates, KVM on this host's QEMU). Per
test it provides a :class:`BackendTarget`: the runtime environment of the ``runphi``
CLI, ZIC bundles of each :class:`Guest` behaviour, ways to sabotage a launch or to
destroy a cell behind runphi's back, and a view of the :class:`InUse` resources.
The contract (``test_backend_contract.py``) speaks only these terms, the ``runphi``
CLI (:class:`RuntimeCli`) and the backend protocol (``runphi.backends.base``).
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tests.fdread import read_until
from tests.test_lifecycle_harness import RUNPHI, reap_all, run_runphi

if TYPE_CHECKING:
    from runphi.config import RuntimeConfig


class Guest(enum.Enum):
    """The guest behaviours every setup can package as a ZIC."""

    #: Prints its known first output, then powers the cell off by itself.
    POWERS_OFF = "prints-then-powers-off"
    #: Prints its known first output, then keeps printing until stopped (a ticker).
    RUNS_FOREVER = "runs-forever"
    #: Prints its known first output, then faults: the cell fails.
    CRASHES = "crashes"


@dataclass(frozen=True)
class GuestImage:
    """One guest image and the bytes it is known to print first on its console."""

    image: bytes
    first_output: bytes


@dataclass(frozen=True)
class InUse:
    """What the backend holds on the node: cells (name → backend's state word), and the
    container ids its resource bookkeeping (ledger entries, claims) still records."""

    cells: Mapping[str, str]
    allocations: frozenset[str]
    claims: frozenset[str]

    @property
    def empty(self) -> bool:
        """Nothing at all is held: no cell, no allocation, no claim."""
        return not self.cells and not self.allocations and not self.claims

    @classmethod
    def on_node(cls, node: Path, cells: Mapping[str, str]) -> InUse:
        """``cells`` plus what runphi's node ledger in the state dir ``node`` records."""
        ledger = node / "jailhouse-ledger.json"
        allocations = json.loads(ledger.read_text())["allocations"] if ledger.exists() else {}
        claims_dir = node / "jailhouse-claims"
        claims = {path.stem for path in claims_dir.glob("*.json")} if claims_dir.is_dir() else set()
        return cls(cells=cells, allocations=frozenset(allocations), claims=frozenset(claims))

    def holds(self, container_id: str, cell_name: str) -> bool:
        """The container's cell exists and its resources are recorded (ledger and claim)."""
        return (cell_name in self.cells and container_id in self.allocations
                and container_id in self.claims)


class BackendTarget(Protocol):
    """What a backend setup provides to one contract test (see the module docstring)."""

    #: The setup's id (as in the test ids).
    name: str
    #: Environment for the ``runphi`` CLI (runphi.toml, the backend's tool, the node state dir).
    env: dict[str, str]
    #: How long a started guest may take to print its first output (seconds).
    boot_timeout: float

    def bundle(self, name: str, guest: Guest) -> Path:
        """A ZIC bundle (config.json, rootfs/boot/...) whose guest behaves as ``guest``."""

    def first_output(self, guest: Guest) -> bytes:
        """The bytes the guest of ``guest`` prints first on its console."""

    def unhostable_bundle(self, name: str) -> Path:
        """A ZIC bundle asking for a CPU or memory this platform does not have."""

    def fail_next_launch(self) -> None:
        """Make the next launch fail half-way: after it took resources and made the cell,
        before it could load the guest (Jailhouse: an injected ``cell load`` failure)."""

    def destroy_behind_runphis_back(self, cell_name: str) -> None:
        """Destroy the cell with the hypervisor's own tool, as an operator might."""

    def in_use(self) -> InUse:
        """The resources the backend holds on the node right now."""

    def config(self) -> RuntimeConfig:
        """runphi's configuration for this target (what ``registry.open_backend`` takes)."""

    def scrub(self) -> None:
        """After a test: remove any cell and pending fault injection runphi left behind."""


class GuestBundles:
    """The bundle-making half of a :class:`BackendTarget`, the same for every setup: ZIC bundles
    of its ``guests`` under ``base/bundles`` with the setup's boot descriptions."""

    base: Path
    guests: Mapping[Guest, GuestImage]
    #: The boot description of every contract guest, and one this setup cannot place.
    boot: Mapping[str, object]
    unhostable_boot: Mapping[str, object]

    def bundle(self, name: str, guest: Guest) -> Path:
        return write_zic_bundle(self.base / "bundles" / name, self.guests[guest].image, self.boot)

    def first_output(self, guest: Guest) -> bytes:
        return self.guests[guest].first_output

    def unhostable_bundle(self, name: str) -> Path:
        return write_zic_bundle(self.base / "bundles" / name, self.guests[Guest.RUNS_FOREVER].image,
                                self.unhostable_boot)


def write_zic_bundle(bundle: Path, image: bytes, description: Mapping[str, object]) -> Path:
    """Write a ZIC bundle: config.json + rootfs/boot/{config.json, boot.bin} (the image).

    ``description`` is the image's boot description (``/boot/config.json``); its
    ``inmate`` is ``/boot/boot.bin`` unless it says otherwise.
    """
    boot = bundle / "rootfs" / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "config.json").write_text(json.dumps({"inmate": "/boot/boot.bin", **description}))
    (boot / "boot.bin").write_bytes(image)
    config = {"ociVersion": "1.0.2",
              "process": {"terminal": False, "args": ["/boot/boot.bin"], "cwd": "/"},
              "root": {"path": "rootfs"},
              "annotations": {"org.runphi.runtime": "runphi"}}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def console_until(root: Path, env: Mapping[str, str], container_id: str, marker: bytes, timeout: float) -> bytes:
    """A ZIC's console output from its first byte until ``marker`` has arrived, read from
    ``runphi --root ROOT logs -f`` (the monitor's console log, which starts at the guest's
    first byte); AssertionError if the deadline passes or the monitor ends first."""
    read_end, write_end = os.pipe()
    follower = subprocess.Popen([str(RUNPHI), "--root", str(root), "logs", "-f", container_id],
                                stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.DEVNULL, env=dict(env))
    os.close(write_end)
    try:
        return read_until(read_end, marker, timeout=timeout)
    finally:
        os.close(read_end)
        follower.kill()
        follower.wait()


class RuntimeCli:
    """The ``runphi`` CLI as a shim drives it: one state root, the target's environment.

    The test process is a child subreaper (fixture ``subreaper``), so the monitors
    ``create`` forks are its children; :meth:`close` deletes what is left and reaps them.
    """

    def __init__(self, base: Path, env: Mapping[str, str]) -> None:
        self.base = base
        self.root = base / "root"
        self.outputs = base / "cli-output"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.env = dict(env)
        self.monitors: list[int] = []

    def run(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``runphi --root ROOT ARGS``; output through files, never a pipe a monitor could keep open."""
        return run_runphi(self.root, args, self.env, self.outputs, check=check, timeout=timeout)

    def pid_file(self, container_id: str) -> Path:
        return self.base / f"{container_id}.pid"

    def try_create(self, container_id: str, bundle: Path) -> subprocess.CompletedProcess[str]:
        """``runphi create``, whatever its outcome (a monitor it made is remembered for reaping)."""
        pid_file = self.pid_file(container_id)
        pid_file.unlink(missing_ok=True)
        result = self.run("create", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id)
        if pid_file.exists():
            self.monitors.append(int(pid_file.read_text()))
        return result

    def create(self, container_id: str, bundle: Path) -> int:
        """``runphi create`` that must succeed; the monitor's pid from ``--pid-file``."""
        result = self.try_create(container_id, bundle)
        assert result.returncode == 0, f"create {container_id} exited {result.returncode}: {result.stderr}"
        return int(self.pid_file(container_id).read_text())

    def started(self, container_id: str, bundle: Path) -> int:
        """``create`` then ``start``; the monitor's pid."""
        pid = self.create(container_id, bundle)
        self.run("start", container_id, check=True)
        return pid

    def state(self, container_id: str) -> dict:
        """``runphi state`` as JSON."""
        return json.loads(self.run("state", container_id, check=True).stdout)

    def console_until(self, container_id: str, marker: bytes, timeout: float) -> bytes:
        """The guest's console output from its first byte until ``marker`` has arrived.

        Read from ``runphi logs -f`` (the monitor's console log, which starts at the
        guest's first byte); AssertionError if the deadline passes or the monitor ends first.
        """
        return console_until(self.root, self.env, container_id, marker, timeout)

    def container_ids(self) -> list[str]:
        """Every container the state root holds."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def close(self) -> None:
        """Force-delete every container left and reap every monitor."""
        for container_id in self.container_ids():
            self.run("delete", "--force", container_id)
        reap_all(self.monitors)
