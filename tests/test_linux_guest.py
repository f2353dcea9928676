"""The Linux guest helper without booting anything: cpio writer, initramfs, cache, CLI."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from tools.linux_guest import (BANNER, HTTP_BULK_PATH, HTTP_BULK_SCRIPT, HTTP_BULK_SIZE, HTTP_PAGE,
                               NET_FAILED_MESSAGE, LinuxGuestError, build, build_initramfs, default_cache_dir,
                               fetch, net_argument, net_ready_line)
from tools.linux_guest import apt, cpio
from tools.linux_guest.guest import KERNEL_MODULES, Fetched, LinuxGuest, _release_of, check_load_order, module_depends
from tools.linux_guest.initramfs import NET_MODULES, initramfs_entries

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(HOST_BUSYBOX is None, reason="host busybox (busybox-static) not installed")


def _cpio_listing(archive: bytes, tmp_path: Path) -> list[str]:
    """``busybox cpio -tv`` of the archive: the host's own reader judges our writer."""
    path = tmp_path / "archive.cpio"
    path.write_bytes(archive)
    done = subprocess.run([HOST_BUSYBOX, "cpio", "-t", "-v", "-F", str(path)], capture_output=True,
                          text=True, check=True)
    return done.stdout.splitlines()


@needs_busybox
def test_newc_archive_is_read_back_by_busybox_cpio(tmp_path: Path) -> None:
    archive = cpio.write_newc([
        cpio.directory("etc"),
        cpio.file("etc/hello", b"abc", 0o640),
        cpio.file("etc/odd-length-name", b"12345"),
        cpio.symlink("etc/link", "hello"),
        cpio.char_device("console", 5, 1),
    ])
    listing = _cpio_listing(archive, tmp_path)
    assert [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing] == [
        "etc", "etc/hello", "etc/odd-length-name", "etc/link", "console"]
    assert listing[0].startswith("drwxr-xr-x")
    assert listing[1].startswith("-rw-r-----") and " 3 " in listing[1]
    assert listing[3].startswith("lrwxrwxrwx") and listing[3].endswith("etc/link -> hello")
    assert listing[4].startswith("crw-------")

    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([HOST_BUSYBOX, "cpio", "-i", "-d", "-F", str(tmp_path / "archive.cpio"),
                    "etc/hello", "etc/odd-length-name", "etc/link"], cwd=out, check=True,
                   capture_output=True)
    assert (out / "etc/hello").read_bytes() == b"abc"
    assert (out / "etc/odd-length-name").read_bytes() == b"12345"
    assert os.readlink(out / "etc/link") == "hello"


def test_newc_members_are_four_byte_aligned() -> None:
    archive = cpio.write_newc([cpio.file("a", b"x"), cpio.file("bb", b"yyyyy")])
    offsets = [i for i in range(len(archive)) if archive.startswith(b"070701", i)]
    assert len(offsets) == 3  # two members and the trailer
    assert all(offset % 4 == 0 for offset in offsets)
    assert len(archive) % 4 == 0
    assert archive.endswith(b"TRAILER!!!\0" + b"\0" * (-(110 + 11) % 4))


@pytest.mark.parametrize("entries, message", [
    ([cpio.file("/init", b"")], "must be relative"),
    ([cpio.file("", b"")], "must be relative"),
    ([cpio.file("a", b""), cpio.file("a", b"")], "duplicate"),
    ([cpio.file("etc/x", b"")], "before its directory"),
])
def test_newc_refuses_archives_the_kernel_would_mangle(entries, message) -> None:
    with pytest.raises(ValueError, match=message):
        cpio.write_newc(entries)


def test_initramfs_is_reproducible_and_gzip_has_no_timestamp() -> None:
    first = build_initramfs(b"busybox-bytes", {"evdev.ko": b"m1"}, "6.1.0-test")
    second = build_initramfs(b"busybox-bytes", {"evdev.ko": b"m1"}, "6.1.0-test")
    assert first == second
    assert first[:2] == b"\x1f\x8b" and first[4:8] == b"\0\0\0\0"  # gzip MTIME field
    assert b"busybox-bytes" in gzip.decompress(first)


