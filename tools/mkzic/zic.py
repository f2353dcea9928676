"""A ZIC's contents: the boot description and the image files it names.

:func:`assemble` is the one place that decides where each input file lands in
the image and checks that the description and the files agree; the bundle and
archive writers only serialise an already valid :class:`ZicContents`.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import msgspec

from runphi.image import DEFAULT_INMATE, BootDescriptionFile

from .boot import (
    BOOT_DIR,
    DESCRIPTION_PATH,
    PATH_FIELDS,
    Description,
    check_description,
    check_image_path,
    encode_description,
    named_path,
)
from .errors import MkzicError

# Which description field a guest file supplied on its own is recorded in.
GUEST_FILE_FIELDS = ("inmate", "kernel", "dtb", "initrd")
INITRD_SYNONYMS = ("initrd", "ramdisk", "cpio")


class ZicContents(msgspec.Struct, frozen=True):
    """Everything that goes into a ZIC's rootfs, validated.

    ``files`` maps image paths (``/boot/...``, sorted, including
    ``/boot/config.json``) to their bytes; ``process_args`` is the command an
    OCI config must name although nothing ever runs it (the inmate's path).
    """

    description: Description
    files: dict[str, bytes]
    process_args: list[str]


def _read_host_file(field: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MkzicError(f"cannot read the {field} file {path}: {exc.strerror}", "check the path") from None


def _path_given_for(description: BootDescriptionFile, field: str) -> str | None:
    """The image path the description already gives a ``field`` file, if any.

    An initramfs may be named by any of ``initrd``, ``ramdisk`` or ``cpio``
    (synonyms in runPHI descriptions); the first one present wins.
    """
    for name in INITRD_SYNONYMS if field == "initrd" else (field,):
        path = named_path(description, name)
        if path is not None:
            return path
    return None


def _place_files(known: BootDescriptionFile,
                 guest_files: dict[str, Path]) -> tuple[BootDescriptionFile, dict[str, bytes]]:
    """Read each guest file and put it at its image path, filling in the fields that were absent."""
    files: dict[str, bytes] = {}
    owner: dict[str, str] = {}
    for field in GUEST_FILE_FIELDS:
        host_path = guest_files.get(field)
        if host_path is None:
            continue
        image_path = _path_given_for(known, field)
        if image_path is None:
            image_path = check_image_path(field, posixpath.join(BOOT_DIR, host_path.name))
            known = msgspec.structs.replace(known, **{field: image_path})
        if image_path in files:
            raise MkzicError(
                f"the {field} file and the {owner[image_path]} file would both be {image_path}",
                "rename one of them or name distinct paths in the boot description",
            )
        files[image_path] = _read_host_file(field, host_path)
        owner[image_path] = field
    return known, files


def _check_files_present(known: BootDescriptionFile, files: dict[str, bytes]) -> None:
    """Every path the description names, and the inmate, must be a supplied file."""
    if named_path(known, "inmate") is None and DEFAULT_INMATE not in files:
        raise MkzicError("no inmate image given", "pass --inmate FILE (the raw guest binary or Linux Image)")
    for field in PATH_FIELDS:
        image_path = named_path(known, field)
        if image_path is not None and image_path not in files:
            flag = "initrd" if field in INITRD_SYNONYMS else field
            raise MkzicError(
                f"the boot description names {field} = {image_path} but no such file was given",
                f"pass --{flag} FILE for it or drop the field",
            )


def assemble(description: Description, guest_files: dict[str, Path]) -> ZicContents:
    """Combine a description with host files keyed by field (``inmate``, ``kernel``, ``dtb``, ``initrd``).

    Each file is placed at the image path its field already names, else at
    ``/boot/<file name>`` and the field is set to that path. Guarantees on
    success: every path field of the result names a file in ``files``, the
    inmate (default ``/boot/boot.bin``) is present, and no two inputs share a
    path. Raises :class:`MkzicError` otherwise.
    """
    check_description(description.known)
    known, files = _place_files(description.known, guest_files)
    _check_files_present(known, files)
    final = Description(known=known, passthrough=description.passthrough)
    files[DESCRIPTION_PATH] = encode_description(final)
    inmate = named_path(known, "inmate") or DEFAULT_INMATE
    return ZicContents(description=final, files=dict(sorted(files.items())), process_args=[inmate])
