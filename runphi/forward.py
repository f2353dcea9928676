"""Which runtime owns a container, and handing plain containers to the real runc.

Decision at ``create``/``run`` (DESIGN §7): a Kubernetes pod sandbox (the pause
container, ``io.kubernetes.cri.container-type=sandbox``) always goes to runc — pod
annotations reach every container of the pod, the sandbox included; then the
annotation ``org.runphi.runtime`` wins (``runphi`` → ZIC, ``runc`` → plain); otherwise a bundle is a ZIC when its
rootfs holds a boot description, ``/boot/config.json`` or
``/boot/configuration.json``. Those paths are looked up exactly as ``create``
reads them (``image.find_boot_description``): relative links inside the image
are followed, anything absolute or climbing out of the rootfs is not, so a
rootfs cannot point the test at the host's files. An entry at a description
path that cannot be read as one (such a link, a FIFO, a device) is refused with
one line at ``create``: nothing is forwarded to runc.

Plain containers are ``exec``ed into runc with the original argv, global flags
included: runc inherits our pid, fds 0/1/2, the console socket path and the
parent (the shim), so its exit code and pid-file semantics are runc's own.
Later verbs go to runc whenever runphi has no record for the id.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import msgspec

from runphi.errors import MALFORMED_INPUT, BundleError, ContainerNotFound, RuncNotFound, RunphiError
from runphi.image import find_boot_description
from runphi.oci import RUNTIME_ANNOTATION, State, config_present, load_routing_keys

if TYPE_CHECKING:
    import argparse

    from runphi.context import Context

CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"


def has_boot_description(rootfs: Path) -> bool:
    """Whether the rootfs carries a ZIC boot description, found exactly as ``create`` finds it.

    Raises :class:`BootDescriptionError` when an entry sits at a description path but
    cannot be one (a link leaving the image, a FIFO or device): such an image meant
    to be a ZIC, and handing it to runc would only fail later with an unrelated message.
    """
    return find_boot_description(rootfs) is not None


#: Opens a read-only view of an image's rootfs that is not mounted yet (the shim's
#: ``start`` runs before containerd sends the mounts); yields None when there is no image.
RootfsView = Callable[[], AbstractContextManager[Path | None]]


def is_zic(bundle: Path, unmounted_rootfs: RootfsView | None = None) -> bool:
    """Whether the bundle is a partitioned container (runphi's) rather than runc's.

    ``unmounted_rootfs`` is asked for the image's files when the bundle's rootfs is
    still an empty directory.

    A bundle without config.json counts as plain: runc then reports its own error.
    Raises :class:`BundleError` for a config.json that exists but cannot be
    decided on (not a regular file, too large, not JSON, ``root``/``annotations``
    of the wrong type — runc would fail on those too, less clearly or with a
    panic), for an invalid ``org.runphi.runtime`` value, and for a boot
    description entry that cannot be one (see :func:`has_boot_description`).
    """
    if not config_present(bundle):
        return False  # runc will report the missing config.json itself
    root, annotations = load_routing_keys(bundle)
    if annotations.get(CRI_CONTAINER_TYPE) == "sandbox":
        return False
    wanted = annotations.get(RUNTIME_ANNOTATION)
    if wanted is not None:
        if wanted not in ("runphi", "runc"):
            raise BundleError(f"annotation {RUNTIME_ANNOTATION}={wanted!r} in {bundle}/config.json "
                              "must be \"runphi\" or \"runc\"")
        return wanted == "runphi"
    rootfs = Path(root.path if root else "rootfs")
    if not rootfs.is_absolute():
        rootfs = Path(bundle).absolute() / rootfs
    if unmounted_rootfs is not None and _empty_directory(rootfs):
        with unmounted_rootfs() as view:
            return view is not None and has_boot_description(view)
    return has_boot_description(rootfs)


def _empty_directory(path: Path) -> bool:
    """Whether ``path`` is a directory with nothing in it (a mount point not mounted yet)."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def exec_runc(ctx: Context) -> NoReturn:
    """Replace this process by runc with our original argv; never returns."""
    runc = ctx.config.runc_path()
    if ctx.log.enabled("debug"):
        ctx.log.debug("forwarding to runc", runc=runc, argv=ctx.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(runc, [runc, *ctx.argv])


def forward_unowned(ctx: Context, args: argparse.Namespace) -> int:
    """A verb on an id runphi does not hold: runc's business.

    When no runc is installed the id cannot exist at all; answer as runc would
    (``delete --force`` of an unknown id succeeds, the rest: does not exist).
    """
    try:
        exec_runc(ctx)
    except RuncNotFound:
        if args.verb == "delete" and args.force:
            return 0
        raise ContainerNotFound(args.container_id) from None


def _runc_global_flags(ctx: Context) -> list[str]:
    """The global flags of our argv (everything before the verb), for a runc sub-call."""
    options = ctx.options
    flags = []
    if options.root:
        flags += ["--root", options.root]
    if options.systemd_cgroup:
        flags.append("--systemd-cgroup")
    if options.rootless:
        flags.append(f"--rootless={options.rootless}")
    return flags


def runc_states(ctx: Context, own_ids: set[str]) -> list[State]:
    """``runc list --format json`` under our root, parsed; [] when runc is absent.

    runc's warnings about runphi's own directories are dropped; any other
    stderr text is passed on, and a failing runc is an error.
    """
    import subprocess

    try:
        runc = ctx.config.runc_path()
    except RuncNotFound:
        return []
    result = subprocess.run([runc, *_runc_global_flags(ctx), "list", "--format", "json"],
                            stdin=subprocess.DEVNULL, capture_output=True)
    for line in result.stderr.decode(errors="replace").splitlines():
        foreign = any(line.startswith(f"load container {cid}: ") for cid in own_ids)
        if line.strip() and not foreign:
            sys.stderr.write(line + "\n")
    if result.returncode != 0:
        raise RunphiError(f"`runc list` failed with exit status {result.returncode}")
    try:
        return msgspec.json.decode(result.stdout or b"null", type=list[State] | None) or []
    except MALFORMED_INPUT as exc:
        raise RunphiError(f"cannot parse `runc list --format json` output: {exc}") from None
