"""Container rootfs mounts for the shim: containerd's snapshot mounts onto ``<bundle>/rootfs``.

* :func:`mount_all` / :func:`unmount_all`: what a shim does in ``Create`` and ``Delete``
  (reference/shim-v2.md §4.3 "Who mounts", §10 pitfall 12). containerd sends a list of
  mounts without a target (``overlay`` with ``lowerdir``/``upperdir``/``workdir``, or
  ``bind`` with ``rbind,rw`` for the native snapshotter); they are mounted in order
  onto the bundle's rootfs, the way containerd's ``mount.All`` does, through mount(2)
  and umount2(2) directly.
* :func:`snapshot_view`: at ``shim start`` the rootfs is still empty and containerd has
  not sent the mounts, but choosing runphi or runc needs to know whether the image
  carries a boot description. The view asks containerd (with its own ``ctr``) for the
  container's snapshot and mounts it read-only in a private temporary directory.

Only the shim imports this module; the runc-compatible CLI and its verbs never do.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec

from runphi.errors import MALFORMED_INPUT, RunphiError

__all__ = ["MountError", "MountOptions", "MountSpec", "ctr_binary", "mount_all", "parse_ctr_mounts",
           "parse_mount_options", "read_only_view", "snapshot_view", "unmount_all"]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

#: Option word → (clears the flag?, MS_* flag): containerd's table (mount/mount_linux.go).
FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS), "atime": (True, MS_NOATIME), "bind": (False, MS_BIND),
    "dev": (True, MS_NODEV), "diratime": (True, MS_NODIRATIME), "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC), "mand": (False, MS_MANDLOCK), "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV), "nodiratime": (False, MS_NODIRATIME), "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK), "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME), "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC), "relatime": (False, MS_RELATIME), "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY), "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID), "sync": (False, MS_SYNCHRONOUS),
}
#: Propagation words (runc's table): applied by a mount call of their own, after the mount.
PROPAGATION_OPTIONS: dict[str, int] = {
    "private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC, "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE, "rslave": MS_SLAVE | MS_REC, "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}
#: Words that mean "nothing" (containerd would pass ``defaults`` on as data, which no filesystem takes).
NO_OP_OPTIONS = frozenset({"defaults"})
#: Overlay options that only make sense with a writable upper layer.
UPPER_ONLY_OPTIONS = ("upperdir=", "workdir=", "volatile")
#: How long one ``ctr`` call may take (it gives up connecting after 10 s itself).
CTR_TIMEOUT_S = 30.0
#: Options longer than this are shown cut in error messages (an overlay can name hundreds of layers).
MAX_SHOWN_OPTIONS = 300


class MountError(RunphiError):
    """A mount, an unmount or the snapshot lookup failed; the message is one line."""


class MountSpec(msgspec.Struct, frozen=True):
    """One ``containerd.types.Mount`` as containerd sends it: no target (the rootfs is the target)."""

    type: str
    source: str
    options: list[str] = []


class MountOptions(msgspec.Struct, frozen=True):
    """fstab-style options split for mount(2): MS_* flags, propagation flags, filesystem data."""

    flags: int = 0
    propagation: int = 0
    data: str = ""


def parse_mount_options(options: Sequence[str]) -> MountOptions:
    """Split ``options`` like containerd's Linux mount: flag words become MS_* bits (later words
    win: ``ro,rw`` is read-write), propagation words become the separate propagation flags,
    every other word joins the data string, comma-separated, in order.

    Raises MountError for ``loop``, which needs a loop device this shim does not set up.
    """
    flags = propagation = 0
    data = []
    for option in options:
        if option in FLAG_OPTIONS:
            clear, bit = FLAG_OPTIONS[option]
            flags = flags & ~bit if clear else flags | bit
        elif option in PROPAGATION_OPTIONS:
            propagation |= PROPAGATION_OPTIONS[option]
        elif option == "loop":
            raise MountError("mount option \"loop\" is not supported (no loop device is set up)")
        elif option not in NO_OP_OPTIONS:
            data.append(option)
    return MountOptions(flags=flags, propagation=propagation, data=",".join(data))


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.mount.restype = ctypes.c_int
    libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    libc.umount2.restype = ctypes.c_int
    return libc


def _mount(source: str | None, target: Path, fstype: str | None, flags: int, data: str | None) -> int:
    """mount(2); 0 on success, else the errno."""
    encoded = [None if value is None else os.fsencode(value) for value in (source, str(target), fstype, data)]
    if _libc().mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]) == 0:
        return 0
    return ctypes.get_errno()


def _describe(spec: MountSpec) -> str:
    """``<type> <source> (options ...)`` for messages, long options cut."""
    shown = ",".join(spec.options)
    if len(shown) > MAX_SHOWN_OPTIONS:
        shown = shown[:MAX_SHOWN_OPTIONS] + "..."
    return f"{spec.type} {spec.source} (options {shown or 'none'})"


def mount_all(mounts: Sequence[MountSpec], target: Path) -> None:
    """Mount ``mounts`` in order onto ``target`` (each one stacks on the previous), like
    containerd's ``mount.All``.

    All or nothing: when one fails, the mounts this call made are unmounted again and
    MountError names the failing mount, the target and the reason.
    """
    stacked = 0
    try:
        for spec in mounts:
            stacked += _mount_one(spec, target)
    except BaseException:
        for _ in range(stacked):
            _unmount_top(target)
        raise


def _mount_one(spec: MountSpec, target: Path) -> int:
    """Apply one mount to ``target``; returns how many mounts it stacked there (0 or 1).

    A bind mount made read-only needs a second call (Linux ignores MS_RDONLY on the
    bind itself), and propagation can only be changed by a call of its own. When one
    of those follow-up calls fails, the mount just made is taken down again.
    """
    parsed = parse_mount_options(spec.options)
    flags = parsed.flags
    stacked = 0
    # A remount without data changes only flags (below); with data it must go through mount(2) (moby#34077).
    if not flags & MS_REMOUNT or parsed.data:
        with _short_lowerdirs(spec, parsed.data) as data:
            errno_ = _mount(spec.source, target, spec.type, flags, data or None)
        if errno_:
            raise MountError(f"cannot mount {_describe(spec)} on {target}: {os.strerror(errno_)}")
        stacked = 0 if flags & MS_REMOUNT else 1
    try:
        if parsed.propagation:
            if errno_ := _mount(None, target, None, parsed.propagation | MS_SILENT, None):
                raise MountError(f"cannot change the propagation of {target} after mounting {_describe(spec)}: "
                                 f"{os.strerror(errno_)}")
        if flags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
            if errno_ := _mount(None, target, None, flags | MS_REMOUNT, None):
                raise MountError(f"cannot make the bind mount of {spec.source} on {target} read-only: "
                                 f"{os.strerror(errno_)}")
    except BaseException:
        if stacked:
            _unmount_top(target)
        raise
    return stacked


@contextmanager
def _short_lowerdirs(spec: MountSpec, data: str) -> Iterator[str]:
    """``data``, with an overlay's lowerdirs named through /proc/self/fd when the string would
    not fit the one page mount(2) copies.

    containerd shortens such options by mounting from the layers' common parent
    directory; changing directory is process-wide, so here each layer is opened
    (O_PATH) for the duration of the call instead. Raises MountError when the
    options are too long even so.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    if spec.type != "overlay" or len(data) < page - 512:
        yield data
        return
    words = data.split(",")
    fds: list[int] = []
    try:
        for index, word in enumerate(words):
            if word.startswith("lowerdir="):
                layers = [_open_layer(spec, layer, fds) for layer in word.removeprefix("lowerdir=").split(":")]
                words[index] = "lowerdir=" + ":".join(f"/proc/self/fd/{fd}" for fd in layers)
        short = ",".join(words)
        if len(short) >= page:
            raise MountError(f"cannot mount {_describe(spec)}: its options are longer than a page "
                             f"({len(short)} bytes even with the layers named by descriptor)")
        yield short
    finally:
        for fd in fds:
            os.close(fd)


