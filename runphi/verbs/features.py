"""``runphi features``: what runphi supports, as runc's features JSON (4-space indent).

Only hooks runphi really runs are listed (``runphi.hooks.SUPPORTED_HOOKS``);
annotations are the ``org.runphi.*`` keys it understands.
"""

from __future__ import annotations

import sys

import msgspec

from runphi import OCI_SPEC_VERSION, __version__
from runphi.backends.base import LINUX_CMDLINE_ANNOTATION, SHUTDOWN_TIMEOUT_ANNOTATION
from runphi.oci import RUNTIME_ANNOTATION


class Features(msgspec.Struct, rename="camel"):
    """The runtime-spec ``features`` document subset runphi can state truthfully."""

    oci_version_min: str
    oci_version_max: str
    hooks: list[str]
    mount_options: list[str]
    annotations: dict[str, str]


def features(backend: str) -> Features:
    """runphi's features for the configured backend."""
    from runphi.hooks import SUPPORTED_HOOKS

    return Features(
        oci_version_min="1.0.0",
        oci_version_max=OCI_SPEC_VERSION,
        hooks=list(SUPPORTED_HOOKS),
        mount_options=[],
        annotations={
            "org.runphi.version": __version__,
            "org.runphi.backend": backend,
            RUNTIME_ANNOTATION: "runphi|runc: force the ZIC/plain decision",
            SHUTDOWN_TIMEOUT_ANNOTATION: "milliseconds a graceful kill may take before the cell is destroyed",
            LINUX_CMDLINE_ANNOTATION: "kernel command line of a Linux guest",
        },
    )


def run(args, ctx) -> int:
    """Print the features document."""
    document = msgspec.json.format(msgspec.json.encode(features(ctx.config.backend)), indent=4)
    sys.stdout.write(document.decode() + "\n")
    return 0
