"""The ZIC's boot description (`/boot/config.json`) read safely from the container rootfs.

runPHI images carry it unchanged: every field is optional, unknown keys are kept and
ignored, types are those found in the wild (hex strings for addresses, `net` as a
string or a bool). Every path it names is a path inside the image: `..` components,
absolute symlinks and symlinks leading outside the rootfs are refused.

BootDescriptionFile is the file's one schema: runphi decodes it here, mkzic encodes it.

Lean: imported by `create`; msgspec and the stdlib only.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from runphi.errors import MALFORMED_INPUT, BundleError
from runphi.files import FileTooLarge, NotRegularFile, read_regular_file

DESCRIPTION_PATHS = ("/boot/config.json", "/boot/configuration.json")
DEFAULT_INMATE = "/boot/boot.bin"
MAX_SYMLINKS = 40
NO_NET = ("", "no", "none", "false", "off")
#: A boot description is a few hundred bytes; anything bigger than this is refused unread.
MAX_DESCRIPTION_SIZE = 1 << 20
#: Sanity bounds on what an image may ask for (the allocator then checks the board).
MAX_MEMORY_MIB = 1 << 20
MAX_VCPUS = 4096

OS_LINUX = "linux"

T = TypeVar("T")


class DebugLog(Protocol):
    """Where ignored keys are reported (runphi.log.VerbLog fits)."""

    def debug(self, msg: str, **context: Any) -> None: ...


class BootDescriptionError(BundleError):
    """The boot description is unreadable, malformed or names a path outside the image."""


class VcpuPin(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One `vcpu_pinning` entry: virtual CPU `vcpu` runs on physical CPU `pcpu` (other keys ignored)."""

    vcpu: int
    pcpu: int


class BootDescriptionFile(msgspec.Struct, frozen=True, omit_defaults=True):
    """`/boot/config.json` as images carry it: the one schema runphi reads and mkzic writes.

    A field at its default was absent from the file, and encoding leaves it out again:
    UNSET for fields runPHI types as non-null (a null there is refused), None for those
    that may be null. What an absent field means (`inmate` = /boot/boot.bin, ...) is
    applied when resolving into a BootDescription, never stored here. Field order is
    the order fields are written.
    """

    os_var: str | UnsetType = UNSET
    inmate: str | UnsetType = UNSET
    starting_vaddress: str | int | None = None
    kernel: str | None = None
    ramdisk: str | None = None
    initrd: str | None = None
    cpio: str | None = None
    dtb: str | None = None
    memory: int | None = None
    vcpus: int | None = None
    vcpu_pinning: list[VcpuPin] | UnsetType = UNSET
    net: str | bool | None = None
    netconf: str | UnsetType = UNSET
    rpu_req: bool | UnsetType = UNSET
    #: runphi's: which console the ZIC streams ("uart", "hypervisor", "none"; absent: the
    #: platform's default).
    console: str | UnsetType = UNSET


class BootDescription(msgspec.Struct, frozen=True, kw_only=True):
    """The typed boot description; paths are absolute host paths inside the rootfs."""

    source: Path
    os_var: str = ""
    inmate: Path
    starting_vaddress: int | None = None
    kernel: Path | None = None
    dtb: Path | None = None
    initrd: Path | None = None
    net: bool = False
    netconf: str = ""
    rpu_req: bool = False
    #: "uart", "hypervisor" (the Jailhouse debug console), "none", or "" (the platform's default).
    console: str = ""
    memory_mib: int | None = None
    vcpus: int | None = None
    pinned_cpus: frozenset[int] | None = None
    #: `vcpu_pinning` as (vcpu, pcpu) pairs in file order (empty without one).
    vcpu_pins: tuple[tuple[int, int], ...] = ()
    ignored_keys: tuple[str, ...] = ()

    @property
    def is_linux(self) -> bool:
        return self.os_var.lower() == OS_LINUX


_KNOWN_KEYS = frozenset(BootDescriptionFile.__struct_fields__)
#: The values of the boot description's ``console`` ("" = absent: the platform decides).
CONSOLES = ("", "uart", "hypervisor", "none")
_IGNORED_QUIETLY = frozenset({"accelerators"})
_file_decoder = msgspec.json.Decoder(BootDescriptionFile)
_keys_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


def decode_description_file(data: bytes) -> tuple[BootDescriptionFile, dict[str, msgspec.Raw]]:
    """The modelled fields of description bytes, and the keys it does not model (raw, in file order).

    Raises one of MALFORMED_INPUT when `data` is not a JSON object or a modelled field
    has the wrong type; the caller words the error.
    """
    fields = _file_decoder.decode(data)
    keys = _keys_decoder.decode(data)
    return fields, {key: value for key, value in keys.items() if key not in _KNOWN_KEYS}


