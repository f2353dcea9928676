"""A private Kubernetes-style node: containerd with the CRI plugin, a ``runphi``
runtime handler, a simulated Jailhouse board, and the images a pod needs offline.

The CRI configuration follows ``../shared/reference/cri.md``: a local sandbox
("pause") image imported into namespace ``k8s.io``, ``restrict_oom_score_adj``,
``disable_apparmor``, and a ``runphi`` handler (``BinaryName``, ``Root``,
``pod_annotations``/``container_annotations = ["org.runphi.*"]``) next to the
default ``runc`` one. Pods must use host networking (no CNI here).
"""

from __future__ import annotations

import io
import platform
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from tools.testbed.containerd import SHIM_RUNTIME, PrivateContainerd, busybox_path, processes_with_env
from tools.mkzic import oci as image_oci
from tools.mkzic.image import sha256_digest
from tools.mkzic.tarball import gzip_bytes

CRI_NAMESPACE = "k8s.io"
PAUSE_IMAGE = "docker.io/library/runphi-test-busybox:cri"
BUSYBOX_APPLETS = ("sh", "sleep", "echo", "cat", "true")
#: The sandbox's process: busybox has no ``pause`` applet, so a script that sleeps forever.
PAUSE_SCRIPT = b"#!/bin/sh\nwhile :; do sleep 3600; done\n"
SIM_PLATFORM = "sim-qemu-arm64"
#: How runphi names the OCI platform of the machine these tests run on.
OCI_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}


def host_architecture() -> str:
    """The OCI architecture of this machine (what the node's containerd resolves images for)."""
    machine = platform.machine()
    return OCI_ARCHITECTURES.get(machine, machine)


class CriContainerd(PrivateContainerd):
    """A private containerd whose CRI plugin serves pods with a ``runphi`` handler.

    ``mode`` (tools.testbed.containerd.MODES) picks the handler's table: runphi's own
    shim (``target/kubernetes``'s ``runphi``) or runc's shim running runphi as its
    runc (the shipped ``runphi-runc``).
    """

    def __init__(self, base: Path, runphi: Path, env: dict[str, str], mode: str = "shim") -> None:
        super().__init__(base, runphi, env=env, cri=True)
        self.mode = mode
        self.cni_dir = base / "cni"
        #: runc's own state root for the default handler (never shared with the host).
        self.runc_root = base / "runc"

    def config_text(self) -> str:
        """containerd config: private paths plus the CRI plugin configured per cri.md."""
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.base / 'ttrpc.sock'}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.cni]
  bin_dir = "{self.cni_dir}"
  conf_dir = "{self.cni_dir}"

[{cri}.containerd]
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  Root = "{self.runc_root}"

{self._runphi_handler(cri)}"""

    def _runphi_handler(self, cri: str) -> str:
        """The ``runphi`` handler's tables in this node's mode."""
        if self.mode == "shim":
            return f"""[{cri}.containerd.runtimes.runphi]
  runtime_type = "{SHIM_RUNTIME}"
  pod_annotations = ["org.runphi.*"]
  container_annotations = ["org.runphi.*"]
"""
        return f"""[{cri}.containerd.runtimes.runphi]
  runtime_type = "io.containerd.runc.v2"
  pod_annotations = ["org.runphi.*"]
  container_annotations = ["org.runphi.*"]
[{cri}.containerd.runtimes.runphi.options]
  BinaryName = "{self.runphi}"
  Root = "{self.runtime_root}"
