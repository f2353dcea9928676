"""Where everything lives under a simulator root directory."""

from __future__ import annotations

from pathlib import Path


class SimLayout:
    """Paths of one simulated board rooted at ``root`` (all derived, nothing created)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    @property
    def bin_jailhouse(self) -> Path:
        return self.root / "bin" / "jailhouse"

    @property
    def python_client(self) -> Path:
        """The Python ``jailhouse`` client (``bin/jailhouse`` runs it when it has no daemon to relay to)."""
        return self.root / "libexec" / "jailhouse-sim" / "jailhouse.py"

    @property
    def sysfs(self) -> Path:
        return self.root / "sys" / "devices" / "jailhouse"

    @property
    def pci_bus(self) -> Path:
        """``sys/bus/pci``: the root-side netdevs of ivshmem-net links (``devices/<dev>/net/<if>``)."""
        return self.root / "sys" / "bus" / "pci"

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    @property
    def console_device(self) -> Path:
        """The stand-in for ``/dev/jailhouse`` as a reader of the hypervisor console sees it: a
        unix stream socket, one connection per open file (see :mod:`.hvconsole`)."""
        return self.dev / "jailhouse"

    def uart(self, index: int) -> Path:
        return self.dev / f"ttyAMA{index}"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run / "jailhouse-sim.sock"

    @property
    def pid_file(self) -> Path:
        return self.run / "jailhouse-sim.pid"

    @property
    def daemon_log(self) -> Path:
        return self.run / "daemon.log"

    @property
    def kernel_log(self) -> Path:
        return self.root / "var" / "log" / "kern.log"

    @property
    def firmware(self) -> Path:
        return self.root / "lib" / "firmware"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def system_config(self, board: str) -> Path:
        return self.root / "etc" / "jailhouse" / f"{board}.cell"
