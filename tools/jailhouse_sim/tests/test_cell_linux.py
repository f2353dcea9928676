"""``jailhouse cell linux`` on the simulator (script engine): grammar, errors, placement,
``-w``, and the Linux boot the daemon recognises. The real boot under QEMU is in
``test_cell_linux_qemu.py``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import struct
from pathlib import Path

import pytest
import serial

from tools.jailhouse_sim import fdt
from tools.jailhouse_sim.cell_linux import INMATE_DTB_PATH, LOADER_MAGIC, loader_image
from tools.jailhouse_sim.engine import LoadedImage
from tools.jailhouse_sim.linux_boot import linux_boot_of, read_memory

from . import cells

USAGE_HEAD = ("usage: jailhouse cell linux [-h] [-d DTB] [-i INITRD] [-c \"CMDLINE\"]\n"
              "                            [-w PARAMS_FILE] [-a ARCH] [-k FACTOR]\n"
              "                            CELLCONFIG KERNEL\n")
MIB = 1 << 20


def fake_kernel(size: int = 3 * MIB + 123, text_offset: int = 0) -> bytes:
    """An arm64 Image header (text_offset at byte 8, "ARM\\x64" at 56) padded with a pattern."""
    header = struct.pack("<II Q Q Q Q Q Q I I", 0x14000000, 0, text_offset, size, 0xA, 0, 0, 0, 0x644D5241, 0)
    return (header + bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.fixture
def sim(jailhouse_sim):
    return jailhouse_sim


@pytest.fixture
def linux_cell(tmp_path: Path) -> Path:
    """A Linux cell as Jailhouse lays them out: loader in the 64 KiB at guest 0, 64 MiB RAM at 0x70000000."""
    return cells.write(tmp_path, cells.runphi_cell("linux-demo", {2, 3}, uart=1, ram_size=64 * MIB, reset=0))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"kernel": tmp_path / "Image", "initrd": tmp_path / "initrd.cpio.gz", "dtb": tmp_path / "guest.dtb"}
    paths["kernel"].write_bytes(fake_kernel())
    paths["initrd"].write_bytes(gzip.compress(b"070701" + b"x" * 5000, mtime=0))
    paths["dtb"].write_bytes(fdt.serialize(fdt.inmate_tree()))
    return paths


def cell_linux(sim, cell: Path, files: dict[str, Path], *extra: str | Path, initrd: bool = True):
    args = ["cell", "linux", cell, files["kernel"], "-d", files["dtb"], "-c", "console=ttyAMA0 rdinit=/init"]
    if initrd:
        args += ["-i", files["initrd"]]
    return sim.jailhouse(*args, *extra)


# ---- grammar -------------------------------------------------------------------------------------


def test_help_is_argparse_usage_on_stdout(sim):
    result = sim.jailhouse("cell", "linux", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(USAGE_HEAD + "\nBoot Linux in a non-root cell.\n")
    assert "  -k FACTOR, --kernel-decomp-factor FACTOR" in result.stdout


@pytest.mark.parametrize("args, error", [
    ((), "the following arguments are required: CELLCONFIG, KERNEL"),
    (("-k", "two", "a", "b"), "argument -k/--kernel-decomp-factor: invalid int value: 'two'"),
    (("--bogus",), "the following arguments are required: CELLCONFIG, KERNEL"),
])
def test_syntax_errors_are_argparse_exit_2(sim, args, error):
    result = sim.jailhouse("cell", "linux", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(USAGE_HEAD)
    assert result.stderr.endswith(f"jailhouse cell linux: error: {error}\n")


def test_unreadable_file_is_argparse_error(sim, linux_cell, tmp_path):
    result = sim.jailhouse("cell", "linux", linux_cell, tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.endswith(f"jailhouse cell linux: error: argument KERNEL: can't open '{tmp_path}/nope': "
                                  f"[Errno 2] No such file or directory: '{tmp_path}/nope'\n")


# ---- checks before anything is created -----------------------------------------------------------


def no_cell_created(sim) -> bool:
    return sim.jailhouse("cell", "list").stdout.count("\n") == 2  # header + root cell


@pytest.mark.parametrize("arch, message", [("sparc", "Unknown architecture"), ("x86", "Unsupported architecture"),
                                           ("arm", "Unsupported architecture")])
def test_architectures_other_than_the_boards_are_refused(sim, linux_cell, files, arch, message):
    result = cell_linux(sim, linux_cell, files, "-a", arch)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"{message}\n")
    assert no_cell_created(sim)


def test_arm64_needs_a_device_tree(sim, linux_cell, files):
    result = sim.jailhouse("cell", "linux", linux_cell, files["kernel"])
    assert (result.returncode, result.stderr) == (1, "No device tree specified\n")
    assert no_cell_created(sim)


def test_cell_config_errors_name_the_file(sim, files, tmp_path):
    junk = tmp_path / "junk.cell"
    junk.write_bytes(b"not a cell configuration at all" * 10)
    rev14 = cells.write(tmp_path, cells.runphi_cell("x", {2}, reset=0), "rev14")
    for path, message in ((junk, "Not a cell configuration"), (rev14, "Not a cell configuration")):
        result = sim.jailhouse("cell", "linux", path, files["kernel"], "-d", files["dtb"])
        assert (result.returncode, result.stderr) == (1, f"{message}: {path}\n")
    assert no_cell_created(sim)


def test_ram_too_small_for_kernel_and_initrd_is_refused(sim, files, tmp_path):
    small = cells.write(tmp_path, cells.runphi_cell("small", {2}, ram_size=6 * MIB, reset=0))
    result = cell_linux(sim, small, files)
    assert (result.returncode, result.stderr) == (1, "No space found to load all images\n")
    # Kernel 3 MiB + 2 MiB alignment + DTB/loader pages fit in 6 MiB; the initrd's 3 MiB of
    # decompression space on top do not.
    result = sim.jailhouse("cell", "linux", small, files["kernel"], "-d", files["dtb"])
    assert result.returncode == 0, result.stderr  # without the initrd no decompression space is reserved


def test_decompression_factor_grows_the_space_needed(sim, files, tmp_path):
    cell = cells.write(tmp_path, cells.runphi_cell("k", {2}, ram_size=12 * MIB, reset=0))
    assert cell_linux(sim, cell, files, "-w", tmp_path / "p.dtb").returncode == 0
    result = cell_linux(sim, cell, files, "-k", "4", "-w", tmp_path / "p.dtb")
    assert (result.returncode, result.stderr) == (1, "No space found to load all images\n")


def test_dtb_of_an_unsupported_version_is_reported_on_stdout(sim, linux_cell, files):
    blob = bytearray(files["dtb"].read_bytes())
    blob[20:24] = struct.pack(">I", 16)
    files["dtb"].write_bytes(blob)
    result = cell_linux(sim, linux_cell, files)
    assert (result.returncode, result.stdout, result.stderr) == (1, "Unsupported DTB version 16\n", "")


# ---- -w ------------------------------------------------------------------------------------------


def test_write_params_prints_the_equivalent_commands_and_writes_the_dtb(sim, linux_cell, files, tmp_path):
    params = tmp_path / "params.dtb"
    result = cell_linux(sim, linux_cell, files, "-w", params)
    assert result.returncode == 0, result.stderr
    # DTB at the RAM start; kernel 2 MiB-aligned after DTB+1 page; initrd after kernel + 1x its size.
    kernel_size = (len(fake_kernel()) + 0xFFF) & ~0xFFF
    kernel, initrd = 0x70200000, 0x70200000 + 2 * kernel_size
    assert result.stdout == (
        "Modified device tree written. Start Linux with the following commands (adjusting paths as needed):\n\n"
        f"jailhouse cell create {linux_cell}\n"
        f'jailhouse cell load linux-demo linux-loader.bin -a 0x0 -s "kernel=0x{kernel:x} dtb=0x70000000" -a 0x1000 '
        f"{files['kernel']} -a 0x{kernel:x} {files['initrd']} -a 0x{initrd:x} {params} -a 0x70000000\n"
        "jailhouse cell start linux-demo\n")
    tree = fdt.parse(params.read_bytes())
    assert tree.get("/chosen", "bootargs") == b"console=ttyAMA0 rdinit=/init\0"
    assert tree.get("/chosen", "linux,initrd-start") == struct.pack(">Q", initrd)
    assert tree.get("/chosen", "linux,initrd-end") == struct.pack(">Q", initrd + files["initrd"].stat().st_size)
    # The 64 KiB loader region at guest 0 is left out of /memory.
    assert tree.get("/memory", "reg") == struct.pack(">QQ", 0x70000000, 64 * MIB)
    assert no_cell_created(sim)


def test_zipped_kernel_is_unzipped_and_noted(sim, linux_cell, files, tmp_path):
    files["kernel"].write_bytes(gzip.compress(fake_kernel(), mtime=0))
    result = cell_linux(sim, linux_cell, files, "-w", tmp_path / "p.dtb")
    assert result.returncode == 0, result.stderr
    assert f"{files['kernel']}-unzipped -a 0x70200000" in result.stdout
    assert result.stdout.endswith(f"\nNote that {files['kernel']} is zipped and requires decompression first.\n")


# ---- booting (script engine) ---------------------------------------------------------------------


def linux_banner(kernel: bytes, initrd: bytes | None, cmdline: str) -> bytes:
    digest = hashlib.sha256(kernel).hexdigest()[:12]
    described = f"initrd {len(initrd)} bytes" if initrd is not None else "no initrd"
    return (f"[jailhouse-sim] linux guest: kernel {len(kernel)} bytes, sha256 {digest}; {described}; "
            f'cmdline "{cmdline}"\r\n').encode()


def test_cell_linux_creates_loads_and_starts_a_linux_guest(sim, linux_cell, files):
    with serial.Serial(str(sim.uart(1)), timeout=10) as port:
        result = cell_linux(sim, linux_cell, files)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        expected = linux_banner(fake_kernel(), files["initrd"].read_bytes(), "console=ttyAMA0 rdinit=/init")
        assert port.read_until(expected).endswith(expected)
    assert sim.state(1) == "running"
    assert sim.console().count('Started cell "linux-demo"') == 1
    assert sim.kernel_log().count('Created Jailhouse cell "linux-demo"') == 1


def test_running_it_again_reuses_the_cell_eexist_is_ignored(sim, linux_cell, files):
    assert cell_linux(sim, linux_cell, files).returncode == 0
    with serial.Serial(str(sim.uart(1)), timeout=10) as port:
        result = cell_linux(sim, linux_cell, files, initrd=False)
        assert result.returncode == 0, result.stderr
        expected = linux_banner(fake_kernel(), None, "console=ttyAMA0 rdinit=/init")
        assert port.read_until(expected).endswith(expected)
    assert sim.jailhouse("cell", "list").stdout.count("linux-demo") == 1
    assert sim.console().count('Started cell "linux-demo"') == 2


def test_ioctl_errors_end_it_like_an_uncaught_oserror(sim, linux_cell, files):
    sim.inject(errno=errno.EBUSY, op="start")
    result = cell_linux(sim, linux_cell, files)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):\n")
    assert result.stderr.endswith("OSError: [Errno 16] Device or resource busy\n")
    assert sim.state(1) == "shut down"  # created and loaded, never started: as the real helper leaves it


def test_without_the_driver_it_cannot_open_the_device(sim, linux_cell, files):
    sim.kill()
    result = cell_linux(sim, linux_cell, files)
    assert result.returncode == 1
    assert result.stderr.endswith("FileNotFoundError: [Errno 2] No such file or directory: '/dev/jailhouse'\n")


def test_the_simulator_root_ships_loader_and_a_guest_dtb(sim):
    for loader in ("inmates/tools/arm64/linux-loader.bin", "libexec/jailhouse/linux-loader.bin"):
        assert (sim.layout.root / loader).read_bytes().startswith(LOADER_MAGIC)
    tree = fdt.parse((sim.layout.root / INMATE_DTB_PATH).read_bytes())
    assert tree.cells("#address-cells") == 2 and tree.find("/chosen") is not None


# ---- recognising the boot from memory (unit) -----------------------------------------------------


def boot_images(kernel: bytes = b"K" * 64, initrd: bytes | None = b"I" * 32, cmdline: str = "console=ttyAMA0"):
    tree = fdt.inmate_tree()
    tree.set("/chosen", "bootargs", fdt.string(cmdline))
    if initrd is not None:
        tree.set("/chosen", "linux,initrd-start", struct.pack(">Q", 0x50000))
        tree.set("/chosen", "linux,initrd-end", struct.pack(">Q", 0x50000 + len(initrd)))
    images = [LoadedImage(0, loader_image()), LoadedImage(0x40000, kernel), LoadedImage(0x30000, fdt.serialize(tree))]
    if initrd is not None:
        images.append(LoadedImage(0x50000, initrd))
    return images + [LoadedImage(0x1000, b"kernel=0x40000 dtb=0x30000")]


def test_linux_boot_is_read_from_loader_params_and_dtb():
    boot = linux_boot_of(boot_images(), 0)
    assert boot is not None
    assert (boot.kernel, boot.initrd, boot.cmdline) == (b"K" * 64, b"I" * 32, "console=ttyAMA0")
    assert linux_boot_of(boot_images(initrd=None), 0).initrd is None


def test_later_loads_overwrite_earlier_ones():
    images = boot_images() + [LoadedImage(0x40010, b"new")]
    assert linux_boot_of(images, 0).kernel == b"K" * 16 + b"new" + b"K" * 45
    assert read_memory(images, 0x4003E, 4) == b"KK\0\0"


@pytest.mark.parametrize("broken", ["no loader", "loader overwritten", "bad params", "no kernel", "bad dtb"])
def test_anything_the_loader_cannot_use_is_not_a_linux_boot(broken):
    images = boot_images()
    if broken == "no loader":
        images = images[1:]
    elif broken == "loader overwritten":
        images.append(LoadedImage(0, b"\0" * 64))
    elif broken == "bad params":
        images.append(LoadedImage(0x1000, b"kernel=40000 dtb=0x30000\0"))
    elif broken == "no kernel":
        images.append(LoadedImage(0x1000, b"kernel=0x60000 dtb=0x30000\0"))
    else:
        images.append(LoadedImage(0x30000, b"\xd0\x0d\xfe\xed" + b"\0" * 60))
    assert linux_boot_of(images, 0) is None


# ---- the device tree code (unit) -----------------------------------------------------------------


def test_fdt_round_trip_and_edits():
    tree = fdt.inmate_tree()
    blob = fdt.serialize(tree)
    assert blob[:4] == b"\xd0\x0d\xfe\xed" and struct.unpack_from(">I", blob, 4)[0] == len(blob)
    again = fdt.parse(blob)
    assert fdt.serialize(again) == blob
    again.set("/chosen", "bootargs", fdt.string("quiet"))
    again.set("/new-node", "x", fdt.u32(7))
    edited = fdt.parse(fdt.serialize(again))
    assert edited.get("/chosen", "bootargs") == b"quiet\0" and edited.get("/new-node", "x") == b"\0\0\0\7"
    with pytest.raises(fdt.FdtError, match="DTB is missing node /no/such"):
        edited.set("/no/such/node", "x", b"")


@pytest.mark.parametrize("blob", [b"", b"\0" * 64, fdt.serialize(fdt.inmate_tree())[:60]])
def test_fdt_rejects_garbage(blob):
    with pytest.raises(fdt.FdtError):
        fdt.parse(blob)
