"""Image names, normalised the way containerd and Docker spell them in full.

``hello`` → ``docker.io/library/hello:latest``; ``team/zic:1`` →
``docker.io/team/zic:1``; ``registry.local:5000/zic`` →
``registry.local:5000/zic:latest``. containerd's importer keeps an image only
under its full name, so the archive carries it in ``io.containerd.image.name``.
"""

from __future__ import annotations

import re

import msgspec

from .errors import MkzicError

DEFAULT_DOMAIN = "docker.io"
OFFICIAL_PREFIX = "library"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


class ImageName(msgspec.Struct, frozen=True):
    """A fully qualified image reference: ``domain/path:tag``."""

    domain: str
    path: str
    tag: str

    def full(self) -> str:
        """The name containerd lists (``ctr image ls``) and ``ctr run`` accepts."""
        return f"{self.domain}/{self.path}:{self.tag}"


def _bad(name: str, why: str) -> MkzicError:
    return MkzicError(f"image name {name!r} {why}", "use a name like hello, team/hello:1.0 or registry.local:5000/hello:1.0")


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return DEFAULT_DOMAIN, name


def parse_image_name(name: str) -> ImageName:
    """Normalise ``name`` to its full form; raise :class:`MkzicError` if it is not a valid tagged name.

    Digest references are refused: the digest of an image being built is not
    known in advance.
    """
    if "@" in name:
        raise _bad(name, "has a digest")
    domain, remainder = _split_domain(name)
    path, tag = remainder, DEFAULT_TAG
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        path, tag = remainder[:colon], remainder[colon + 1 :]
    if not _DOMAIN.fullmatch(domain):
        raise _bad(name, "has an invalid registry part")
    if not path or not all(_COMPONENT.fullmatch(part) for part in path.split("/")):
        raise _bad(name, "has an invalid repository part (lowercase letters, digits and . _ - only)")
    if not _TAG.fullmatch(tag):
        raise _bad(name, "has an invalid tag")
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"{OFFICIAL_PREFIX}/{path}"
    return ImageName(domain=domain, path=path, tag=tag)
