"""ZIC pods driven through containerd's CRI plugin exactly as a kubelet drives them.

The test plays the kubelet over gRPC (``runtime.v1``, compiled from
``tests/cri/runtime_v1_subset.proto``) against a private containerd whose CRI
plugin has a ``runphi`` runtime handler; runphi's Jailhouse backend runs on a
simulated board. Guests are simulator script guests that behave like the QEMU
inmates of the same name (``tests/cri/kubelet.py`` ``ZIC_GUESTS``): ``hello``
prints and powers off, ``ticker`` ticks until shut down, ``locked`` ticks and
refuses shutdown, ``crash`` takes a data abort.

After every test all its pods are stopped and removed the way a kubelet deletes
a pod, and the node must hold no cell, ledger entry, runphi record, shim,
monitor or netns.
"""

from __future__ import annotations

import time

import msgspec
import pytest

from tests.containerd import missing_requirements
from tests.cri.client import CONTAINER_EXITED, CONTAINER_RUNNING
from tests.cri.kubelet import Node, zic_image
from tests.cri.node import PAUSE_IMAGE

pytestmark = pytest.mark.containerd

MiB = 1 << 20
HELLO, TICKER, LOCKED, CRASH = (zic_image(n) for n in ("hello", "ticker", "locked", "crash"))


@pytest.fixture(scope="module")
def node(runphi_bin):
    """One node (board + CRI containerd + images) for the module's tests."""
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    started = Node.start(runphi_bin)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def kubelet(node: Node):
    """The node, with every pod the test ran deleted afterwards and the node checked clean."""
    try:
        yield node
    finally:
        node.teardown_pods()
    left = node.wait_clean()
    assert left.clean(), f"left behind after the pods were removed: {left}"


class _Record(msgspec.Struct):
    """The part of runphi's container record these tests read."""

    id: str
    status: str
    annotations: dict[str, str] = {}


def runphi_record(node: Node, container_id: str) -> _Record | None:
    path = node.record_dir(container_id) / "runphi.json"
    return msgspec.json.decode(path.read_bytes(), type=_Record) if path.exists() else None


def test_cri_serves_the_runphi_node(kubelet: Node):
    """The plugin answers Version and lists the local pause image and the ZIC images."""
    version = kubelet.client.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version.startswith("v1")
    tags = kubelet.client.list_images()
    for image in (PAUSE_IMAGE, HELLO, TICKER, LOCKED, CRASH):
        assert image in tags


def test_hello_zic_completes_and_its_console_is_the_container_log(kubelet: Node):
    """ContainerStatus → CONTAINER_EXITED, exit 0, reason Completed; the CRI log file
    (what ``kubectl logs`` prints) holds the guest's console lines in CRI format."""
    pod = kubelet.run_pod("hello")
    container = kubelet.run_container(pod, "hello", HELLO)
    status = kubelet.client.wait_state(container, CONTAINER_EXITED)
    assert (status.exit_code, status.reason) == (0, "Completed")
    assert status.log_path == str(pod.log_directory / "hello" / "0.log")
    lines = kubelet.wait_log(pod.log_directory / "hello" / "0.log", "second line")
    texts = [line.text.rstrip("\r") for line in lines]
    assert texts[texts.index("Hello from a ZIC") + 1] == "second line"
    assert {(line.stream, line.tag) for line in lines} == {("stdout", "F")}


def test_pause_container_goes_to_runc_and_the_zic_is_a_cell(kubelet: Node):
    """The sandbox (container-type=sandbox) is runc's; the ZIC is runphi's, and its
    namespace paths pointing at the pause container were accepted."""
    pod = kubelet.run_pod("routing")
    container = kubelet.run_container(pod, "ticker", TICKER)
    kubelet.client.wait_state(container, CONTAINER_RUNNING)
    assert runphi_record(kubelet, pod.id) is None
    assert kubelet.runc_state(pod.id).exists()
    record = runphi_record(kubelet, container)
    assert record is not None and record.status == "running"
    config = msgspec.json.decode((kubelet.record_dir(container) / "config.json").read_bytes())
    paths = [ns.get("path", "") for ns in config["linux"]["namespaces"]]
    assert any(path.startswith("/proc/") and path.endswith("/ns/ipc") for path in paths), paths
    assert len(kubelet.cells()) == 1
