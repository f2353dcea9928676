"""A private containerd for end-to-end tests, and helpers to drive it with ctr.

:class:`PrivateContainerd` runs a real containerd with its own root, state,
socket and config under one temporary directory (short, for the 108-byte unix
socket limit). The config registers runphi as a CRI runtime handler named
``runphi`` (runtime_type ``io.containerd.runc.v2``, ``BinaryName`` = runphi),
and ``ctr`` tests select it with ``--runc-binary``. Both are private: nothing
touches the host's containerd.

Use the ``containerd`` fixture from ``tests/conftest.py``; it skips (with the
reason) only when not root or when containerd, ctr, the runc shim, runc or a
static busybox is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def missing_requirements() -> str | None:
    """Why a real-containerd test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (containerd and runc)"
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
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
                 cri: bool = False) -> None:
        self.base = base
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
            ["containerd", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, start_new_session=True)
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


def short_tempdir(prefix: str = "rphi-") -> Path:
    """A temporary directory with a short path (unix sockets live in it)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
