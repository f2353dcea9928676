"""A private Kubernetes-style node: containerd with the CRI plugin, a ``runphi``
runtime handler, a simulated Jailhouse board, and the images a pod needs offline.

The CRI configuration follows ``../shared/reference/cri.md``: a local sandbox
("pause") image imported into namespace ``k8s.io``, ``restrict_oom_score_adj``,
``disable_apparmor``, and a ``runphi`` handler (``BinaryName``, ``Root``,
``pod_annotations``/``container_annotations = ["org.runphi.*"]``) next to the
default ``runc`` one. Without a :class:`PodNetwork` pods must use host networking (no
CNI). With one, containerd runs inside a network namespace the test made, and its CNI
config is one private conflist (``bridge`` + ``host-local`` on a link-local test subnet)
run by Debian's CNI plugins: the bridge, the pods' veths and every tap stay in that
namespace.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import tarfile
from dataclasses import dataclass, field, fields
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


#: Where Debian's containernetworking-plugins (and the upstream tarball) put the CNI plugins.
CNI_BIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
#: The CNI plugins a networked node needs: its conflist's two, and ``loopback``, which
#: containerd's CRI runs itself for every pod's ``lo``.
CNI_PLUGINS = ("bridge", "host-local", "loopback")


def cni_bin_dir() -> Path | None:
    """The first of :data:`CNI_BIN_DIRS` holding every plugin of :data:`CNI_PLUGINS` as an
    executable file, or None when this machine has no CNI plugins."""
    for directory in CNI_BIN_DIRS:
        if all(os.access(directory / plugin, os.X_OK) for plugin in CNI_PLUGINS):
            return directory
    return None


@dataclass(frozen=True)
class PodNetwork:
    """The pod network of a node: a CNI ``bridge`` in the node's network namespace ``netns``
    with the ``subnet``'s ``gateway`` address, pods' addresses from ``host-local`` (leases
    under ``data_dir``), and their default route via the gateway. No masquerading, no
    hairpin; the subnet is link-local (inside 169.254.0.0/16)."""

    netns: str
    bin_dir: Path
    data_dir: Path
    bridge: str = "rphicni0"
    subnet: str = "169.254.200.0/24"
    gateway: str = "169.254.200.1"

    @property
    def name(self) -> str:
        """The CNI network's name (also names libcni's cached results of its pods)."""
        return self.netns

    def conflist(self) -> dict:
        """The network's CNI configuration list (what containerd reads from its ``conf_dir``)."""
        ipam = {"type": "host-local", "dataDir": str(self.data_dir),
                "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]],
                "routes": [{"dst": "0.0.0.0/0", "gw": self.gateway}]}
        bridge = {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                  "hairpinMode": False, "ipam": ipam}
        return {"cniVersion": "1.0.0", "name": self.name, "plugins": [bridge]}

    def write_conf(self, conf_dir: Path) -> None:
        """Write this network's conflist into ``conf_dir`` (made when missing)."""
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-runphi-test.conflist").write_text(json.dumps(self.conflist(), indent=2) + "\n")


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

    def __init__(self, base: Path, runphi: Path, env: dict[str, str], mode: str = "shim",
                 network: PodNetwork | None = None) -> None:
        super().__init__(base, runphi, env=env, cri=True, netns=network.netns if network else None)
        self.mode = mode
        #: The pod network (containerd then runs in its namespace), or None: host-network pods only.
        self.network = network
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
  bin_dir = "{self.network.bin_dir if self.network else self.cni_dir}"
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
        if self.network is not None:
            self.network.write_conf(self.cni_dir)
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


def zic_image_archive(name: str, guest: bytes, work: Path, architecture: str, *, net: bool = False) -> bytes:
    """A ZIC image built with mkzic: ``guest`` as /boot/<name>.bin, a bare-metal boot
    description that leaves CPUs and memory to the container's ``linux.resources`` and, with
    ``net``, asks for a network link (``"net": "true"``, as ``mkzic --net true`` writes it)."""
    from tools.mkzic import BootDescription, Description, assemble, build_image_archive, parse_image_name

    inmate = work / f"{name.replace(':', '-')}.bin"
    inmate.write_bytes(guest)
    boot = BootDescription(os_var="baremetal", starting_vaddress="0x70000000", net="true" if net else None)
    zic = assemble(Description(known=boot), {"inmate": inmate})
    return build_image_archive(zic, parse_image_name(name), architecture=architecture).data


@dataclass
class Leftovers:
    """What a torn-down pod must not leave behind (each list empty when clean)."""

    cells: list[str] = field(default_factory=list)
    ledger: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    #: A networked node's namespace: links besides lo and the CNI bridge (taps, veths, ...),
    interfaces: list[str] = field(default_factory=list)
    #: addresses on anything but lo and the bridge,
    addresses: list[str] = field(default_factory=list)
    #: nftables tables (``nft list tables``),
    nft_tables: list[str] = field(default_factory=list)
    #: and libcni's cached results for the node's CNI network.
    cni_results: list[str] = field(default_factory=list)

    def clean(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


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


def kvm_cells(node_dir: Path) -> list[str]:
    """Names of the cells runphi's KVM backend keeps a directory for under its state dir."""
    from runphi.backends.kvm.cells import CELLS_DIR

    cells = node_dir / CELLS_DIR
    return sorted(p.name for p in cells.iterdir() if not p.name.startswith(".")) if cells.is_dir() else []


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



#: Where libcni (in containerd) caches every ADD's result until the DEL (not configurable in
#: containerd 1.6's CRI plugin): ``<network>-<sandbox id>-<interface>`` files.
CNI_RESULTS = Path("/var/lib/cni/results")


def namespace_links(netns: str | None) -> list[str]:
    """Names of the network interfaces in network namespace ``netns`` (None: this process's)."""
    from pyroute2 import IPRoute

    with (IPRoute(netns=netns, flags=0) if netns else IPRoute()) as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())


def namespace_addresses(netns: str) -> list[tuple[str, str]]:
    """(interface, ``address/prefix``) of every address in network namespace ``netns``."""
    from pyroute2 import IPRoute

    with IPRoute(netns=netns, flags=0) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return sorted((names.get(a["index"], str(a["index"])), f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                      for a in ipr.get_addr())


def nft_tables(netns: str) -> list[str]:
    """``nft list tables`` inside network namespace ``netns``, one table a line; raises with
    nft's message when it fails."""
    argv = ["nsenter", f"--net=/run/netns/{netns}", "nft", "list", "tables"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return [line for line in done.stdout.splitlines() if line.strip()]


def cni_results(network: str) -> list[str]:
    """libcni's cached results still held for pods of the CNI network called ``network``."""
    return sorted(p.name for p in CNI_RESULTS.glob(f"{network}-*")) if CNI_RESULTS.is_dir() else []


def network_leftovers(network: PodNetwork) -> dict[str, list[str]]:
    """What the pods of ``network`` left in the node's namespace and libcni's cache: the
    :class:`Leftovers` network fields (each empty when clean)."""
    keep = {"lo", network.bridge}
    return {"interfaces": [name for name in namespace_links(network.netns) if name not in keep],
            "addresses": [f"{name} {address}" for name, address in namespace_addresses(network.netns)
                          if name not in keep],
            "nft_tables": nft_tables(network.netns),
            "cni_results": cni_results(network.name)}
