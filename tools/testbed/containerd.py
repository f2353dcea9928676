"""A private containerd for end-to-end tests, and helpers to drive it with ctr.

:class:`PrivateContainerd` runs a real containerd with its own root, state,
socket and config under one temporary directory (short, for the 108-byte unix
socket limit). The config registers runphi as a CRI runtime handler named
``runphi`` (runtime_type ``io.containerd.runc.v2``, ``BinaryName`` = runphi),
and ``ctr`` tests select it with ``--runc-binary``. Both are private: nothing
touches the host's containerd.

Tests use the ``containerd`` fixture from ``tests/conftest.py``; it skips (with
the reason) only when not root or when containerd, ctr, the runc shim, runc or a
static busybox is missing. :mod:`tools.demo` drives :class:`ZicNode` directly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runphi.procfs import process_state

__all__ = [
    "BOOT_BANNER", "BUSYBOX_APPLETS", "MODES", "NAMESPACE", "SHIM_RUNTIME", "SIM_PLATFORM",
    "ZIC_IMAGE_PLATFORM",
    "WARM_PARENT", "EventLog", "PrivateContainerd", "ZicNode", "busybox_path", "containerd_missing",
    "kill_processes_with_env", "make_busybox_rootfs", "missing_requirements", "processes_with_env",
    "runphi_binary", "short_tempdir", "simulator_env",
]

NAMESPACE = "runphi-test"
BOOT_BANNER = "containerd successfully booted"

#: Commands a busybox rootfs gets as symlinks.
BUSYBOX_APPLETS = ("sh", "echo", "cat", "sleep", "true", "false", "test", "tty", "ls")


def runphi_binary() -> Path:
    """The installed ``runphi`` console script of this interpreter's environment.

    Absolute, with the venv's python in its shebang, so the shim can exec it.
    """
    candidate = Path(sys.executable).parent / "runphi"
    if not candidate.exists():
        raise FileNotFoundError(f"{candidate} missing: install runphi with `pip install -e .`")
    return candidate


def containerd_missing() -> str | None:
    """Why a private containerd with runc cannot run here (not root, a tool absent), or None."""
    if os.geteuid() != 0:
        return "needs root (containerd and runc)"
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def missing_requirements() -> str | None:
    """Why a real-containerd test cannot run here, or None when it can."""
    if reason := containerd_missing():
        return reason
    if busybox_path() is None:
        return "no static busybox (install busybox-static)"
    return None


def busybox_path() -> Path | None:
    """A static busybox binary (Debian's busybox-static installs /bin/busybox)."""
    found = shutil.which("busybox")
    return Path(found) if found else None


def make_busybox_rootfs(target: Path) -> Path:
    """A minimal rootfs at ``target``: static busybox plus applet symlinks in /bin."""
    bin_dir = target / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox_path(), bin_dir / "busybox")
    for applet in BUSYBOX_APPLETS:
        link = bin_dir / applet
        if not link.exists():
            link.symlink_to("busybox")
    return target


