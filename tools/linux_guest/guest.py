"""The cache of the Linux guest: Debian's arm64 kernel and busybox, and the built initramfs.

Layout of ``<cache>/linux-guest/``::

    debs/*.deb          the downloaded packages (never installed)
    fetched.json        what was fetched (:class:`Fetched`)
    vmlinuz-<release>   the kernel image
    busybox             busybox-static for arm64
    modules/*.ko        the kernel's power-key and network modules, when it has them as modules
    initrd.cpio.gz      the built initramfs
    guest.json          the result of ``build`` (:class:`LinuxGuest`)

Everything is written to a temporary name and renamed into place, under an exclusive
``flock`` of ``.lock``, so concurrent runs and interrupted ones never see half a file.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import msgspec

from tools.linux_guest import apt
from tools.linux_guest.errors import LinuxGuestError
from tools.linux_guest.initramfs import NET_MODULES, POWER_KEY_MODULES, build_initramfs

DEFAULT_KERNEL_PACKAGE = "linux-image-arm64"
BUSYBOX_PACKAGE = "busybox-static"
#: The modules the guest's init loads, by file name → path under ``/lib/modules/<release>/``.
#: Each is optional: a kernel that builds it in ships no file (Debian's arm64 kernel builds
#: ``virtio`` and ``virtio_ring`` in, these as modules).
KERNEL_MODULES = {
    "evdev.ko": "kernel/drivers/input/evdev.ko",
    "gpio_keys.ko": "kernel/drivers/input/keyboard/gpio_keys.ko",
    "virtio_mmio.ko": "kernel/drivers/virtio/virtio_mmio.ko",
    "failover.ko": "kernel/net/core/failover.ko",
    "net_failover.ko": "kernel/drivers/net/net_failover.ko",
    "virtio_net.ko": "kernel/drivers/net/virtio_net.ko",
}
assert list(KERNEL_MODULES) == [f"{name}.ko" for name in (*POWER_KEY_MODULES, *NET_MODULES)]


class Fetched(msgspec.Struct, frozen=True):
    """``fetched.json``: the packages behind the cached files (names relative to the cache)."""

    kernel_request: str
    kernel_package: str
    kernel_version: str
    kernel_release: str
    busybox_version: str
    kernel: str
    busybox: str
    modules: list[str] = []
    #: The module file names the fetch looked for (:data:`KERNEL_MODULES`); a cache that
    #: looked for others is extracted again from its packages.
    wanted_modules: list[str] = []


class LinuxGuest(msgspec.Struct, frozen=True):
    """``guest.json``: a bootable guest, absolute paths."""

    kernel: str
    initrd: str
    kernel_release: str
    kernel_package: str
    kernel_version: str
    busybox_version: str


def default_cache_dir() -> Path:
    """``$RUNPHI_CACHE``, else ``$XDG_CACHE_HOME/runphi``, else ``~/.cache/runphi``."""
    if os.environ.get("RUNPHI_CACHE"):
        return Path(os.environ["RUNPHI_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "runphi"


def guest_dir(cache: Path) -> Path:
    """Where the Linux guest lives inside a runphi cache directory."""
    return cache / "linux-guest"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LinuxGuestError(f"cannot use the cache {directory}: {exc.strerror}",
                              "pass a writable --cache DIR or set RUNPHI_CACHE") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _load(path: Path, kind: type[msgspec.Struct]):
    try:
        return msgspec.json.decode(path.read_bytes(), type=kind)
    except (OSError, msgspec.DecodeError):
        return None


def _cached_fetch(directory: Path, kernel_request: str) -> Fetched | None:
    fetched = _load(directory / "fetched.json", Fetched)
    if fetched is None or fetched.kernel_request != kernel_request:
        return None
    if fetched.wanted_modules != list(KERNEL_MODULES):
        fetched = _extract_again(directory, fetched)
        if fetched is None:
            return None
    files = [fetched.kernel, fetched.busybox, *fetched.modules]
    return fetched if all((directory / name).is_file() for name in files) else None


def _extract_again(directory: Path, fetched: Fetched) -> Fetched | None:
    """A cache from before :data:`KERNEL_MODULES` changed, brought up to date from the
    packages kept in ``debs/`` (no download); None when they are gone."""
    debs = directory / "debs"
    kernel_deb = debs / apt.deb_file_name(fetched.kernel_package, fetched.kernel_version)
    busybox_deb = debs / apt.deb_file_name(BUSYBOX_PACKAGE, fetched.busybox_version)
    if not (kernel_deb.is_file() and busybox_deb.is_file()):
        return None
    modules = _extract(directory, kernel_deb, busybox_deb, fetched.kernel_release)
    updated = msgspec.structs.replace(fetched, modules=modules, wanted_modules=list(KERNEL_MODULES))
    _write_atomic(directory / "fetched.json", msgspec.json.format(msgspec.json.encode(updated)))
    return updated


def _resolve(package: str) -> tuple[str, str]:
    """(version, Depends) of ``package:arm64``, updating apt's lists once if it is unknown."""
    found = apt.candidate(package)
    if found is None:
        apt.update()
        found = apt.candidate(package)
    if found is None:
        raise LinuxGuestError(f"no {package}:{apt.ARCH} package in the apt sources",
                              "check /etc/apt/sources.list (Debian main) and the package name")
    return found