def _open_layer(spec: MountSpec, layer: str, opened: list[int]) -> int:
    """An O_PATH descriptor of the layer directory, also appended to ``opened`` (closed by the caller)."""
    try:
        fd = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"cannot mount {_describe(spec)}: layer {layer}: {exc.strerror}") from None
    opened.append(fd)
    return fd


def _unmount_top(target: Path) -> bool:
    """Unmount the topmost mount on ``target``; False when nothing is mounted there.

    A busy mount is detached lazily (MNT_DETACH): it leaves the tree now and the
    kernel frees it once its last user is gone. Symlinks at ``target`` are not followed.
    """
    path = os.fsencode(str(target))
    for flags in (UMOUNT_NOFOLLOW, UMOUNT_NOFOLLOW | MNT_DETACH):
        if _libc().umount2(path, flags) == 0:
            return True
        errno_ = ctypes.get_errno()
        if errno_ in (errno.EINVAL, errno.ENOENT):
            return False
        if errno_ != errno.EBUSY:
            break
    raise MountError(f"cannot unmount {target}: {os.strerror(errno_)}")


def unmount_all(target: Path) -> None:
    """Unmount every mount stacked on ``target`` until it is no mount point (or does not exist).

    Idempotent: nothing mounted is success. Busy mounts are detached lazily.
    Raises MountError for any other failure (e.g. EPERM).
    """
    while _unmount_top(target):
        pass


