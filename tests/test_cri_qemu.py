"""The issue's kubelet scenarios with the real aarch64 inmates (``tools/inmates``) booted
by the simulator's QEMU engine, packed as ZIC images with mkzic and driven through
containerd's CRI plugin (see ``tests/test_cri.py`` for the script-guest versions)."""

from __future__ import annotations

import shutil
import time

import pytest

from tools.testbed.containerd import missing_requirements
from tests.cri.client import CONTAINER_EXITED, CONTAINER_RUNNING
from tests.cri.kubelet import Node, zic_image

pytestmark = [pytest.mark.containerd, pytest.mark.qemu]

INMATES = ("hello", "ticker", "crash")


@pytest.fixture(scope="module")
def node(runphi_bin):
    """A node whose board boots non-script guests in QEMU, with the three inmates as ZIC images."""
    from tools.inmates.build import ensure_built, missing_tools

    reason = missing_requirements() or missing_tools()
    if reason is None and shutil.which("qemu-system-aarch64") is None:
        reason = "qemu-system-aarch64 not found (apt-get install qemu-system-arm)"
    if reason:
        pytest.skip(f"CRI with QEMU inmates: {reason}")
    built = ensure_built()
    guests = {name: (built / f"{name}.bin").read_bytes() for name in INMATES}
    with Node.running(runphi_bin, engine="qemu", guests=guests) as started:
        yield started


@pytest.fixture
def kubelet(node: Node):
    """The node, with every pod the test ran deleted afterwards and the node checked clean."""
    with node.pods_deleted_and_checked():
        yield node


def test_hello_inmate_completes_and_kubectl_logs_shows_its_console(kubelet: Node):
    pod = kubelet.run_pod("hello")
    container = kubelet.run_container(pod, "hello", zic_image("hello"))
    status = kubelet.client.wait_state(container, CONTAINER_EXITED, timeout=120)
    assert (status.exit_code, status.reason) == (0, "Completed")
    lines = kubelet.wait_log(pod.log_directory / "hello" / "0.log", "hello: done, powering off")
    assert lines[0].text.rstrip("\r") == "Hello from runphi inmate hello"
    assert all(line.stream == "stdout" for line in lines)


def test_ticker_inmate_stops_gracefully_with_143(kubelet: Node):
    pod = kubelet.run_pod("ticker")
    container = kubelet.run_container(pod, "ticker", zic_image("ticker"))
    kubelet.client.wait_state(container, CONTAINER_RUNNING, timeout=120)
    kubelet.wait_log(pod.log_directory / "ticker" / "0.log", "tick 2", timeout=120)
    began = time.monotonic()
    kubelet.client.stop(container, timeout=30)
    assert time.monotonic() - began < 30
    status = kubelet.client.status(container)
    assert (status.state, status.exit_code, status.reason) == (CONTAINER_EXITED, 143, "Error")
    assert kubelet.cells() == []


def test_crash_inmate_exits_139_with_reason_error(kubelet: Node):
    pod = kubelet.run_pod("crash")
    container = kubelet.run_container(pod, "crash", zic_image("crash"))
    status = kubelet.client.wait_state(container, CONTAINER_EXITED, timeout=120)
    assert (status.exit_code, status.reason) == (139, "Error")
    kubelet.wait_log(pod.log_directory / "crash" / "0.log", "crash: storing to 0x0c000000")
