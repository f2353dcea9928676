"""The ZIC boot description (``/boot/config.json``) as mkzic writes it.

Field names, types and meaning follow the description runPHI images already
carry (see ``../shared/reference/zic-image.md``): every field is optional, and
fields mkzic does not model (``accelerators``, the KVM-backend keys, future
additions) are carried through unchanged so an existing description survives a
rebuild byte-for-byte in meaning.
"""

from __future__ import annotations

import posixpath

import msgspec

from .errors import MkzicError

BOOT_DIR = "/boot"
DESCRIPTION_PATH = "/boot/config.json"
DEFAULT_INMATE = "/boot/boot.bin"


class VcpuPin(msgspec.Struct, forbid_unknown_fields=True):
    """One ``vcpu_pinning`` entry: guest CPU ``vcpu`` runs on physical CPU ``pcpu``."""

    vcpu: int
    pcpu: int


class BootDescription(msgspec.Struct, omit_defaults=True):
    """The fields of ``/boot/config.json`` that mkzic reads, validates or sets.

    ``None`` means "absent"; absent fields are not written, so the runtime
    applies its own defaults exactly as it would for a hand-written file.
    """

    os_var: str | None = None
    inmate: str | None = None
    starting_vaddress: str | int | None = None
    kernel: str | None = None
    ramdisk: str | None = None
    initrd: str | None = None
    cpio: str | None = None
    dtb: str | None = None
    memory: int | None = None
    vcpus: int | None = None
    vcpu_pinning: list[VcpuPin] | None = None
    net: str | bool | None = None
    netconf: str | None = None
    rpu_req: bool | None = None


MODELLED_FIELDS = frozenset(BootDescription.__struct_fields__)
PATH_FIELDS = ("inmate", "kernel", "ramdisk", "initrd", "cpio", "dtb")


class Description(msgspec.Struct, frozen=True):
    """A boot description plus the fields mkzic passes through untouched."""

    known: BootDescription
    passthrough: dict[str, msgspec.Raw] = {}


def decode_description(data: bytes, source: str) -> Description:
    """Parse a boot description file; fail with a clear error on malformed input.

    ``source`` names the file in error messages. Unknown top-level fields are
    kept, in file order, in ``passthrough``.
    """
    try:
        known = msgspec.json.decode(data, type=BootDescription)
        everything = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    except msgspec.ValidationError as exc:
        raise MkzicError(f"boot description {source}: {exc}", "fix the field and run mkzic again") from None
    except msgspec.DecodeError as exc:
        raise MkzicError(f"boot description {source} is not valid JSON: {exc}", "fix the file") from None
    passthrough = {k: v for k, v in everything.items() if k not in MODELLED_FIELDS}
    return Description(known=known, passthrough=passthrough)


def encode_description(description: Description) -> bytes:
    """Serialise a description: modelled fields in a fixed order, then passthrough fields.

    The output is indented JSON ending in a newline; the same description always
    yields the same bytes.
    """
    known = msgspec.json.decode(msgspec.json.encode(description.known), type=dict[str, msgspec.Raw])
    merged = {**known, **description.passthrough}
    return msgspec.json.format(msgspec.json.encode(merged), indent=2) + b"\n"


def parse_address(value: str | int) -> int:
    """Parse a guest address as descriptions spell it: ``"0x70000000"`` (usual), a decimal string or a number."""
    try:
        address = value if isinstance(value, int) else int(value, 0)
    except ValueError:
        raise MkzicError(f"starting_vaddress {value!r} is not an address", "write it like 0x70000000") from None
    if not 0 <= address < 1 << 64:
        raise MkzicError(f"starting_vaddress {value!r} is out of range", "give a 64-bit guest address")
    return address


def format_address(value: int) -> str:
    """Spell a guest address the way runPHI descriptions do (``0x70000000``)."""
    return f"0x{value:x}"


def check_image_path(field: str, path: str) -> str:
    """Return ``path`` if it is a normalised absolute path under ``/boot/``; else raise.

    Paths in a boot description are paths inside the image, never on the board.
    """
    if path == DESCRIPTION_PATH:
        raise MkzicError(
            f"boot description field {field} = {path!r} is the boot description itself",
            "rename that guest file or name another path for it",
        )
    normal = posixpath.normpath(path)
    if not path.startswith("/") or normal != path or not normal.startswith(BOOT_DIR + "/"):
        raise MkzicError(
            f"boot description field {field} = {path!r} is not a file path under {BOOT_DIR}/",
            "use an image path such as /boot/Image",
        )
    return path


def named_path(known: BootDescription, field: str) -> str | None:
    """The image path a path field names; an empty string counts as absent, as runphi reads it."""
    return getattr(known, field) or None


def check_description(known: BootDescription) -> None:
    """Validate the values of the modelled fields (not whether their files exist)."""
    for field in PATH_FIELDS:
        value = named_path(known, field)
        if value is not None:
            check_image_path(field, value)
    if known.starting_vaddress is not None:
        parse_address(known.starting_vaddress)
    for field in ("memory", "vcpus"):
        value = getattr(known, field)
        if value is not None and value <= 0:
            raise MkzicError(f"boot description field {field} = {value} must be positive", "give a size of at least 1")
    if known.vcpu_pinning:
        for pin in known.vcpu_pinning:
            if pin.vcpu < 0 or pin.pcpu < 0:
                raise MkzicError(f"vcpu_pinning entry {pin.vcpu}:{pin.pcpu} is negative", "use CPU numbers from 0")