# ---- a read-only view of a container's snapshot, for `shim start` ------------------------------


def read_only_view(mounts: Sequence[MountSpec]) -> list[MountSpec]:
    """Mounts that show the same tree as ``mounts`` read-only, writing nothing anywhere.

    An overlay keeps its layers but loses its upper and work directories: the upper
    becomes the topmost lowerdir (its whiteouts and opaque directories still apply),
    so the kernel creates no work files. A single layer left that way is bind-mounted
    (overlay needs two lowerdirs without an upper). Any other mount gets ``ro``.
    """
    view = []
    for spec in mounts:
        if spec.type != "overlay":
            options = [option for option in spec.options if option not in ("ro", "rw")]
            view.append(MountSpec(spec.type, spec.source, [*options, "ro"]))
            continue
        upper = [option.removeprefix("upperdir=") for option in spec.options if option.startswith("upperdir=")]
        lower = [layer for option in spec.options if option.startswith("lowerdir=")
                 for layer in option.removeprefix("lowerdir=").split(":")]
        layers = upper[-1:] + lower
        if len(layers) == 1:
            view.append(MountSpec("bind", layers[0], ["rbind", "ro"]))
            continue
        kept = [option for option in spec.options
                if option not in ("ro", "rw") and not option.startswith(("lowerdir=", *UPPER_ONLY_OPTIONS))]
        view.append(MountSpec("overlay", spec.source, [*kept, "lowerdir=" + ":".join(layers), "ro"]))
    return view


def ctr_binary(publish_binary: str) -> str:
    """The ``ctr`` that belongs to the containerd running us: next to its executable
    (``-publish-binary``, an absolute path), else the one on PATH, else plain ``ctr``."""
    if os.path.isabs(publish_binary):
        sibling = Path(publish_binary).parent / "ctr"
        if sibling.is_file() and os.access(sibling, os.X_OK):
            return str(sibling)
    return shutil.which("ctr") or "ctr"


class _ContainerInfo(msgspec.Struct):
    """The fields of ``ctr containers info`` that locate the rootfs snapshot."""

    snapshotter: str = msgspec.field(default="", name="Snapshotter")
    snapshot_key: str = msgspec.field(default="", name="SnapshotKey")


