"""What a kubelet sends for a pod manifest: the subset of its translation to CRI
requests that runphi's example manifests exercise.

* ``metadata.annotations`` → ``PodSandboxConfig.annotations``;
* ``spec.runtimeClassName`` → ``RunPodSandboxRequest.runtime_handler`` (the
  RuntimeClass's ``handler``);
* per container: ``command``/``args``, ``image``, and ``resources.limits``
  → ``LinuxContainerResources`` (``cpu`` → quota over a 100 ms period,
  ``memory`` → limit in bytes), as the kubelet computes them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import msgspec

CPU_PERIOD_US = 100_000
BINARY_SUFFIXES = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
DECIMAL_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}


class Resources(msgspec.Struct):
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}


class Container(msgspec.Struct):
    name: str
    image: str
    command: list[str] = []
    args: list[str] = []
    resources: Resources = msgspec.field(default_factory=Resources)


class PodSpec(msgspec.Struct, rename="camel"):
    containers: list[Container]
    runtime_class_name: str = ""
    restart_policy: str = "Always"
    termination_grace_period_seconds: int = 30


class Metadata(msgspec.Struct):
    name: str
    annotations: dict[str, str] = {}


class PodManifest(msgspec.Struct):
    kind: str
    metadata: Metadata
    spec: PodSpec


class RuntimeClass(msgspec.Struct):
    kind: str
    metadata: Metadata
    handler: str


def decode_manifest(path: Path) -> bytes:
    """The manifest as JSON, decoded offline by kubectl (raises if kubectl is absent)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    done = subprocess.run([kubectl, "annotate", "--local", "-o", "json", "-f", str(path), "decoded=yes"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=True)
    decoded = json.loads(done.stdout)
    del decoded["metadata"]["annotations"]["decoded"]
    return json.dumps(decoded).encode()


def load_pod(path: Path) -> PodManifest:
    return msgspec.json.decode(decode_manifest(path), type=PodManifest)


def load_runtime_class(path: Path) -> RuntimeClass:
    return msgspec.json.decode(decode_manifest(path), type=RuntimeClass)


def cpu_millis(quantity: str) -> int:
    """A Kubernetes CPU quantity (``"1"``, ``"250m"``, ``"0.5"``) in millicores."""
    if quantity.endswith("m"):
        return int(quantity[:-1])
    return round(float(quantity) * 1000)


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``64Mi``, ``1G``, ``1048576``) in bytes."""
    match = re.fullmatch(r"(\d+)([KMG]i|[kMG]?)", quantity)
    if match is None:
        raise ValueError(f"unsupported memory quantity {quantity!r}")
    number, suffix = int(match.group(1)), match.group(2)
    return number * (BINARY_SUFFIXES.get(suffix) or DECIMAL_SUFFIXES[suffix])


def linux_resources(client, resources: Resources):
    """LinuxContainerResources as the kubelet derives them from ``limits``."""
    limits = resources.limits
    quota = cpu_millis(limits["cpu"]) * CPU_PERIOD_US // 1000 if "cpu" in limits else 0
    return client.resources(cpu_quota=quota, cpu_period=CPU_PERIOD_US if quota else 0,
                            memory=memory_bytes(limits["memory"]) if "memory" in limits else 0)
