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

import shutil
import time
from pathlib import Path

import grpc
import msgspec
import pytest

from tools.testbed.containerd import missing_requirements
from tests.cri.client import CONTAINER_EXITED, CONTAINER_RUNNING
from tests.cri.kubelet import Node, zic_image
from tests.cri.manifests import load_pod, load_runtime_class
from tests.cri.node import PAUSE_IMAGE

pytestmark = pytest.mark.containerd

MiB = 1 << 20
KUBERNETES = Path(__file__).resolve().parent.parent / "target" / "kubernetes"
#: The example manifests' image names → the images this node imported.
MANIFEST_IMAGES = {"docker.io/library/hello:latest": zic_image("hello"),
                   "docker.io/library/ticker:latest": zic_image("ticker"),
                   "docker.io/library/busybox:latest": PAUSE_IMAGE}
HELLO, TICKER, LOCKED, CRASH = (zic_image(n) for n in ("hello", "ticker", "locked", "crash"))


@pytest.fixture(scope="module", params=["shim", "runc-cli"])
def node(request, runphi_bin):
    """One node (board + CRI containerd + images) for the module's tests, per runphi mode."""
    reason = missing_requirements()
    if reason:
        pytest.skip(f"real containerd test: {reason}")
    with Node.running(runphi_bin, mode=request.param) as started:
        yield started


@pytest.fixture
def kubelet(node: Node):
    """The node, with every pod the test ran deleted afterwards and the node checked clean."""
    with node.pods_deleted_and_checked():
        yield node


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


