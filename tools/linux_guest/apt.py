"""Getting Debian's arm64 packages with the host's own apt, without installing them.

The packages are only downloaded (``apt-get download``) and read with ``dpkg-deb``;
nothing is unpacked onto the host. Adding the ``arm64`` foreign architecture is the
one change made to the host's apt configuration, and only when it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tools.linux_guest.errors import LinuxGuestError

ARCH = "arm64"
_TOOLS = ("apt-get", "apt-cache", "dpkg", "dpkg-deb")


def _run(argv: list[str], what: str, fix: str, cwd: Path | None = None) -> str:
    """Run ``argv``; its stdout, or a :class:`LinuxGuestError` quoting the last stderr line."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})
    except OSError as exc:
        raise LinuxGuestError(f"{what}: {exc.strerror}", fix) from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        reason = errors[-1] if errors else f"{argv[0]} exited {done.returncode}"
        raise LinuxGuestError(f"{what}: {reason}", fix)
    return done.stdout


def require_apt() -> None:
    """Refuse early, with the fix, on a host without Debian's package tools."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        raise LinuxGuestError(f"{', '.join(missing)} not found",
                              "this helper needs a Debian-based host (apt and dpkg)")


def ensure_architecture() -> bool:
    """Make sure apt knows ``arm64`` packages; True when the architecture had to be added."""
    native = _run(["dpkg", "--print-architecture"], "reading the dpkg architecture",
                  "check the dpkg installation").strip()
    foreign = _run(["dpkg", "--print-foreign-architectures"], "reading the dpkg architectures",
                   "check the dpkg installation").split()
    if native == ARCH or ARCH in foreign:
        return False
    if os.geteuid() != 0:
        raise LinuxGuestError(f"apt does not know {ARCH} packages yet",
                              f"run as root, or once: dpkg --add-architecture {ARCH} && apt-get update")
    _run(["dpkg", "--add-architecture", ARCH], f"adding the {ARCH} architecture to dpkg",
         "check /var/lib/dpkg is writable")
    return True


def update() -> None:
    """``apt-get update`` (needed after adding the architecture, or when lists are stale)."""
    _run(["apt-get", "update", "-qq"], "apt-get update failed",
         "check the network and /etc/apt/sources.list; run apt-get update by hand to see more")


def candidate(package: str) -> tuple[str, str] | None:
    """The (version, Depends) apt would download for ``package:arm64``, or None if unknown."""
    try:
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", f"{package}:{ARCH}"],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except OSError:
        return None
    fields = dict(re.findall(r"^(Version|Depends): (.*)$", out, flags=re.MULTILINE))
    if "Version" not in fields:
        return None
    return fields["Version"], fields.get("Depends", "")


def kernel_image_of(meta_package: str, depends: str) -> str:
    """The versioned image package a metapackage such as ``linux-image-arm64`` points at."""
    match = re.search(r"(linux-image-[0-9][^\s,(]*)", depends)
    if match is None:
        raise LinuxGuestError(f"{meta_package} does not depend on a linux-image-<version> package",
                              "name a versioned kernel image package with --kernel-package")
    return match.group(1)


def deb_file_name(package: str, version: str) -> str:
    """The file name ``apt-get download`` gives ``package:arm64=version`` (an epoch's ``:`` quoted)."""
    return f"{package}_{version.replace(':', '%3a')}_{ARCH}.deb"


def download(package: str, version: str, dest: Path) -> Path:
    """Download ``package:arm64=version`` into ``dest`` (a directory); the .deb's path."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        # Root downloads into a private temp dir that the _apt sandbox user cannot enter.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _run(["apt-get", *sandbox, "download", "-qq", f"{package}:{ARCH}={version}"],
             f"downloading {package} {version}",
             "check the network; run apt-get update if the version is gone", cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise LinuxGuestError(f"apt-get download of {package} produced {len(debs)} files",
                                  "run apt-get download by hand to see what happened")
        final = dest / debs[0].name
        os.replace(debs[0], final)
    return final


def read_members(deb: Path, required: dict[str, Path], optional: dict[str, Path]) -> set[str]:
    """Write the members of ``deb``'s filesystem named in ``required``/``optional``
    (``./path`` → destination file); the names of the optional ones that were present.

    Reads the data tarball as a stream from ``dpkg-deb --fsys-tarfile``; a missing
    required member is an error.
    """
    wanted = {**optional, **required}
    found: set[str] = set()
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.name in wanted and member.isfile():
                        source = tar.extractfile(member)
                        assert source is not None
                        wanted[member.name].write_bytes(source.read())
                        found.add(member.name)
        except tarfile.TarError as exc:
            raise LinuxGuestError(f"{deb.name} is not a readable package ({exc})",
                                  "fetch again with --refresh") from None
        proc.stdout.read()
        stderr = proc.stderr.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise LinuxGuestError(f"dpkg-deb cannot read {deb.name}: {stderr}",
                              "fetch again with --refresh")
    missing = sorted(set(required) - found)
    if missing:
        raise LinuxGuestError(f"{deb.name} lacks {', '.join(missing)}",
                              "choose a kernel package that ships these files (--kernel-package)")
    return found & set(optional)