def _release_of(image_package: str) -> str:
    """``linux-image-6.1.0-56-arm64`` (or ``...-unsigned``) → ``6.1.0-56-arm64``."""
    return image_package.removeprefix("linux-image-").removesuffix("-unsigned")


class _Packages(msgspec.Struct, frozen=True):
    """The exact package versions one fetch downloads."""

    image_package: str
    image_version: str
    busybox_version: str


def _resolve_packages(kernel_request: str) -> _Packages:
    """Versions apt would download now; a metapackage is followed to its versioned image."""
    request_version, depends = _resolve(kernel_request)
    if kernel_request.startswith("linux-image-") and kernel_request[len("linux-image-"):][:1].isdigit():
        image_package, image_version = kernel_request, request_version
    else:
        image_package = apt.kernel_image_of(kernel_request, depends)
        image_version = _resolve(image_package)[0]
    return _Packages(image_package, image_version, _resolve(BUSYBOX_PACKAGE)[0])


def _download(packages: _Packages, debs: Path) -> tuple[Path, Path]:
    return (apt.download(packages.image_package, packages.image_version, debs),
            apt.download(BUSYBOX_PACKAGE, packages.busybox_version, debs))


def _extract(directory: Path, kernel_deb: Path, busybox_deb: Path, release: str) -> list[str]:
    """Move the kernel, its wanted modules and busybox into the cache; the module file names."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        staging = Path(tmp)
        (staging / "modules").mkdir()
        kernel_name = f"vmlinuz-{release}"
        optional = {f"./lib/modules/{release}/{path}": staging / "modules" / name
                    for name, path in KERNEL_MODULES.items()}
        present = apt.read_members(kernel_deb, {f"./boot/{kernel_name}": staging / kernel_name}, optional)
        apt.read_members(busybox_deb, {"./bin/busybox": staging / "busybox"}, {})
        modules = sorted(f"modules/{Path(name).name}" for name in present)
        (directory / "modules").mkdir(exist_ok=True)
        for name in [kernel_name, "busybox", *modules]:
            os.replace(staging / name, directory / name)
    return modules


def _fetch_new(directory: Path, kernel_request: str) -> Fetched:
    apt.require_apt()
    if apt.ensure_architecture():
        apt.update()
    packages = _resolve_packages(kernel_request)
    try:
        kernel_deb, busybox_deb = _download(packages, directory / "debs")
    except LinuxGuestError:
        # Stale package lists name versions the mirror no longer has: refresh them once.
        apt.update()
        packages = _resolve_packages(kernel_request)
        kernel_deb, busybox_deb = _download(packages, directory / "debs")
    release = _release_of(packages.image_package)
    modules = _extract(directory, kernel_deb, busybox_deb, release)
    fetched = Fetched(kernel_request=kernel_request, kernel_package=packages.image_package,
                      kernel_version=packages.image_version, kernel_release=release,
                      busybox_version=packages.busybox_version, kernel=f"vmlinuz-{release}",
                      busybox="busybox", modules=modules, wanted_modules=list(KERNEL_MODULES))
    _write_atomic(directory / "fetched.json", msgspec.json.format(msgspec.json.encode(fetched)))
    return fetched


def fetch(cache: Path | None = None, kernel_package: str = DEFAULT_KERNEL_PACKAGE,
          refresh: bool = False) -> Fetched:
    """The kernel, modules and busybox in the cache, downloading them only when missing
    (or when ``refresh`` asks apt for the newest versions)."""
    directory = guest_dir(cache or default_cache_dir())
    with _locked(directory):
        cached = None if refresh else _cached_fetch(directory, kernel_package)
        return cached or _fetch_new(directory, kernel_package)


def module_depends(data: bytes) -> list[str]:
    """The modules a ``.ko`` needs loaded first (its modinfo ``depends=``; built-in ones are not named)."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    return [name.decode() for name in match.group(1).split(b",") if name] if match else []


