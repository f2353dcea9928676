"""``target/kubernetes/`` says what the CRI tests do: same containerd handler, same
RuntimeClass handler name, pod shapes that the tests run (no containerd needed)."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from tests.cri.manifests import load_pod, load_runtime_class
from tests.cri.node import CriContainerd

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "target" / "kubernetes"
CRI = "io.containerd.grpc.v1.cri"


def runtimes(config: dict) -> dict:
    return config["plugins"][CRI]["containerd"]["runtimes"]


def node_config(tmp_path: Path, mode: str = "shim") -> dict:
    daemon = CriContainerd(tmp_path, Path("/opt/runphi/bin/runphi"), env={}, mode=mode)
    return tomllib.loads(daemon.config_text())


#: The shipped handler the CRI tests' ``runphi`` handler is, per mode.
SHIPPED_HANDLER = {"shim": "runphi", "runc-cli": "runphi-runc"}


@pytest.mark.parametrize("mode", sorted(SHIPPED_HANDLER))
def test_the_shipped_handler_is_the_tested_handler(tmp_path: Path, mode: str):
    """Same runtime_type and annotation pass-through, same option keys; only paths differ."""
    shipped = tomllib.loads((KUBERNETES / "containerd-cri.toml").read_text())
    tested = node_config(tmp_path, mode)
    assert runtimes(shipped)["runc"]["runtime_type"] == runtimes(tested)["runc"]["runtime_type"] \
        == "io.containerd.runc.v2"
    ours, theirs = runtimes(shipped)[SHIPPED_HANDLER[mode]], runtimes(tested)["runphi"]
    expected_type = "io.containerd.runphi.v2" if mode == "shim" else "io.containerd.runc.v2"
    assert ours["runtime_type"] == theirs["runtime_type"] == expected_type
    assert ours["pod_annotations"] == theirs["pod_annotations"] == ["org.runphi.*"]
    assert ours["container_annotations"] == theirs["container_annotations"] == ["org.runphi.*"]
    expected_options = [] if mode == "shim" else ["BinaryName", "Root"]
    assert sorted(ours.get("options", {})) == sorted(theirs.get("options", {})) == expected_options
    assert shipped["plugins"][CRI]["containerd"]["default_runtime_name"] == "runc"
    assert tested["plugins"][CRI]["containerd"]["default_runtime_name"] == "runc"


def test_the_kubernetes_snippet_agrees_with_the_plain_containerd_snippet():
    """target/containerd-runphi.toml (ctr users) and the Kubernetes snippet declare one handler."""
    kubernetes = runtimes(tomllib.loads((KUBERNETES / "containerd-cri.toml").read_text()))
    plain = runtimes(tomllib.loads((REPO / "target" / "containerd-runphi.toml").read_text()))
    for handler in SHIPPED_HANDLER.values():
        assert kubernetes[handler] == plain[handler]


def test_the_tested_node_sets_what_an_offline_board_needs(tmp_path: Path):
    """cri.md: local sandbox image, restrict_oom_score_adj, no AppArmor."""
    from tests.cri.node import PAUSE_IMAGE

    cri = node_config(tmp_path)["plugins"][CRI]
    assert cri["sandbox_image"] == PAUSE_IMAGE
    assert cri["restrict_oom_score_adj"] is True and cri["disable_apparmor"] is True


def test_the_sidecar_pod_is_the_tested_shape():
    """Two ZIC containers and a busybox sidecar under RuntimeClass runphi, options as pod
    annotations (the only annotations a kubelet passes on), no forced runtime."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    pod = load_pod(KUBERNETES / "zic-pod-sidecar.yaml")
    runtime_class = load_runtime_class(KUBERNETES / "runtimeclass.yaml")
    assert runtime_class.handler in runtimes(tomllib.loads((KUBERNETES / "containerd-cri.toml").read_text()))
    assert pod.spec.runtime_class_name == runtime_class.metadata.name
    assert [c.name for c in pod.spec.containers] == ["ticker-a", "ticker-b", "sidecar"]
    annotations = pod.metadata.annotations
    assert all(key.startswith("org.runphi.") for key in annotations)
    assert "org.runphi.runtime" not in annotations
    grace_ms = pod.spec.termination_grace_period_seconds * 1000
    assert int(annotations["org.runphi.shutdown-timeout-ms"]) < grace_ms
    for container in pod.spec.containers[:2]:
        assert container.resources.limits == container.resources.requests