def _given(value: T | UnsetType, absent: T) -> T:
    """The file's `value`, or what runPHI reads the field as when the file leaves it out."""
    return absent if value is UNSET else value


def resolve_in_rootfs(rootfs: Path, path: str, what: str) -> Path:
    """Host path of `path` (a path inside the image) without ever leaving `rootfs`.

    Symlinks are followed component by component: relative links that stay inside
    are fine, absolute links and links climbing out are refused, as is any `..`
    in `path` itself. The result need not exist.
    """
    if "\0" in path:
        raise BootDescriptionError(f"{what} {path!r} contains a NUL byte")
    if ".." in PurePosixPath(path).parts:
        raise BootDescriptionError(f"{what} {path!r} contains '..': paths in the boot description must stay inside the image")
    root = Path(os.path.abspath(rootfs))
    pending = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not done:
                raise BootDescriptionError(f"{what} {path!r} resolves outside the image (a symlink climbs above its root)")
            done.pop()
            continue
        candidate = root.joinpath(*done, part)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except FileNotFoundError:
            is_link = False
        except OSError as exc:
            raise BootDescriptionError(f"{what} {path!r}: cannot inspect {candidate}: {exc.strerror}") from None
        if not is_link:
            done.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise BootDescriptionError(f"{what} {path!r}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            raise BootDescriptionError(
                f"{what} {path!r}: {'/' + '/'.join([*done, part])} is an absolute symlink to {target!r}; "
                "use a relative link inside the image"
            )
        pending = [p for p in PurePosixPath(target).parts if p != "."] + pending
    return root.joinpath(*done)


def find_boot_description(rootfs: Path) -> Path | None:
    """Host path of the image's boot description (`config.json` preferred), None if it has none.

    An image "has" a description when a directory entry of any kind sits at one of
    DESCRIPTION_PATHS (its parent directories resolved inside the image). Such an
    entry that cannot serve as one — a symlink leaving the image or leading nowhere,
    a FIFO, device or directory — raises BootDescriptionError: the image meant to be
    a ZIC, so it is refused with the reason instead of being taken for a plain image.
    """
    for candidate in DESCRIPTION_PATHS:
        if not _has_entry(rootfs, candidate):
            continue
        host = resolve_in_rootfs(rootfs, candidate, "boot description")
        _require_regular_file(host, candidate)
        return host
    return None


def _has_entry(rootfs: Path, path: str) -> bool:
    """Whether the image holds a directory entry (of any type, links not followed) at `path`.

    Parents that cannot be resolved inside the image (a `/boot` linking out) hide
    the entry: what is not inside the image is not part of it.
    """
    image_path = PurePosixPath(path)
    try:
        directory = resolve_in_rootfs(rootfs, str(image_path.parent), "boot description")
    except BootDescriptionError:
        return False
    return os.path.lexists(directory / image_path.name)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _require_regular_file(host: Path, path: str) -> None:
    """Refuse a description path that resolved to anything but a regular file."""
    try:
        mode = os.stat(host).st_mode
    except FileNotFoundError:
        raise BootDescriptionError(f"boot description {path} in the image is a symlink to a file "
                                   "that is not in the image; put the JSON file there") from None
    except OSError as exc:
        raise BootDescriptionError(f"boot description {path} in the image: cannot inspect it: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise BootDescriptionError(f"boot description {path} in the image is {kind}, not a regular file; "
                                   "a ZIC image needs its JSON file there")


def _image_file(rootfs: Path, value: str | None, what: str, source: str, required: bool = True) -> Path | None:
    """Resolve a path field; when `required`, it must name an existing regular file."""
    if value is None or value == "":
        return None
    host = resolve_in_rootfs(rootfs, value, f"{what} in {source}")
    if required and not host.is_file():
        raise BootDescriptionError(f"{what} {value!r} named by {source} is not a file in the image")
    return host


def parse_address(value: str | int) -> int:
    """A guest address as descriptions spell it: `"0x70000000"` (usual), a decimal string or a number.

    Raises ValueError when `value` is not a number, OverflowError when it does not fit 64 bits
    unsigned; callers word the error.
    """
    address = value if isinstance(value, int) else int(value, 0)
    if not 0 <= address < 1 << 64:
        raise OverflowError(f"address {value!r} is outside 0..2**64-1")
    return address