def _entries_by_path(modules: dict[str, bytes]) -> dict[str, cpio.Entry]:
    return {entry.path: entry for entry in initramfs_entries(b"BB", modules, "6.1.0-test")}


def test_initramfs_layout_boots_busybox_init_with_a_console_shell() -> None:
    entries = _entries_by_path({"evdev.ko": b"E", "gpio_keys.ko": b"G"})
    assert entries["init"].mode == stat.S_IFREG | 0o755
    assert entries["bin/busybox"].data == b"BB"
    assert entries["bin/sh"].data == b"busybox"
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["lib/modules/6.1.0-test/evdev.ko"].data == b"E"
    assert entries["lib/modules/6.1.0-test/gpio_keys.ko"].data == b"G"
    init = entries["init"].data.decode()
    for mount in ("-t proc", "-t sysfs", "-t devtmpfs", "-t devpts"):
        assert f"mount {mount}" in init
    assert init.rstrip().endswith("exec /sbin/init")
    inittab = entries["etc/inittab"].data.decode().splitlines()
    assert "::sysinit:/etc/init.d/rcS" in inittab and "::shutdown:/etc/init.d/rcK" in inittab
    assert "setsid cttyhack sh -l" in entries["etc/init.d/console"].data.decode()
    assert BANNER in entries["etc/init.d/rcS"].data.decode()
    assert entries["etc/acpid.conf"].data == b"PWRF power-button\n"
    assert "poweroff" in entries["etc/acpi/power-button"].data.decode()


def test_initramfs_without_modules_has_no_module_directory() -> None:
    assert not any(path.startswith("lib/modules/") for path in _entries_by_path({}))


