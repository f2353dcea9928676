"""The ZIC boot description (``/boot/config.json``) as mkzic writes it.

The schema is runphi's own, :class:`runphi.image.BootDescriptionFile`: the fields,
types and "absent" defaults the runtime reads (see ``../shared/reference/zic-image.md``).
mkzic adds what a writer needs on top: fields the schema does not model
(``accelerators``, the KVM-backend keys, future additions) are carried through
unchanged, and values are checked before anything is written.
"""

from __future__ import annotations

import posixpath

import msgspec

from runphi import image as runphi_image
from runphi.image import DESCRIPTION_PATHS, BootDescriptionFile, VcpuPin, decode_description_file

from .errors import MkzicError

BOOT_DIR = "/boot"
DESCRIPTION_PATH = DESCRIPTION_PATHS[0]
PATH_FIELDS = ("inmate", "kernel", "ramdisk", "initrd", "cpio", "dtb")
PIN_FIELDS = frozenset(VcpuPin.__struct_fields__)

#: The name mkzic's API has always used for the schema (``tools.mkzic.BootDescription``).
BootDescription = BootDescriptionFile


class Description(msgspec.Struct, frozen=True):
    """A boot description plus the top-level fields mkzic passes through untouched."""

    known: BootDescriptionFile
    passthrough: dict[str, msgspec.Raw] = {}


def decode_description(data: bytes, source: str) -> Description:
    """Parse a boot description file; fail with a clear error on malformed input.

    ``source`` names the file in error messages. Unknown top-level fields are
    kept, in file order, in ``passthrough``.
    """
    try:
        known, passthrough = decode_description_file(data)
    except msgspec.ValidationError as exc:
        raise MkzicError(f"boot description {source}: {exc}", "fix the field and run mkzic again") from None
    except msgspec.DecodeError as exc:
        raise MkzicError(f"boot description {source} is not valid JSON: {exc}", "fix the file") from None
    except RecursionError:
        raise MkzicError(f"boot description {source} nests too deeply to be a boot description",
                         "fix the file") from None
    _refuse_unknown_pin_keys(data, source)
    return Description(known=known, passthrough=passthrough)


def _refuse_unknown_pin_keys(data: bytes, source: str) -> None:
    """Refuse ``vcpu_pinning`` entries with keys besides ``vcpu`` and ``pcpu``.

    The runtime ignores such keys, but mkzic could not write them back, and it
    never drops part of a description silently. Call only on bytes that decoded.
    """
    pinning = msgspec.json.decode(data, type=dict[str, msgspec.Raw]).get("vcpu_pinning")
    if pinning is None:
        return
    for index, entry in enumerate(msgspec.json.decode(pinning, type=list[dict[str, msgspec.Raw]])):
        unknown = [key for key in entry if key not in PIN_FIELDS]
        if unknown:  # worded as msgspec words it: the message mkzic gave when it decoded pins strictly
            where = f"$.vcpu_pinning[{index}]"
            raise MkzicError(f"boot description {source}: Object contains unknown field `{unknown[0]}` - at `{where}`",
                             "fix the field and run mkzic again")


def encode_description(description: Description) -> bytes:
    """Serialise a description: the fields it sets in the schema's order, then passthrough fields.

    The output is indented JSON ending in a newline; the same description always
    yields the same bytes.
    """
    known = msgspec.json.decode(msgspec.json.encode(description.known), type=dict[str, msgspec.Raw])
    merged = {**known, **description.passthrough}
    return msgspec.json.format(msgspec.json.encode(merged), indent=2) + b"\n"


def parse_address(value: str | int) -> int:
    """Parse a guest address as descriptions spell it (runphi's rule), or raise :class:`MkzicError`."""
    try:
        return runphi_image.parse_address(value)
    except ValueError:
        raise MkzicError(f"starting_vaddress {value!r} is not an address", "write it like 0x70000000") from None
    except OverflowError:
        raise MkzicError(f"starting_vaddress {value!r} is out of range", "give a 64-bit guest address") from None


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


def named_path(known: BootDescriptionFile, field: str) -> str | None:
    """The image path a path field names; None when it is unset, null or empty (an empty path names no file)."""
    return getattr(known, field) or None


def check_description(known: BootDescriptionFile) -> None:
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
