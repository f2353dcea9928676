"""A ZIC as an OCI image layout packed in one tar that ``ctr image import`` accepts.

Layout: ``oci-layout``, ``index.json`` (one manifest, named through
``io.containerd.image.name`` and ``org.opencontainers.image.ref.name``),
``blobs/sha256/<hex>`` for the manifest, the image config and one gzip layer
holding ``boot/``. All bytes are reproducible: same inputs, same sha256.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import msgspec

from . import oci
from .errors import MkzicError
from .names import ImageName
from .tarball import gzip_bytes, tar_bytes
from .zic import ZicContents

DEFAULT_ARCHITECTURE = "arm64"
IMAGE_OS = "linux"


class Blob(msgspec.Struct, frozen=True):
    """Content-addressed bytes and the descriptor that points at them."""

    descriptor: oci.Descriptor
    data: bytes


class ImageArchive(msgspec.Struct, frozen=True):
    """A built image: its name, its manifest's descriptor and the archive bytes."""

    name: ImageName
    manifest: oci.Descriptor
    data: bytes


def sha256_digest(data: bytes) -> str:
    """The OCI digest string (``sha256:<hex>``) of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(media_type: str, data: bytes) -> Blob:
    return Blob(oci.Descriptor(mediaType=media_type, digest=sha256_digest(data), size=len(data)), data)


def _json(value: msgspec.Struct) -> bytes:
    return msgspec.json.encode(value)


def layer_tar(zic: ZicContents) -> bytes:
    """The uncompressed layer: the ZIC's files at their image paths, relative (``boot/...``)."""
    return tar_bytes({path.lstrip("/"): data for path, data in zic.files.items()})


def image_config(zic: ZicContents, diff_id: str, architecture: str) -> oci.ImageConfig:
    """The image config: platform, the never-run ``Cmd`` containerd requires, the layer's diff id."""
    return oci.ImageConfig(
        architecture=architecture,
        os=IMAGE_OS,
        config=oci.ExecConfig(Cmd=list(zic.process_args)),
        rootfs=oci.RootFs(diff_ids=[diff_id]),
    )


def build_image_archive(zic: ZicContents, name: ImageName, architecture: str = DEFAULT_ARCHITECTURE) -> ImageArchive:
    """Pack ``zic`` as an OCI image archive named ``name`` for ``linux/<architecture>``.

    Guarantee: every blob's file name, digest and size agree, and the result is
    a pure function of the arguments.
    """
    uncompressed = layer_tar(zic)
    layer = _blob(oci.MEDIA_LAYER_GZIP, gzip_bytes(uncompressed))
    config = _blob(oci.MEDIA_CONFIG, _json(image_config(zic, sha256_digest(uncompressed), architecture)))
    manifest = _blob(oci.MEDIA_MANIFEST, _json(oci.Manifest(config=config.descriptor, layers=[layer.descriptor])))
    entry = msgspec.structs.replace(
        manifest.descriptor,
        platform=oci.Platform(architecture=architecture, os=IMAGE_OS),
        annotations={oci.ANNOTATION_CONTAINERD_NAME: name.full(), oci.ANNOTATION_REF_NAME: name.tag},
    )
    files = {
        "oci-layout": _json(oci.ImageLayout()),
        "index.json": _json(oci.Index(manifests=[entry])),
    }
    for blob in sorted((layer, config, manifest), key=lambda b: b.descriptor.digest):
        files["blobs/sha256/" + blob.descriptor.digest.removeprefix("sha256:")] = blob.data
    return ImageArchive(name=name, manifest=manifest.descriptor, data=tar_bytes(files))


def write_archive(path: Path, archive: ImageArchive) -> Path:
    """Write ``archive`` to ``path`` atomically (temporary sibling, fsync, rename); return the path.

    An existing file is replaced only once the new one is complete.
    """
    path = path.absolute()
    if path.is_dir():
        raise MkzicError(f"image archive path {path} is a directory", "give a file name such as hello.tar")
    try:
        fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise MkzicError(f"cannot write image archive {path}: {exc.strerror}", "check the directory exists and is writable") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(archive.data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except OSError as exc:
        os.unlink(staging)
        raise MkzicError(f"cannot write image archive {path}: {exc.strerror}", "check the path and free space") from None
    except BaseException:
        os.unlink(staging)
        raise
    return path