@needs_busybox
def test_guest_scripts_parse_in_busybox_sh(tmp_path: Path) -> None:
    entries = _entries_by_path({})
    scripts = [path for path, entry in entries.items() if entry.data.startswith(b"#!/bin/sh")]
    assert len(scripts) >= 5
    for path in scripts:
        script = tmp_path / path.replace("/", "_")
        script.write_bytes(entries[path].data)
        done = subprocess.run([HOST_BUSYBOX, "sh", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{path}: {done.stderr}"


def test_initramfs_has_the_net_script_and_the_known_page() -> None:
    entries = _entries_by_path({})
    assert entries["www/index.html"].data == HTTP_PAGE.encode()
    assert entries["etc/init.d/net"].mode == stat.S_IFREG | 0o755
    rcs = entries["etc/init.d/rcS"].data.decode()
    assert rcs.index("/etc/init.d/net") < rcs.index(BANNER)  # the banner means: network up too
    net = entries["etc/init.d/net"].data.decode()
    assert f"for module in {' '.join(NET_MODULES)}; do" in net
    assert "httpd -p 80 -h /www" in net


def test_initramfs_serves_the_bulk_body_from_a_cgi_script_not_a_file() -> None:
    entries = _entries_by_path({})
    assert HTTP_BULK_PATH.startswith("/cgi-bin/")  # where busybox httpd runs CGI scripts
    script = entries[f"www{HTTP_BULK_PATH}"]
    assert script.mode == stat.S_IFREG | 0o755 and script.data == HTTP_BULK_SCRIPT.encode()
    assert len(script.data) < 1024
    assert entries["www/cgi-bin"].mode & stat.S_IFDIR


@needs_busybox
def test_the_bulk_cgi_script_prints_its_header_then_exactly_the_bulk_size_of_zeros(tmp_path: Path) -> None:
    """The script as busybox httpd runs it (its own ``sh``, ``printf`` and ``dd`` applets on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for applet in ("sh", "printf", "dd"):
        (bin_dir / applet).symlink_to(HOST_BUSYBOX)
    script = tmp_path / "bulk"
    script.write_text(HTTP_BULK_SCRIPT)
    done = subprocess.run([HOST_BUSYBOX, "sh", str(script)], capture_output=True, env={"PATH": str(bin_dir)},
                          timeout=60)
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"Content-Type: application/octet-stream",
                                    f"Content-Length: {HTTP_BULK_SIZE}".encode()]
    assert len(body) == HTTP_BULK_SIZE and body.count(0) == HTTP_BULK_SIZE


def _run_net_script(tmp_path: Path, cmdline: str) -> subprocess.CompletedProcess[str]:
    """The guest's net script under the host's busybox, reading ``cmdline`` for /proc/cmdline.

    Only for command lines that stop it before it touches anything (no modules, no links)."""
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    script = _entries_by_path({})["etc/init.d/net"].data.decode()
    path = tmp_path / "net"
    path.write_text(script.replace("/proc/cmdline", str(tmp_path / "cmdline")))
    return subprocess.run([HOST_BUSYBOX, "sh", str(path)], capture_output=True, text=True, timeout=30)


@needs_busybox
@pytest.mark.parametrize("cmdline, stdout, returncode", [
    ("console=ttyAMA0 quiet", "", 0),
    ("console=ttyAMA0 runphi.netx=1 xrunphi.net=169.254.1.2/30", "", 0),
    ("console=ttyAMA0 runphi.net=169.254.10.2",
     f"{NET_FAILED_MESSAGE}: runphi.net=169.254.10.2 is not <address>/<prefix>[,<gateway>]\n", 1),
    ("runphi.net=169.254.10.2,169.254.10.1 console=ttyAMA0",
     f"{NET_FAILED_MESSAGE}: runphi.net=169.254.10.2,169.254.10.1 is not <address>/<prefix>[,<gateway>]\n", 1),
])
def test_net_script_without_a_usable_argument_touches_nothing(tmp_path: Path, cmdline, stdout, returncode) -> None:
    done = _run_net_script(tmp_path, cmdline)
    assert (done.stdout, done.stderr, done.returncode) == (stdout, "", returncode)


def test_net_argument_and_ready_line() -> None:
    assert net_argument("169.254.10.2/30", "169.254.10.1") == "runphi.net=169.254.10.2/30,169.254.10.1"
    assert net_argument("169.254.10.2/30") == "runphi.net=169.254.10.2/30"
    assert net_ready_line("169.254.10.2/30") == "runphi linux guest: httpd listening on port 80 of eth0 169.254.10.2/30"


def test_module_dependencies_are_read_from_modinfo() -> None:
    assert module_depends(b"\x7fELF\0license=GPL\0depends=failover,other\0name=net_failover\0") == \
        ["failover", "other"]
    assert module_depends(b"depends=\0name=failover\0") == []
    assert module_depends(b"\0xdepends=failover\0") == []
    assert module_depends(b"no modinfo at all") == []


def test_a_module_loaded_before_its_dependency_is_refused() -> None:
    check_load_order({"virtio_mmio.ko": b"\0depends=\0", "failover.ko": b"\0depends=\0",
                      "net_failover.ko": b"\0depends=failover\0", "virtio_net.ko": b"\0depends=net_failover\0"})
    check_load_order({"virtio_net.ko": b"\0depends=\0"})  # dependencies built into the kernel are not named
    with pytest.raises(LinuxGuestError, match="kernel module virtio_net needs net_failover loaded before it"):
        check_load_order({"virtio_net.ko": b"\0depends=net_failover\0"})
    with pytest.raises(LinuxGuestError, match="kernel module virtio_net needs vhost_thing loaded before it"):
        check_load_order({"net_failover.ko": b"\0depends=\0", "virtio_net.ko": b"\0depends=net_failover,vhost_thing\0"})


def test_kernel_metapackage_dependency_is_parsed() -> None:
    assert apt.kernel_image_of("linux-image-arm64", "linux-image-6.1.0-56-arm64 (= 6.1.192-2)") == \
        "linux-image-6.1.0-56-arm64"
    with pytest.raises(LinuxGuestError, match="does not depend on a linux-image"):
        apt.kernel_image_of("linux-headers-arm64", "linux-headers-6.1.0-56-arm64 (= 6.1.192-2)")


def test_kernel_release_comes_from_the_image_package_name() -> None:
    assert _release_of("linux-image-6.1.0-56-arm64") == "6.1.0-56-arm64"
    assert _release_of("linux-image-6.1.0-56-arm64-unsigned") == "6.1.0-56-arm64"


def test_default_cache_dir_honours_runphi_cache_then_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RUNPHI_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RUNPHI_CACHE")
    assert default_cache_dir() == tmp_path / "b" / "runphi"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "runphi"


def _seed_cache(cache: Path, kernel_request: str = "linux-image-arm64") -> None:
    """A cache as ``fetch`` leaves it (with stand-in bytes for the packaged files)."""
    directory = cache / "linux-guest"
    (directory / "modules").mkdir(parents=True)
    (directory / "vmlinuz-6.1.0-test").write_bytes(b"KERNEL")
    (directory / "busybox").write_bytes(b"BUSYBOX")
    (directory / "modules/evdev.ko").write_bytes(b"EVDEV")
    fetched = Fetched(kernel_request=kernel_request, kernel_package="linux-image-6.1.0-test",
                      kernel_version="6.1.1-1", kernel_release="6.1.0-test", busybox_version="1:1.35",
                      kernel="vmlinuz-6.1.0-test", busybox="busybox", modules=["modules/evdev.ko"],
                      wanted_modules=list(KERNEL_MODULES))
    (directory / "fetched.json").write_bytes(msgspec.json.encode(fetched))


def test_cached_guest_builds_without_apt(monkeypatch, tmp_path: Path) -> None:
    _seed_cache(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    guest = build(tmp_path)
    assert guest.kernel == str(tmp_path / "linux-guest/vmlinuz-6.1.0-test")
    image = gzip.decompress(Path(guest.initrd).read_bytes())
    assert b"BUSYBOX" in image and b"lib/modules/6.1.0-test/evdev.ko" in image
    stamp = os.stat(guest.initrd).st_mtime_ns
    assert build(tmp_path) == guest
    assert os.stat(guest.initrd).st_mtime_ns == stamp  # same bytes: file left alone
    recorded = msgspec.json.decode((tmp_path / "linux-guest/guest.json").read_bytes(), type=LinuxGuest)
    assert recorded == guest


def test_cache_for_another_kernel_is_not_reused(monkeypatch, tmp_path: Path) -> None:
    _seed_cache(tmp_path, kernel_request="linux-image-other")
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    with pytest.raises(LinuxGuestError, match="apt-get, apt-cache, dpkg, dpkg-deb not found"):
        fetch(tmp_path)


def test_cache_with_a_missing_file_is_not_reused(monkeypatch, tmp_path: Path) -> None:
    _seed_cache(tmp_path)
    (tmp_path / "linux-guest/modules/evdev.ko").unlink()
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    with pytest.raises(LinuxGuestError, match="not found"):
        fetch(tmp_path)


def _deb(debs: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """A real .deb (built by dpkg-deb) named as ``apt-get download`` names it."""
    root = debs / f".{package}"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(f"Package: {package}\nVersion: {version}\nArchitecture: arm64\n"
                                         "Maintainer: test <test@example.invalid>\nDescription: test\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root),
                    str(debs / apt.deb_file_name(package, version))], check=True, capture_output=True)
    shutil.rmtree(root)


def _seed_old_cache(cache: Path) -> Path:
    """A cache fetched before the network modules were wanted (no ``wanted_modules``)."""
    _seed_cache(cache)
    directory = cache / "linux-guest"
    fetched = msgspec.json.decode((directory / "fetched.json").read_bytes())
    del fetched["wanted_modules"]
    (directory / "fetched.json").write_bytes(msgspec.json.encode(fetched))
    return directory


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not found (not a Debian host)")
def test_cache_from_before_the_network_modules_is_extracted_again_without_downloading(monkeypatch,
                                                                                      tmp_path: Path) -> None:
    directory = _seed_old_cache(tmp_path)
    modules = "lib/modules/6.1.0-test/kernel"
    _deb(directory / "debs", "linux-image-6.1.0-test", "6.1.1-1", {
        "boot/vmlinuz-6.1.0-test": b"KERNEL", f"{modules}/drivers/input/evdev.ko": b"\0depends=\0EVDEV",
        f"{modules}/net/core/failover.ko": b"\0depends=\0FAILOVER",
        f"{modules}/drivers/net/net_failover.ko": b"\0depends=failover\0NET_FAILOVER",
        f"{modules}/drivers/net/virtio_net.ko": b"\0depends=net_failover\0VIRTIO_NET"})
    _deb(directory / "debs", "busybox-static", "1:1.35", {"bin/busybox": b"BUSYBOX"})

    def no_download(*args):
        raise AssertionError(f"downloaded {args}")
    monkeypatch.setattr(apt, "download", no_download)
    guest = build(tmp_path)
    fetched = msgspec.json.decode((directory / "fetched.json").read_bytes(), type=Fetched)
    assert fetched.wanted_modules == list(KERNEL_MODULES)
    assert fetched.modules == ["modules/evdev.ko", "modules/failover.ko", "modules/net_failover.ko",
                               "modules/virtio_net.ko"]
    image = gzip.decompress(Path(guest.initrd).read_bytes())
    assert b"lib/modules/6.1.0-test/virtio_net.ko" in image and b"VIRTIO_NET" in image


def test_cache_from_before_the_network_modules_without_its_packages_is_fetched_again(monkeypatch,
                                                                                    tmp_path: Path) -> None:
    _seed_old_cache(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    with pytest.raises(LinuxGuestError, match="not found"):
        fetch(tmp_path)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.linux_guest", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)


def test_cli_build_prints_kernel_and_initrd_of_a_cached_guest(tmp_path: Path) -> None:
    _seed_cache(tmp_path)
    done = _cli("build", "--cache", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"kernel {tmp_path}/linux-guest/vmlinuz-6.1.0-test",
                                        f"initrd {tmp_path}/linux-guest/initrd.cpio.gz"]


@pytest.mark.parametrize("args, message", [
    (["fetch", "--cache", "/proc/no-such-dir"], "linux_guest: cannot use the cache /proc/no-such-dir/linux-guest"),
    (["boot"], "linux_guest: argument verb: invalid choice"),
    (["run", "--memory", "8"], "is not a size in MiB of at least 32"),
])
def test_cli_bad_input_is_one_line_and_exit_1(args, message) -> None:
    done = _cli(*args)
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr


def test_cli_zic_builds_a_linux_zic_bundle_and_archive(tmp_path: Path) -> None:
    _seed_cache(tmp_path / "cache")
    bundle, archive = tmp_path / "bundle", tmp_path / "linux.tar"
    done = _cli("zic", "--cache", str(tmp_path / "cache"), "--bundle", str(bundle), "--archive", str(archive),
                "--name", "linux-demo:1", "--memory", "96", "--cmdline", "console=ttyAMA0 quiet")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"bundle {bundle}"
    assert lines[1].startswith("image docker.io/library/linux-demo:1 sha256:") and lines[1].endswith(str(archive))
    boot = bundle / "rootfs" / "boot"
    assert msgspec.json.decode((boot / "config.json").read_bytes()) == {
        "os_var": "linux", "inmate": "/boot/vmlinuz-6.1.0-test", "initrd": "/boot/initrd.cpio.gz",
        "dtb": "/boot/inmate-qemu-arm64.dtb", "memory": 96, "vcpus": 1}
    assert (boot / "vmlinuz-6.1.0-test").read_bytes() == b"KERNEL"
    assert (boot / "inmate-qemu-arm64.dtb").read_bytes()[:4] == b"\xd0\x0d\xfe\xed"
    config = msgspec.json.decode((bundle / "config.json").read_bytes())
    assert config["annotations"]["org.runphi.linux.cmdline"] == "console=ttyAMA0 quiet"
    assert archive.stat().st_size > 0


def test_cli_zic_without_an_output_is_one_line(tmp_path: Path) -> None:
    _seed_cache(tmp_path)
    done = _cli("zic", "--cache", str(tmp_path))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "linux_guest: zic needs an output: pass --bundle DIR and/or --archive FILE\n"


def test_cli_zic_net_asks_for_a_link_in_the_boot_description(tmp_path: Path) -> None:
    _seed_cache(tmp_path / "cache")
    bundle = tmp_path / "bundle"
    done = _cli("zic", "--cache", str(tmp_path / "cache"), "--bundle", str(bundle), "--net")
    assert done.returncode == 0, done.stderr
    boot = msgspec.json.decode((bundle / "rootfs/boot/config.json").read_bytes())
    assert boot["net"] == "true"
