"""``runphi cell-config`` output: a cell configuration rendered as text, C or binary,
and any `.cell` file decoded (its profile detected).

The preview of a bundle is planned by the backend itself
(:meth:`JailhouseBackend.cell_config_preview`), exactly as ``launch`` plans.
"""

from __future__ import annotations

from pathlib import Path

from runphi.backends.jailhouse.cellconfig import CellConfig, FormatProfile, get_profile, read_cell, write_cell
from runphi.backends.jailhouse.errors import CellConfigError
from runphi.errors import BundleError


def decode_file(path: Path, fmt: str, profile_name: str | None = None) -> bytes:
    """The `.cell` at ``path`` rendered as ``fmt``: read as ``profile_name``, else its profile detected."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read cell configuration {path}: {exc.strerror}") from None
    try:
        profile, config = read_cell(data, get_profile(profile_name) if profile_name else None)
    except CellConfigError as exc:
        raise CellConfigError(f"{path}: {exc}") from None
    return render(config, profile, fmt, len(data))


def render(config: CellConfig, profile: FormatProfile, fmt: str, size: int | None) -> bytes:
    """``config`` as text, C source or the binary `.cell`."""
    from runphi.backends.jailhouse.cellrender import cell_to_c, describe_cell

    if fmt == "binary":
        return write_cell(config, profile)
    if fmt == "c":
        return cell_to_c(config, profile).encode()
    return describe_cell(config, profile, size).encode()
