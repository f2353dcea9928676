"""The KVM backend on this host's real QEMU, as a contract setup.

No simulator: every ZIC is a ``qemu-system-aarch64`` VM (TCG on an x86 host, KVM on
an arm64 one) running the real aarch64 inmates of ``tools/inmates``. Each test gets
its own runphi.toml, node state dir (so its own ledger) and QEMU wrapper.

Two operator actions have KVM forms here: a launch that fails half-way is a QEMU that
refuses to start once (``fail_next_launch`` arms the wrapper runphi is configured
with: it prints QEMU's kind of error and exits; every other start execs the real
QEMU), and destroying a cell behind runphi's back is killing its QEMU process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .contract import Guest, GuestBundles, GuestImage, InUse
from .jailhouse_sim import BOOT, qemu_guests

#: No host has CPU 511: a guest pinned there cannot be placed.
UNHOSTABLE_BOOT = {**BOOT, "vcpu_pinning": [{"vcpu": 0, "pcpu": 511}]}

WRAPPER = """#!/bin/sh
# runphi's QEMU for this test: fails once when armed, else the real QEMU.
if [ -e "{armed}" ]; then
    rm -f "{armed}"
    echo "qemu-system-aarch64: -device loader: injected failure (fail_next_launch)" >&2
    exit 1
fi
exec "{qemu}" "$@"
"""


class KvmMachine:
    """This host's QEMU and the inmates as contract guests; makes each test's target."""

    name = "kvm"

    def __init__(self, guests: dict[Guest, GuestImage], qemu: str) -> None:
        self.guests = guests
        self.qemu = qemu
        self.boot_timeout = 60.0

    def target(self, base: Path) -> KvmTarget:
        return KvmTarget(self, base)


class KvmTarget(GuestBundles):
    """:class:`~tests.backend_contract.contract.BackendTarget` for the KVM backend."""

    boot = BOOT
    unhostable_boot = UNHOSTABLE_BOOT

    def __init__(self, machine: KvmMachine, base: Path) -> None:
        self.name = machine.name
        self.guests = machine.guests
        self.boot_timeout = machine.boot_timeout
        self.base = base
        self.node = base / "node"
        self.armed = base / "qemu-fails-next"
        wrapper = base / "qemu-wrapper"
        wrapper.write_text(WRAPPER.format(armed=self.armed, qemu=machine.qemu))
        wrapper.chmod(0o755)
        config = base / "runphi.toml"
        config.write_text('backend = "kvm"\n\n[kvm]\npoll_interval_ms = 20\nshutdown_timeout_ms = 2000\n')
        self.env = dict(os.environ)
        self.env.update({"RUNPHI_CONFIG": str(config), "RUNPHI_BACKEND": "kvm", "RUNPHI_QEMU": str(wrapper),
                         "RUNPHI_STATE_DIR": str(self.node)})

    def fail_next_launch(self) -> None:
        """The next QEMU refuses to start: the cell and its resources exist by then."""
        self.armed.touch()

    def destroy_behind_runphis_back(self, cell_name: str) -> None:
        """What an operator does to a VM: kill its QEMU process."""
        pid = self._status(cell_name).get("pid", 0)
        assert pid > 0, f"cell {cell_name} has no VM process"
        os.kill(pid, signal.SIGKILL)

    def _status(self, cell_name: str) -> dict:
        path = self.node / "kvm-cells" / cell_name / "status.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}

    def in_use(self) -> InUse:
        """Cells are the cell directories (by phase); allocations and claims the node ledger's."""
        cells_dir = self.node / "kvm-cells"
        cells = ({entry.name: self._status(entry.name).get("phase", "?") for entry in cells_dir.iterdir()
                  if not entry.name.startswith(".")} if cells_dir.is_dir() else {})
        return InUse.on_node(self.node, cells)

    def config(self):
        from runphi.config import load_runtime_config

        return load_runtime_config(self.env)

    def scrub(self) -> None:
        """Kill every VM runphi left running and disarm the wrapper."""
        self.armed.unlink(missing_ok=True)
        cells_dir = self.node / "kvm-cells"
        for entry in cells_dir.iterdir() if cells_dir.is_dir() else []:
            pid = self._status(entry.name).get("pid", 0)
            if pid > 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@contextmanager
def kvm_machine(request: pytest.FixtureRequest) -> Iterator[KvmMachine]:
    """This host's QEMU with the built inmates; skips (with the reason) without QEMU or gcc."""
    inmates = request.getfixturevalue("built_inmates")
    qemu = shutil.which("qemu-system-aarch64")
    assert qemu is not None  # built_inmates skipped otherwise
    yield KvmMachine(qemu_guests(inmates), qemu)