def check_load_order(modules: Mapping[str, bytes]) -> None:
    """Refuse a guest whose init would load a module before one it needs (``insmod`` does not
    resolve dependencies): each module's ``depends=`` must be shipped and come earlier."""
    loaded: set[str] = set()
    for name in (*POWER_KEY_MODULES, *NET_MODULES):
        data = modules.get(f"{name}.ko")
        if data is None:
            continue
        missing = [dep for dep in module_depends(data) if dep not in loaded]
        if missing:
            raise LinuxGuestError(f"kernel module {name} needs {', '.join(missing)} loaded before it",
                                  "add them to KERNEL_MODULES (tools/linux_guest/guest.py) and the "
                                  "load order (tools/linux_guest/initramfs.py)")
        loaded.add(name)


def build(cache: Path | None = None, kernel_package: str = DEFAULT_KERNEL_PACKAGE,
          refresh: bool = False) -> LinuxGuest:
    """A bootable guest: the fetched kernel and a freshly built initramfs.

    The initramfs file is only rewritten when its bytes change, so a running guest
    keeps its file and repeated builds are cheap.
    """
    fetched = fetch(cache, kernel_package, refresh)
    directory = guest_dir(cache or default_cache_dir())
    with _locked(directory):
        modules = {Path(name).name: (directory / name).read_bytes() for name in fetched.modules}
        check_load_order(modules)
        image = build_initramfs((directory / fetched.busybox).read_bytes(), modules,
                                fetched.kernel_release)
        initrd = directory / "initrd.cpio.gz"
        if not initrd.is_file() or initrd.read_bytes() != image:
            _write_atomic(initrd, image)
        guest = LinuxGuest(kernel=str((directory / fetched.kernel).resolve()),
                           initrd=str(initrd.resolve()), kernel_release=fetched.kernel_release,
                           kernel_package=fetched.kernel_package,
                           kernel_version=fetched.kernel_version,
                           busybox_version=fetched.busybox_version)
        _write_atomic(directory / "guest.json", msgspec.json.format(msgspec.json.encode(guest)))
    return guest


def qemu_argv(guest: LinuxGuest, memory_mib: int = 96, cmdline: str = "console=ttyAMA0",
              monitor: bool = False, qemu: str = "qemu-system-aarch64") -> list[str]:
    """QEMU's command line booting ``guest`` on ``virt`` with the PL011 on stdio.

    ^C reaches the guest (``signal=off``). With ``monitor`` the QEMU monitor shares
    stdio (Ctrl-A c, Ctrl-A x quits); otherwise the guest's ``poweroff`` (PSCI
    SYSTEM_OFF) ends QEMU. Add ``-qmp`` options as needed.
    """
    chardev = "stdio,id=console,signal=off" + (",mux=on" if monitor else "")
    monitor_args = ["-mon", "chardev=console,mode=readline"] if monitor else ["-monitor", "none"]
    return [qemu, "-M", "virt,gic-version=3", "-cpu", "cortex-a53", "-m", f"{memory_mib}M",
            "-nodefaults", "-display", "none", "-chardev", chardev, "-serial", "chardev:console",
            *monitor_args, "-kernel", guest.kernel, "-initrd", guest.initrd, "-append", cmdline]
