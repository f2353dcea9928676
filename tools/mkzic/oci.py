"""msgspec models of the OCI runtime-spec and image-spec subsets mkzic writes.

Field names are the specs' JSON names; field order is the order written, which
keeps every file mkzic produces byte-for-byte reproducible.
"""

from __future__ import annotations

import msgspec

from runphi.oci import Resources

OCI_RUNTIME_VERSION = "1.0.2"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"


# --- runtime spec (bundle config.json) ---------------------------------------


class User(msgspec.Struct):
    uid: int = 0
    gid: int = 0


class Process(msgspec.Struct, kw_only=True):
    terminal: bool = False
    user: User = msgspec.field(default_factory=User)
    args: list[str]
    env: list[str] = msgspec.field(default_factory=list)
    cwd: str = "/"


class Root(msgspec.Struct):
    path: str
    readonly: bool = True


class Namespace(msgspec.Struct):
    type: str


class Linux(msgspec.Struct, omit_defaults=True):
    namespaces: list[Namespace] = msgspec.field(default_factory=list)
    resources: Resources | None = None


class RuntimeSpec(msgspec.Struct, omit_defaults=True):
    ociVersion: str
    process: Process
    root: Root
    hostname: str | None = None
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    linux: Linux | None = None


# --- image spec (image layout) -----------------------------------------------


class ImageLayout(msgspec.Struct):
    imageLayoutVersion: str = "1.0.0"


class Platform(msgspec.Struct):
    architecture: str
    os: str


class Descriptor(msgspec.Struct, omit_defaults=True):
    mediaType: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = msgspec.field(default_factory=dict)


class Index(msgspec.Struct, kw_only=True):
    schemaVersion: int = 2
    mediaType: str = MEDIA_INDEX
    manifests: list[Descriptor]


class Manifest(msgspec.Struct, kw_only=True):
    schemaVersion: int = 2
    mediaType: str = MEDIA_MANIFEST
    config: Descriptor
    layers: list[Descriptor]


class ExecConfig(msgspec.Struct, omit_defaults=True):
    Cmd: list[str]
    Env: list[str] = msgspec.field(default_factory=list)
    WorkingDir: str = "/"
    Labels: dict[str, str] = msgspec.field(default_factory=dict)


class RootFs(msgspec.Struct, kw_only=True):
    type: str = "layers"
    diff_ids: list[str]


class ImageConfig(msgspec.Struct):
    architecture: str
    os: str
    config: ExecConfig
    rootfs: RootFs