def _run_ctr(ctr: str, address: str, namespace: str, *args: str) -> bytes:
    """stdout of ``ctr --address A --namespace NS args...``; MountError when it fails."""
    argv = [ctr, "--address", address, "--namespace", namespace, *args]
    shown = "ctr " + " ".join(args)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=CTR_TIMEOUT_S)
    except OSError as exc:
        raise MountError(f"cannot run {ctr} to ask containerd about the container's snapshot: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"`{shown}` did not finish within {CTR_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        errors = done.stderr.decode(errors="replace").strip().splitlines()
        reason = errors[-1] if errors else f"exit status {done.returncode}"
        raise MountError(f"`{shown}` failed: {reason}")
    return done.stdout


def _container_snapshot(ctr: str, address: str, namespace: str, container_id: str) -> _ContainerInfo:
    """The container record's snapshotter and snapshot key (key "" when it has no snapshot)."""
    output = _run_ctr(ctr, address, namespace, "containers", "info", container_id)
    try:
        return msgspec.json.decode(output, type=_ContainerInfo)
    except MALFORMED_INPUT as exc:
        raise MountError(f"cannot parse `ctr containers info {container_id}` output: {exc}") from None


def parse_ctr_mounts(output: str, target: str) -> list[MountSpec]:
    """The mounts in ``ctr snapshots mounts <target> <key>`` output.

    containerd 1.6 prints one line per mount, ``mount -t <type> <source> <target> -o
    <options joined by commas>``. Knowing ``target`` exactly is what separates the
    source from it, whatever spaces either holds. Raises MountError for any other line
    and for output without a mount.
    """
    mounts = []
    for line in output.splitlines():
        if not line.strip():
            continue
        head, separator, options = line.partition(f" {target} -o ")
        fstype, _, source = head.removeprefix("mount -t ").partition(" ")
        if not separator or not head.startswith("mount -t ") or not fstype or not source:
            raise MountError(f"cannot parse `ctr snapshots mounts` output line {line!r}")
        mounts.append(MountSpec(fstype, source, options.split(",") if options else []))
    if not mounts:
        raise MountError("`ctr snapshots mounts` printed no mount for the container's snapshot")
    return mounts


@contextmanager
def snapshot_view(ctr: str, address: str, namespace: str, container_id: str) -> Iterator[Path | None]:
    """The image rootfs of container ``container_id``, mounted read-only, for the time of the block.

    Asks containerd (through ``ctr``) for the container's snapshot and its mounts, and
    mounts them with :func:`read_only_view` on a new private (0700) temporary directory:
    nothing is written into the snapshot. Yields that directory, or None when the
    container has no snapshot (``ctr run --rootfs``). On leaving the block the view is
    always unmounted and its directory removed. Apply ``find_boot_description`` to it
    exactly as ``create`` does. Raises MountError (one line) when ``ctr`` fails, its
    output cannot be parsed or the mount fails.
    """
    info = _container_snapshot(ctr, address, namespace, container_id)
    if not info.snapshot_key:
        yield None
        return
    mountpoint = Path(tempfile.mkdtemp(prefix="runphi-view-"))
    try:
        snapshotter = ["--snapshotter", info.snapshotter] if info.snapshotter else []
        output = _run_ctr(ctr, address, namespace, "snapshots", *snapshotter, "mounts", str(mountpoint),
                          info.snapshot_key)
        mount_all(read_only_view(parse_ctr_mounts(output.decode(errors="surrogateescape"), str(mountpoint))),
                  mountpoint)
    except BaseException:
        _remove_mountpoint(mountpoint)  # mount_all left nothing mounted
        raise
    try:
        yield mountpoint
    finally:
        unmount_all(mountpoint)  # if this fails, the directory stays: removing a mount point cannot work
        _remove_mountpoint(mountpoint)


def _remove_mountpoint(mountpoint: Path) -> None:
    """rmdir (never a recursive delete: if anything were still mounted, its files would go)."""
    try:
        os.rmdir(mountpoint)
    except OSError as exc:
        raise MountError(f"cannot remove the snapshot view directory {mountpoint}: {exc.strerror}") from None