class PrivateContainerd:
    """One containerd process with everything under ``base``."""

    def __init__(self, base: Path, runphi: Path, env: dict[str, str] | None = None,
                 cri: bool = False, netns: str | None = None) -> None:
        self.base = base
        #: The named network namespace (``/run/netns/<netns>``) containerd runs in, or None for
        #: the caller's own: its shims, runtimes and CNI plugins then make their links there.
        self.netns = netns
        #: Whether the CRI plugin runs (off by default: ctr tests do not need it).
        self.cri = cri
        self.runphi = runphi
        self.address = base / "c.sock"
        self.root = base / "root"
        self.state = base / "state"
        self.config_path = base / "config.toml"
        self.log_path = base / "containerd.log"
        #: Root passed as ``--runc-root``: what the shim gives runphi/runc as ``--root``'s parent.
        self.runtime_root = base / "rt"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def config_text(self) -> str:
        """containerd config: private paths, unneeded snapshotters off, a runphi handler."""
        cri_off = "" if self.cri else '\n  "io.containerd.grpc.v1.cri",'
        return f"""version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",{cri_off}
]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.base / 'ttrpc.sock'}"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runphi]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runphi.options]
  BinaryName = "{self.runphi}"
  Root = "{self.runtime_root}"
"""

    def start(self, timeout: float = 30.0) -> None:
        """Start containerd and return once it logged that it booted."""
        for directory in (self.root, self.state, self.runtime_root):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        # Observed thing: containerd's own log file (polled against a deadline).
        while BOOT_BANNER not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not boot within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def argv(self) -> list[str]:
        """containerd's command line; inside :attr:`netns` through ``nsenter --net``, which
        execs containerd (a network namespace needs no fork), so the process is containerd."""
        argv = ["containerd", "--config", str(self.config_path)]
        if self.netns is None:
            return argv
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def log_tail(self, lines: int = 30) -> str:
        """The end of containerd's log, for failure messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def ctr_argv(self, *args: str) -> list[str]:
        """``ctr`` argv against this containerd and the test namespace."""
        return ["ctr", "--address", str(self.address), "--namespace", NAMESPACE, *args]

    def ctr(self, *args: str, timeout: float = 60.0, check: bool = False,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ctr to completion, capturing stdout/stderr as text."""
        return subprocess.run(self.ctr_argv(*args), capture_output=True, timeout=timeout,
                              check=check, env=self.env,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)

    def runtime_flags(self, binary: Path | str) -> list[str]:
        """ctr run flags selecting a runc-compatible binary under our private root.

        Also sets PATH: a ``--rootfs`` container has no image config to take it from.
        """
        return ["--runc-binary", str(binary), "--runc-root", str(self.runtime_root),
                "--env", "PATH=/bin"]

    def remove_leftovers(self) -> None:
        """Kill and delete every task and container left in the test namespace."""
        listing = self.ctr("containers", "list", "--quiet", timeout=30)
        for container_id in listing.stdout.decode().split():
            self.ctr("task", "kill", "--signal", "SIGKILL", container_id, timeout=30)
            self.ctr("task", "delete", "--force", container_id, timeout=30)
            self.ctr("containers", "delete", container_id, timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop containerd (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def processes_with_env(marker: str, exclude: set[int]) -> list[str]:
    """``pid cmdline`` of every process whose environment contains ``marker``.

    containerd's env carries the node's private state dir, so shims, runphi
    verbs, monitors and the shim's warm parent started for this node all match;
    ``exclude`` drops the ones that are meant to live (containerd itself).
    """
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append(f"{entry.name} {cmdline.strip()}")
    return found


#: What the shim's warm parent runs (node-level, like containerd: it outlives pods by design).
WARM_PARENT = "runphi.shim.warm"


def kill_processes_with_env(marker: str, grace: float = 5.0) -> None:
    """End every process whose environment contains ``marker`` (a node's teardown): SIGTERM
    (the warm parent removes its socket then), SIGKILL for what is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(line.split()[0]) for line in processes_with_env(marker, exclude={os.getpid()})]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        # The observed thing: /proc entries of those processes (polled against a deadline).
        while any(process_state(pid) not in (None, "Z") for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)


def short_tempdir(prefix: str = "rphi-") -> Path:
    """A temporary directory with a short path (unix sockets live in it)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ---- ZICs end to end: a simulated board under a private containerd -------------------------

#: The simulator board runphi's template of the same name describes.
SIM_PLATFORM = "sim-qemu-arm64"
#: Image platform of every ZIC image mkzic builds for the simulator (the host may be x86).
ZIC_IMAGE_PLATFORM = "linux/arm64"


def simulator_env(sim_root: Path, base: Path, platform: str = SIM_PLATFORM) -> dict[str, str]:
    """Environment pointing runphi at the simulated board rooted at ``sim_root``.

    containerd passes its environment to the shim, and the shim to runphi, so these
    reach every ``runphi create``. ``RUNPHI_CONFIG`` names a private file so a
    host's ``/etc/runphi/runphi.toml`` cannot change what is tested.
    """
    config = base / "runphi.toml"
    config.write_text('backend = "jailhouse"\n')
    return {
        "RUNPHI_CONFIG": str(config),
        "RUNPHI_BACKEND": "jailhouse",
        "RUNPHI_JAILHOUSE": str(sim_root / "bin" / "jailhouse"),
        "RUNPHI_SYSFS": str(sim_root / "sys" / "devices" / "jailhouse"),
        "RUNPHI_PLATFORM": platform,
        "RUNPHI_STATE_DIR": str(base / "node"),
    }


def kvm_env(base: Path) -> dict[str, str]:
    """Environment making runphi run ZICs as QEMU VMs (the KVM backend, no simulator).

    The graceful-stop deadline is the default one: a Linux guest's orderly poweroff takes
    seconds, and a bare-metal inmate, which never answers the power button, waits it out.
    """
    config = base / "runphi.toml"
    config.write_text('backend = "kvm"\n\n[kvm]\npoll_interval_ms = 20\n')
    return {"RUNPHI_CONFIG": str(config), "RUNPHI_BACKEND": "kvm", "RUNPHI_STATE_DIR": str(base / "node")}


#: runphi's runtime name for containerd (the shim ``containerd-shim-runphi-v2``).
SHIM_RUNTIME = "io.containerd.runphi.v2"
#: How containerd runs runphi: its own shim, or runc's shim with runphi as ``BinaryName``.
MODES = ("shim", "runc-cli")


class ZicNode:
    """A private containerd whose runphi drives a simulated Jailhouse board, or (``backend
    = "kvm"``) this host's QEMU.

    Everything lives under ``base``: ``sim/`` (the board), ``ctd/`` (containerd),
    ``node/`` (runphi's state dir with the resource ledger, and the KVM cells).
    ``mode`` says how containerd runs runphi (:data:`MODES`); in shim mode containerd
    finds ``containerd-shim-runphi-v2`` on its PATH, beside ``runphi``. :meth:`stop`
    removes every task and container, then stops containerd and the board (which ends
    its QEMU guests). With ``netns`` (a /run/netns name) containerd and the board run inside
    that network namespace, so the links of networked ZICs stay in it, as they stay in the
    root cell's namespace on a board. ``platform`` names both runphi's template and the
    simulator's model of that board.
    """

    def __init__(self, base: Path, runphi: Path, engine: str = "qemu", mode: str = "runc-cli",
                 backend: str = "jailhouse", netns: str | None = None, platform: str = SIM_PLATFORM) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.base = base
        self.runphi = runphi
        self.engine = engine
        self.mode = mode
        self.backend = backend
        self.sim_root = base / "sim"
        base.mkdir(parents=True, exist_ok=True)
        self.platform = platform
        self.env = kvm_env(base) if backend == "kvm" else simulator_env(self.sim_root, base, platform)
        self.env["PATH"] = f"{runphi.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.netns = netns
        self.containerd = PrivateContainerd(base / "ctd", runphi, env=self.env, netns=netns)
        self.sim = None

    def start(self) -> ZicNode:
        """Bring up the board, then containerd; on failure nothing stays running."""
        from tools.jailhouse_sim.testing import SimBoard

        if self.backend == "kvm":
            self.containerd.start()
            return self
        self.sim = SimBoard.start(self.sim_root, board=self.platform, engine=self.engine, netns=self.netns)
        try:
            self.containerd.start()
        except BaseException:
            self.sim.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove all containers, stop containerd and whatever runphi process outlived it
        (the shim's warm parent), stop the board. Idempotent."""
        try:
            if self.containerd.process is not None and self.containerd.process.poll() is None:
                self.containerd.remove_leftovers()
        finally:
            self.containerd.stop()
            kill_processes_with_env(f"RUNPHI_STATE_DIR={self.base / 'node'}")
            if self.sim is not None:
                self.sim.stop()

    def zic_flags(self) -> list[str]:
        """``ctr run`` flags that make runphi the runtime, in this node's mode."""
        if self.mode == "shim":
            return ["--runtime", SHIM_RUNTIME, "--env", "PATH=/bin"]
        return self.containerd.runtime_flags(self.runphi)

    def record_dir(self, container_id: str) -> Path:
        """Where runphi keeps the container's record in this mode (absent once deleted)."""
        if self.mode == "shim":
            return self.base / "node" / NAMESPACE / container_id
        return self.containerd.runtime_root / NAMESPACE / container_id

    def cells(self) -> dict[str, str]:
        """The board's non-root cells: name → state, read from its sysfs (KVM: the cells'
        phases, ``up`` while the VM process lives)."""
        if self.backend == "kvm":
            return {entry.name: self._kvm_cell(entry.name, "status.json").get("phase", "?")
                    for entry in self._kvm_cells_dir().iterdir()
                    if not entry.name.startswith(".")} if self._kvm_cells_dir().is_dir() else {}
        cells = {}
        cells_dir = self.sim_root / "sys" / "devices" / "jailhouse" / "cells"
        for entry in cells_dir.iterdir():
            if entry.name == "0":
                continue
            try:
                cells[(entry / "name").read_text().strip()] = (entry / "state").read_text().strip()
            except FileNotFoundError:  # destroyed while we looked
                continue
        return cells

    def _kvm_cells_dir(self) -> Path:
        return self.base / "node" / "kvm-cells"

    def _kvm_cell(self, name: str, file: str) -> dict:
        import json

        try:
            return json.loads((self._kvm_cells_dir() / name / file).read_text())
        except FileNotFoundError:  # destroyed while we looked
            return {}

    def vcpu_threads(self, name: str) -> dict[int, int]:
        """KVM: host thread id → the host CPU the ledger gave its vCPU."""
        status = self._kvm_cell(name, "status.json")
        plan = self._kvm_cell(name, "vm.json")
        return dict(zip(status["vcpu_threads"], plan["vcpu_host_cpus"], strict=True))

    def vm_pid(self, name: str) -> int:
        """KVM: the QEMU process of the cell called ``name``."""
        return self._kvm_cell(name, "status.json")["pid"]

    def cell_cpus(self, name: str) -> str:
        """``cpus_assigned_list`` of the cell called ``name``."""
        cells_dir = self.sim_root / "sys" / "devices" / "jailhouse" / "cells"
        for entry in cells_dir.iterdir():
            if entry.name != "0" and (entry / "name").read_text().strip() == name:
                return (entry / "cpus_assigned_list").read_text().strip()
        raise KeyError(f"no cell {name!r} on the board")

    def ledger(self) -> dict[str, dict]:
        """runphi's resource ledger: container id → allocation (empty when none)."""
        import json

        path = self.base / "node" / "jailhouse-ledger.json"
        if not path.exists():
            return {}
        return json.loads(path.read_text())["allocations"]


@contextmanager
def running_zic_node(runphi: Path, *, mode: str, prefix: str = "rphi-zic-",
                     env: dict[str, str] | None = None, backend: str = "jailhouse",
                     netns: str | None = None, engine: str = "qemu",
                     platform: str = SIM_PLATFORM) -> Iterator[ZicNode]:
    """A started :class:`ZicNode` in ``mode`` on ``backend`` (its containerd's environment plus
    ``env``; inside network namespace ``netns`` when given; the simulator's ``engine`` and
    ``platform``), stopped and its directory removed afterwards."""
    node = ZicNode(short_tempdir(prefix), runphi, mode=mode, backend=backend, netns=netns, engine=engine,
                   platform=platform)
    node.containerd.env.update(env or {})
    node.start()
    try:
        yield node
    finally:
        try:
            node.stop()
        finally:
            shutil.rmtree(node.base, ignore_errors=True)


class EventLog:
    """``ctr events`` of one containerd, written to a file and searched there.

    The file is the observed thing: :meth:`exit_status` polls it against a
    deadline for the ``/tasks/exit`` line of a container.
    """

    def __init__(self, containerd: PrivateContainerd, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self.process = subprocess.Popen(containerd.ctr_argv("events"), stdin=subprocess.DEVNULL,
                                        stdout=self._file, stderr=self._file, env=containerd.env)
        self._wait_subscribed(containerd)

    def _wait_subscribed(self, containerd: PrivateContainerd, timeout: float = 30.0) -> None:
        """Return once ``ctr events`` receives events: a probe namespace's create shows up."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            probe = f"events-probe-{attempt}"
            containerd.ctr("namespaces", "create", probe, check=True, timeout=30)
            containerd.ctr("namespaces", "remove", probe, check=True, timeout=30)
            if b'/namespaces/create {"name":"events-probe-' in self.path.read_bytes():
                return
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"ctr events did not start: {self.path.read_text(errors='replace')}")

    def topics(self, container_id: str) -> list[tuple[str, dict]]:
        """Every (topic, payload) so far that concerns ``container_id``, in order."""
        import json

        found = []
        for line in self.path.read_text(errors="replace").splitlines():
            parts = line.split(" ", 6)
            if len(parts) < 7 or not parts[5].startswith("/"):
                continue
            try:
                payload = json.loads(parts[6])
            except ValueError:  # the last line, still being written
                continue
            if container_id in (payload.get("container_id"), payload.get("id")):
                found.append((parts[5], payload))
        return found

    def exit_status(self, container_id: str, timeout: float = 60.0) -> int:
        """The ``exit_status`` of the container's ``/tasks/exit`` event (0 is omitted by ctr)."""
        deadline = time.monotonic() + timeout
        while True:
            for topic, payload in self.topics(container_id):
                if topic == "/tasks/exit":
                    return int(payload.get("exit_status", 0))
            if time.monotonic() > deadline:
                raise AssertionError(f"no /tasks/exit event for {container_id} within {timeout} s:\n"
                                     + self.path.read_text(errors="replace")[-3000:])
            time.sleep(0.05)

    def close(self) -> None:
        """Stop ``ctr events``."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._file.close()