"""

    def start(self, timeout: float = 30.0) -> None:
        for directory in (self.cni_dir, self.runc_root):
            directory.mkdir(parents=True, exist_ok=True)
        super().start(timeout)

    def ctr_k8s(self, *args: str) -> None:
        """Run ``ctr`` against the CRI namespace; raises with ctr's stderr when it fails."""
        done = subprocess.run(["ctr", "--address", str(self.address), "--namespace", CRI_NAMESPACE, *args],
                              capture_output=True, text=True, timeout=120, env=self.env, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")

    def import_image(self, archive: Path, architecture: str) -> None:
        """``ctr image import`` into the CRI namespace, unpacked for ``architecture``."""
        self.ctr_k8s("image", "import", "--platform", f"linux/{architecture}", str(archive))


def _tar_entry(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, link
    return info


def busybox_layer() -> bytes:
    """A layer with a static busybox, applet symlinks in /bin and the ``/pause`` script."""
    buffer = io.BytesIO()
    busybox = busybox_path().read_bytes()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tar_entry("bin", tarfile.DIRTYPE, 0o755))
        tar.addfile(_tar_entry("bin/busybox", tarfile.REGTYPE, 0o755, len(busybox)), io.BytesIO(busybox))
        for applet in BUSYBOX_APPLETS:
            tar.addfile(_tar_entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"))
        tar.addfile(_tar_entry("pause", tarfile.REGTYPE, 0o755, len(PAUSE_SCRIPT)), io.BytesIO(PAUSE_SCRIPT))
    return buffer.getvalue()


def _descriptor(media_type: str, data: bytes) -> image_oci.Descriptor:
    return image_oci.Descriptor(mediaType=media_type, digest=sha256_digest(data), size=len(data))


def busybox_image_archive(name: str, architecture: str) -> bytes:
    """An OCI image archive (``ctr image import`` input) of :func:`busybox_layer`, named ``name``.

    Serves as the pod sandbox image (``/pause``) and as a plain sidecar image.
    """
    layer = busybox_layer()
    layer_gz = gzip_bytes(layer)
    config = msgspec.json.encode(image_oci.ImageConfig(
        architecture=architecture, os="linux",
        config=image_oci.ExecConfig(Cmd=["/pause"], Env=["PATH=/bin"]),
        rootfs=image_oci.RootFs(diff_ids=[sha256_digest(layer)])))
    layer_desc = _descriptor(image_oci.MEDIA_LAYER_GZIP, layer_gz)
    config_desc = _descriptor(image_oci.MEDIA_CONFIG, config)
    manifest = msgspec.json.encode(image_oci.Manifest(config=config_desc, layers=[layer_desc]))
    entry = msgspec.structs.replace(
        _descriptor(image_oci.MEDIA_MANIFEST, manifest),
        platform=image_oci.Platform(architecture=architecture, os="linux"),
        annotations={image_oci.ANNOTATION_CONTAINERD_NAME: name,
                     image_oci.ANNOTATION_REF_NAME: name.rpartition(":")[2]})
    files = {"oci-layout": msgspec.json.encode(image_oci.ImageLayout()),
             "index.json": msgspec.json.encode(image_oci.Index(manifests=[entry]))}
    for data in (layer_gz, config, manifest):
        files["blobs/sha256/" + sha256_digest(data).removeprefix("sha256:")] = data
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            tar.addfile(_tar_entry(directory, tarfile.DIRTYPE, 0o755))
        for path, data in files.items():
            tar.addfile(_tar_entry(path, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return buffer.getvalue()


def script_guest(*lines: str) -> bytes:
    """A simulator script-engine guest image (``tools/jailhouse_sim`` README)."""
    return ("#!jailhouse-sim-inmate\n" + "\n".join(lines) + "\n").encode()


def zic_image_archive(name: str, guest: bytes, work: Path, architecture: str) -> bytes:
    """A ZIC image built with mkzic: ``guest`` as /boot/<name>.bin, a bare-metal boot
    description that leaves CPUs and memory to the container's ``linux.resources``."""
    from tools.mkzic import BootDescription, Description, assemble, build_image_archive, parse_image_name

    inmate = work / f"{name.replace(':', '-')}.bin"
    inmate.write_bytes(guest)
    zic = assemble(Description(known=BootDescription(os_var="baremetal", starting_vaddress="0x70000000")),
                   {"inmate": inmate})
    return build_image_archive(zic, parse_image_name(name), architecture=architecture).data


@dataclass
class Leftovers:
    """What a torn-down pod must not leave behind (each list empty when clean)."""

    cells: list[str] = field(default_factory=list)
    ledger: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)

    def clean(self) -> bool:
        return not (self.cells or self.ledger or self.records or self.processes or self.netns)


def cells_on(sysfs: Path) -> list[str]:
    """Names of the non-root cells the board's sysfs lists."""
    names = []
    cells = sysfs / "cells"
    for entry in sorted(cells.iterdir()) if cells.is_dir() else []:
        if entry.name == "0":
            continue
        try:
            names.append((entry / "name").read_text().strip())
        except FileNotFoundError:
            continue  # the cell went away while listing
    return names


def ledger_entries(node_dir: Path) -> list[str]:
    """Container ids holding resources in runphi's ledger."""
    from runphi.backends.jailhouse.allocator import LEDGER_NAME, Ledger

    path = node_dir / LEDGER_NAME
    if not path.exists():
        return []
    return sorted(msgspec.json.decode(path.read_bytes(), type=Ledger).allocations)


def runphi_records(*roots: Path) -> list[str]:
    """Ids runphi still keeps a record for under any of ``roots`` (``<root>/<namespace>/<id>``)."""
    return sorted(p.parent.name for root in roots for p in root.glob("*/*/runphi.json"))


def netns_entries() -> set[str]:
    directory = Path("/var/run/netns")
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()