def _address(value: str | int | None, source: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return parse_address(value)
    except ValueError:
        raise BootDescriptionError(
            f"starting_vaddress {value!r} in {source} is not a number (write e.g. \"0x70000000\")"
        ) from None
    except OverflowError:
        raise BootDescriptionError(f"starting_vaddress {value!r} in {source} is out of range") from None


def _net(value: str | bool | None) -> bool:
    if value is None or value is False:
        return False
    if value is True:
        return True
    return value.strip().lower() not in NO_NET


def parse_boot_description(data: bytes, rootfs: Path, source: Path, log: DebugLog | None = None) -> BootDescription:
    """Decode description bytes (read from `source`) and resolve its paths inside `rootfs`."""
    where = "/" + source.relative_to(Path(os.path.abspath(rootfs))).as_posix()
    try:
        raw, unknown = decode_description_file(data)
    except MALFORMED_INPUT as exc:
        raise BootDescriptionError(f"boot description {where} in the image is invalid: {exc}") from None
    ignored = tuple(sorted(unknown))
    noisy = [k for k in ignored if k not in _IGNORED_QUIETLY]
    if noisy and log is not None:
        log.debug("boot description: ignoring keys runphi does not use", file=where, keys=",".join(noisy))
    for name, value, limit in (("memory", raw.memory, MAX_MEMORY_MIB), ("vcpus", raw.vcpus, MAX_VCPUS)):
        if value is not None and not 0 < value <= limit:
            raise BootDescriptionError(f"{name} = {value} in {where} must be a positive number "
                                       f"no greater than {limit}")
    console = _given(raw.console, "")
    if console not in CONSOLES:
        raise BootDescriptionError(f"console = {console!r} in {where} must be one of "
                                   f"{', '.join(repr(c) for c in CONSOLES if c)}")
    os_var = _given(raw.os_var, "")
    linux = os_var.lower() == OS_LINUX
    inmate_field = _given(raw.inmate, DEFAULT_INMATE)
    kernel_field = raw.kernel if raw.kernel else (inmate_field if linux else None)
    inmate = raw.kernel if (linux and raw.kernel) else inmate_field
    initrd = raw.initrd or raw.ramdisk or raw.cpio
    pinning = _given(raw.vcpu_pinning, [])
    pins = frozenset(p.pcpu for p in pinning) if pinning else None
    if pins is not None and any(not 0 <= p < MAX_VCPUS for p in pins):
        raise BootDescriptionError(f"vcpu_pinning in {where} names a pcpu outside 0..{MAX_VCPUS - 1}")
    return BootDescription(
        source=source,
        os_var=os_var,
        inmate=_image_file(rootfs, inmate, "inmate", where),  # type: ignore[arg-type]
        starting_vaddress=_address(raw.starting_vaddress, where),
        kernel=_image_file(rootfs, kernel_field, "kernel", where),
        dtb=_image_file(rootfs, raw.dtb, "dtb", where),
        initrd=_image_file(rootfs, initrd, "initrd", where),
        net=_net(raw.net),
        netconf=_given(raw.netconf, ""),
        rpu_req=_given(raw.rpu_req, False),
        console=console,
        memory_mib=raw.memory,
        vcpus=raw.vcpus,
        pinned_cpus=pins,
        vcpu_pins=tuple((p.vcpu, p.pcpu) for p in pinning),
        ignored_keys=ignored,
    )


def load_boot_description(rootfs: Path, log: DebugLog | None = None) -> BootDescription:
    """Read the image's `/boot/config.json` (or `/boot/configuration.json`) safely.

    Raises BootDescriptionError when it is absent, unreadable, malformed, or names a
    file that is missing or outside the image.
    """
    source = find_boot_description(rootfs)
    if source is None:
        for candidate in DESCRIPTION_PATHS:  # a parent leading out of the image says more than "none"
            resolve_in_rootfs(rootfs, str(PurePosixPath(candidate).parent), "boot description directory")
        raise BootDescriptionError(
            f"no boot description in the image ({' or '.join(DESCRIPTION_PATHS)} under {rootfs}); "
            "a ZIC image needs one"
        )
    return parse_boot_description(_read_description(source), rootfs, source, log)


def _read_description(source: Path) -> bytes:
    """The description's bytes: a regular file, not a symlink (checked on the open fd), of bounded size."""
    try:
        return read_regular_file(source, MAX_DESCRIPTION_SIZE, follow_symlinks=False)
    except NotRegularFile:
        raise BootDescriptionError(f"cannot read boot description {source}: not a regular file") from None
    except FileTooLarge as exc:
        raise BootDescriptionError(f"boot description {source} is too large ({exc})") from None
    except OSError as exc:
        reason = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise BootDescriptionError(f"cannot read boot description {source}: {reason}") from None
