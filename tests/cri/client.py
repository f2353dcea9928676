"""A kubelet-like CRI client: the ``runtime.v1`` subset compiled at test time.

:func:`compile_proto` runs grpcio-tools' ``protoc`` on ``runtime_v1_subset.proto``
into a fresh directory and imports the generated modules under private names, so
nothing generated is ever committed or shared between test runs.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).with_name("runtime_v1_subset.proto")

#: CRI ``ContainerState`` numbers (upstream values).
CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED, CONTAINER_UNKNOWN = 0, 1, 2, 3
#: CRI ``NamespaceMode`` numbers: ``POD``, the pod's own namespace (a CNI network for the
#: network namespace); ``NODE``, the host's namespace (host networking).
NAMESPACE_POD, NAMESPACE_NODE = 0, 2


class CriError(AssertionError):
    """The CRI did not reach the expected state in time."""


@dataclass(frozen=True)
class Protocol:
    """The generated message module (``pb``) and service stub module (``grpc``)."""

    pb: ModuleType
    grpc: ModuleType


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compile_proto(out_dir: Path) -> Protocol:
    """Compile the subset proto into ``out_dir`` and import it.

    Guarantee: raises with protoc's own message when the proto does not compile.
    """
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    status = protoc.main(["protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={out_dir}",
                          f"--grpc_python_out={out_dir}", str(PROTO)])
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO} with status {status}")
    stem = PROTO.stem
    # The generated stub module imports the message module by its file name.
    pb = _load(f"{stem}_pb2", out_dir / f"{stem}_pb2.py")
    stubs = _load(f"{stem}_pb2_grpc", out_dir / f"{stem}_pb2_grpc.py")
    return Protocol(pb=pb, grpc=stubs)


class CriClient:
    """The RuntimeService and ImageService of one containerd, over its unix socket.

    Every call has a deadline (``rpc_timeout``); a failing call raises
    ``grpc.RpcError`` with containerd's message.
    """

    def __init__(self, proto: Protocol, socket: Path, rpc_timeout: float = 60.0) -> None:
        import grpc

        self.pb = proto.pb
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = proto.grpc.RuntimeServiceStub(self.channel)
        self.images = proto.grpc.ImageServiceStub(self.channel)
        self.rpc_timeout = rpc_timeout

    def close(self) -> None:
        self.channel.close()

    def version(self):
        return self.runtime.Version(self.pb.VersionRequest(version="v1"), timeout=self.rpc_timeout)

    def list_images(self) -> list[str]:
        """Every repo tag the CRI image service knows."""
        reply = self.images.ListImages(self.pb.ListImagesRequest(), timeout=self.rpc_timeout)
        return [tag for image in reply.images for tag in image.repo_tags]

    def pod_config(self, name: str, uid: str, log_directory: Path, *,
                   annotations: dict[str, str] | None = None, host_network: bool = True):
        """A PodSandboxConfig as a kubelet sends it.

        ``host_network`` (the only kind that starts without CNI): the node's network
        namespace and no hostname (the pod shares the node's UTS namespace, so the runtime
        may not set one). Otherwise (``POD`` mode): the pod gets a network namespace of its
        own, wired by the CNI network, and its hostname is the pod's name, as a kubelet sets it.
        """
        pb = self.pb
        network = NAMESPACE_NODE if host_network else NAMESPACE_POD
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0),
            hostname="" if host_network else name,
            log_directory=str(log_directory), annotations=annotations or {},
            linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=network, pid=NAMESPACE_POD, ipc=NAMESPACE_POD))))

    def run_pod(self, config, handler: str = "runphi") -> str:
        reply = self.runtime.RunPodSandbox(
            self.pb.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=self.rpc_timeout)
        return reply.pod_sandbox_id

    def container_config(self, name: str, image: str, *, attempt: int = 0, log_path: str = "",
                         command: list[str] | None = None, args: list[str] | None = None,
                         resources=None, annotations: dict[str, str] | None = None):
        """A ContainerConfig as a kubelet sends it (log path ``<name>/<attempt>.log`` by default)."""
        pb = self.pb
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt), image=pb.ImageSpec(image=image),
            command=command or [], args=args or [], annotations=annotations or {},
            log_path=log_path or f"{name}/{attempt}.log",
            linux=pb.LinuxContainerConfig(resources=resources) if resources is not None else None)

    def resources(self, *, cpu_quota: int = 0, cpu_period: int = 0, cpuset: str = "",
                  memory: int = 0):
        return self.pb.LinuxContainerResources(cpu_quota=cpu_quota, cpu_period=cpu_period,
                                               cpuset_cpus=cpuset, memory_limit_in_bytes=memory)

    def create(self, pod_id: str, config, sandbox_config) -> str:
        reply = self.runtime.CreateContainer(self.pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config), timeout=self.rpc_timeout)
        return reply.container_id

    def start(self, container_id: str) -> None:
        self.runtime.StartContainer(self.pb.StartContainerRequest(container_id=container_id),
                                    timeout=self.rpc_timeout)

    def stop(self, container_id: str, timeout: int) -> None:
        """StopContainer with a grace period of ``timeout`` s (the RPC waits for the stop)."""
        self.runtime.StopContainer(self.pb.StopContainerRequest(container_id=container_id, timeout=timeout),
                                   timeout=self.rpc_timeout + timeout)

    def remove(self, container_id: str) -> None:
        self.runtime.RemoveContainer(self.pb.RemoveContainerRequest(container_id=container_id),
                                     timeout=self.rpc_timeout)

    def status(self, container_id: str):
        reply = self.runtime.ContainerStatus(self.pb.ContainerStatusRequest(container_id=container_id),
                                             timeout=self.rpc_timeout)
        return reply.status

    def pod_status(self, pod_id: str):
        """PodSandboxStatus's ``status`` (state, network, ...)."""
        reply = self.runtime.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                              timeout=self.rpc_timeout)
        return reply.status

    def pod_ip(self, pod_id: str) -> str:
        """The pod's IP as the CRI reports it (what ``kubectl get pod -o wide`` shows); "" for
        a host-network pod."""
        return self.pod_status(pod_id).network.ip

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=self.rpc_timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=self.rpc_timeout)

    def pods(self) -> list:
        return list(self.runtime.ListPodSandbox(self.pb.ListPodSandboxRequest(),
                                                timeout=self.rpc_timeout).items)

    def containers(self) -> list:
        return list(self.runtime.ListContainers(self.pb.ListContainersRequest(),
                                                timeout=self.rpc_timeout).containers)

    def wait_state(self, container_id: str, state: int, timeout: float = 60.0):
        """Poll ContainerStatus (the kubelet's own event source) until ``state``; return the status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(container_id)
            if status.state == state:
                return status
            if time.monotonic() > deadline:
                raise CriError(f"container {container_id} still in state {status.state} "
                               f"(reason {status.reason!r}) after {timeout} s, wanted {state}")
            time.sleep(0.05)