def test_metrics_label_a_pods_zic_with_its_pod_and_namespaces(kubelet: Node):
    """``runphi metrics`` finds the ZIC under the mode's state root and labels it with the
    containerd namespace and the pod's name and namespace (the CRI's annotations)."""
    import subprocess

    from prometheus_client.parser import text_string_to_metric_families
    from tests.test_lifecycle_harness import RUNPHI

    pod = kubelet.run_pod("observed")
    container = kubelet.run_container(pod, "ticker", TICKER)
    kubelet.client.wait_state(container, CONTAINER_RUNNING)
    root = kubelet.record_dir(container).parent.parent
    done = subprocess.run([str(RUNPHI), "--root", str(root), "metrics"], env=kubelet.daemon.env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    info = [sample.labels for family in text_string_to_metric_families(done.stdout) for sample in family.samples
            if sample.name == "runphi_zic_info" and sample.labels["container_id"] == container]
    assert len(info) == 1, done.stdout[:2000]
    assert (info[0]["namespace"], info[0]["pod"], info[0]["pod_namespace"]) == ("k8s.io", "observed", "default")
    assert all(s.labels["container_id"] != pod.id for f in text_string_to_metric_families(done.stdout)
               for s in f.samples if "container_id" in s.labels), "the pause container is runc's"


def test_stop_container_shuts_a_ticker_down_gracefully_within_the_timeout(kubelet: Node):
    """StopContainer(timeout=20) on a running ticker: SIGTERM → graceful cell shutdown → 143,
    well before the grace period ends; the cell and its resources are gone."""
    pod = kubelet.run_pod("ticker")
    container = kubelet.run_container(pod, "ticker", TICKER)
    kubelet.client.wait_state(container, CONTAINER_RUNNING)
    kubelet.wait_log(pod.log_directory / "ticker" / "0.log", "tick 2")
    began = time.monotonic()
    kubelet.client.stop(container, timeout=20)
    took = time.monotonic() - began
    status = kubelet.client.status(container)
    assert (status.state, status.exit_code, status.reason) == (CONTAINER_EXITED, 143, "Error")
    assert took < 20, f"graceful stop took {took:.1f} s: containerd had to SIGKILL"
    assert kubelet.cells() == []
    assert container not in kubelet.leftovers().ledger


def test_stop_container_kills_a_guest_that_refuses_after_the_timeout(kubelet: Node):
    """A locked guest that refuses the shutdown request: containerd sends SIGKILL after
    the 2 s grace period (runphi's own deadline is the default 10 s) → 137, and the
    cell is destroyed."""
    pod = kubelet.run_pod("locked")
    container = kubelet.run_container(pod, "locked", LOCKED)
    kubelet.client.wait_state(container, CONTAINER_RUNNING)
    kubelet.wait_log(pod.log_directory / "locked" / "0.log", "tick 1")
    with kubelet.guests_refuse_shutdown():
        began = time.monotonic()
        kubelet.client.stop(container, timeout=2)
        took = time.monotonic() - began
    status = kubelet.client.status(container)
    assert (status.state, status.exit_code, status.reason) == (CONTAINER_EXITED, 137, "Error")
    assert took >= 2, f"stopped after {took:.1f} s, before the grace period ended"
    assert kubelet.cells() == []
    assert container not in kubelet.leftovers().ledger


def test_crashing_guest_exits_139_with_reason_error(kubelet: Node):
    """A data abort fails the cell: exit 139, reason Error (what the kubelet reports as a
    crashed container), and the guest's last words are in the log."""
    pod = kubelet.run_pod("crash")
    container = kubelet.run_container(pod, "crash", CRASH)
    status = kubelet.client.wait_state(container, CONTAINER_EXITED)
    assert (status.exit_code, status.reason) == (139, "Error")
    kubelet.wait_log(pod.log_directory / "crash" / "0.log", "about to crash")


def test_restart_with_attempt_1_boots_a_fresh_cell(kubelet: Node):
    """restartPolicy behaviour: after the ZIC exits, CreateContainer with attempt=1 in the
    same pod boots a new cell. The first one's cell and ledger entry are freed at exit
    (a kubelet keeps the dead container for its logs, so freeing must not wait for
    RemoveContainer); its whole-board CPU request could not be met otherwise."""
    pod = kubelet.run_pod("restart")
    every_cell_cpu = kubelet.client.resources(cpuset="1-7", memory=64 * MiB)
    first = kubelet.run_container(pod, "hello", HELLO, attempt=0, resources=every_cell_cpu)
    assert kubelet.client.wait_state(first, CONTAINER_EXITED).exit_code == 0
    assert kubelet.cells() == []
    assert kubelet.leftovers().ledger == []
    second = kubelet.run_container(pod, "hello", HELLO, attempt=1, resources=every_cell_cpu)
    assert second != first
    status = kubelet.client.wait_state(second, CONTAINER_EXITED)
    assert (status.exit_code, status.reason, status.metadata.attempt) == (0, "Completed", 1)
    for attempt in (0, 1):
        kubelet.wait_log(pod.log_directory / "hello" / f"{attempt}.log", "second line")


def test_two_zics_and_a_busybox_sidecar_share_a_pod(kubelet: Node):
    """Two ticker ZICs (two cells) and a plain busybox container (runc) run together;
    StopPodSandbox with everything still running stops all three."""
    pod = kubelet.run_pod("mixed")
    zics = [kubelet.run_container(pod, name, TICKER) for name in ("zic-a", "zic-b")]
    sidecar = kubelet.run_container(pod, "sidecar", PAUSE_IMAGE, command=["/bin/sh", "-c"],
                                    args=["echo sidecar up; exec sleep 3600"])
    for container in (*zics, sidecar):
        kubelet.client.wait_state(container, CONTAINER_RUNNING)
    for name in ("zic-a", "zic-b"):
        kubelet.wait_log(pod.log_directory / name / "0.log", "tick 1")
    kubelet.wait_log(pod.log_directory / "sidecar" / "0.log", "sidecar up")
    assert len(kubelet.cells()) == 2
    assert runphi_record(kubelet, sidecar) is None and kubelet.runc_state(sidecar).exists()
    assert [p.id for p in kubelet.client.pods()] == [pod.id]
    assert sorted(c.id for c in kubelet.client.containers()) == sorted((*zics, sidecar))
    running = kubelet.leftovers()
    assert sorted(running.ledger) == sorted(zics) and sorted(running.records) == sorted(zics)
    assert running.processes, "no shim or monitor seen for a running pod: the leak check is blind"

    kubelet.client.stop_pod(pod.id)
    for container in (*zics, sidecar):
        assert kubelet.client.status(container).state == CONTAINER_EXITED
    assert kubelet.cells() == []
    assert kubelet.leftovers().ledger == []


def test_linux_resources_size_the_cell(kubelet: Node):
    """CPU quota/period → that many CPUs, a cpuset → exactly those CPUs, the memory
    limit → the cell's RAM (the boot description leaves both open)."""
    from runphi.backends.jailhouse.allocator import LEDGER_NAME, Ledger

    pod = kubelet.run_pod("sized")
    by_quota = kubelet.run_container(pod, "quota", TICKER, resources=kubelet.client.resources(
        cpu_quota=200_000, cpu_period=100_000, memory=128 * MiB))
    by_cpuset = kubelet.run_container(pod, "cpuset", TICKER, resources=kubelet.client.resources(
        cpuset="5-6", memory=32 * MiB))
    for container in (by_quota, by_cpuset):
        kubelet.client.wait_state(container, CONTAINER_RUNNING)
    ledger = msgspec.json.decode((kubelet.node_dir / LEDGER_NAME).read_bytes(), type=Ledger)
    quota, cpuset = ledger.allocations[by_quota], ledger.allocations[by_cpuset]
    assert (len(quota.cpus), quota.main_ram_size) == (2, 128 * MiB)
    assert (cpuset.cpus, cpuset.main_ram_size) == (frozenset({5, 6}), 32 * MiB)
    assert not quota.cpus & cpuset.cpus


def test_pod_annotation_selects_the_shutdown_deadline(kubelet: Node):
    """``org.runphi.*`` pod annotations reach runphi (pod_annotations): with
    ``org.runphi.shutdown-timeout-ms=500`` runphi destroys a locked guest's cell itself
    after 0.5 s and exits 143, long before containerd's 30 s SIGKILL."""
    pod = kubelet.run_pod("deadline", annotations={"org.runphi.shutdown-timeout-ms": "500"})
    container = kubelet.run_container(pod, "locked", LOCKED)
    kubelet.client.wait_state(container, CONTAINER_RUNNING)
    assert runphi_record(kubelet, container).annotations["org.runphi.shutdown-timeout-ms"] == "500"
    with kubelet.guests_refuse_shutdown():
        began = time.monotonic()
        kubelet.client.stop(container, timeout=30)
        took = time.monotonic() - began
    assert kubelet.client.status(container).exit_code == 143
    assert took < 15, f"stop took {took:.1f} s: the annotation's deadline was not applied"
    assert kubelet.cells() == []


def test_pod_annotation_runtime_runphi_leaves_the_pause_container_to_runc(kubelet: Node):
    """A pod-wide ``org.runphi.runtime=runphi`` (pod annotations reach every container,
    the sandbox's too) must not make the pause container a ZIC: it is recognised by
    ``io.kubernetes.cri.container-type=sandbox`` and always forwarded to runc."""
    pod = kubelet.run_pod("forced", annotations={"org.runphi.runtime": "runphi"})
    assert kubelet.runc_state(pod.id).exists() and runphi_record(kubelet, pod.id) is None
    container = kubelet.run_container(pod, "hello", HELLO)
    assert kubelet.client.wait_state(container, CONTAINER_EXITED).exit_code == 0



def test_a_zic_that_does_not_fit_fails_start_container_with_one_clear_line(kubelet: Node):
    """With one cell CPU taken, a ZIC asking for all seven is refused. containerd's CRI
    runs the runtime's ``create`` in StartContainer, so that call fails, carrying
    runphi's one-line reason (what ``kubectl describe`` shows), and nothing of the
    refused container is left on the board."""
    pod = kubelet.run_pod("full")
    holder = kubelet.run_container(pod, "holder", TICKER)
    kubelet.client.wait_state(holder, CONTAINER_RUNNING)
    greedy = kubelet.create(pod, "greedy", TICKER, resources=kubelet.client.resources(cpuset="1-7"))
    with pytest.raises(grpc.RpcError) as refused:
        kubelet.client.start(greedy)
    reason = refused.value.details()
    assert f"cannot create container {greedy}" in reason and "CPUs 1-7 requested" in reason, reason
    assert "not free" in reason and "Traceback" not in reason, reason
    assert len(kubelet.cells()) == 1
    assert kubelet.leftovers().ledger == [holder]
    assert runphi_record(kubelet, greedy) is None


@pytest.fixture
def manifests(kubelet: Node):
    """The node with the example manifests' image names tagged; skips without kubectl
    (it decodes the YAML offline, as ``kubectl apply`` would)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    for name, imported in MANIFEST_IMAGES.items():
        kubelet.tag_image(imported, name)
    return kubelet


def test_example_zic_pod_manifest_runs_as_documented(manifests: Node):
    """target/kubernetes/zic-pod.yaml as a kubelet would run it: the hello ZIC completes
    and its console is the container log."""
    pod, containers = manifests.run_manifest(load_pod(KUBERNETES / "zic-pod.yaml"),
                                             load_runtime_class(KUBERNETES / "runtimeclass.yaml"))
    status = manifests.client.wait_state(containers["hello"], CONTAINER_EXITED)
    assert (status.exit_code, status.reason) == (0, "Completed")
    manifests.wait_log(pod.log_directory / "hello" / "0.log", "Hello from a ZIC")


def test_example_sidecar_pod_manifest_runs_and_deletes_as_documented(manifests: Node):
    """target/kubernetes/zic-pod-sidecar.yaml as a kubelet would run it: two cells sized by
    the limits, the sidecar under runc; ``kubectl delete pod`` (StopContainer with the
    grace period) ends both ZICs gracefully with 143."""
    from runphi.backends.jailhouse.allocator import LEDGER_NAME, Ledger

    manifest = load_pod(KUBERNETES / "zic-pod-sidecar.yaml")
    pod, containers = manifests.run_manifest(manifest, load_runtime_class(KUBERNETES / "runtimeclass.yaml"))
    for container in containers.values():
        manifests.client.wait_state(container, CONTAINER_RUNNING)
    manifests.wait_log(pod.log_directory / "ticker-a" / "0.log", "tick 1")
    manifests.wait_log(pod.log_directory / "sidecar" / "0.log", "sidecar up")
    ledger = msgspec.json.decode((manifests.node_dir / LEDGER_NAME).read_bytes(), type=Ledger)
    sizes = {name: (len(ledger.allocations[containers[name]].cpus),
                    ledger.allocations[containers[name]].main_ram_size) for name in ("ticker-a", "ticker-b")}
    assert sizes == {"ticker-a": (1, 64 * MiB), "ticker-b": (1, 32 * MiB)}
    assert runphi_record(manifests, containers["sidecar"]) is None
    for container in containers.values():
        manifests.client.stop(container, timeout=manifest.spec.termination_grace_period_seconds)
    codes = {name: manifests.client.status(cid).exit_code for name, cid in containers.items()}
    assert codes["ticker-a"] == codes["ticker-b"] == 143
    assert manifests.cells() == []
