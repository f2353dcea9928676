"""``jailhouse cell linux``: the simulator's ``jailhouse-cell-linux`` helper.

Installed as ``<root>/bin/jailhouse-cell-linux``; ``bin/jailhouse cell linux ...``
execs it exactly as the real tool execs its helper. It follows the real script
(jailhouse.md §1.8) for arm64: argparse grammar and messages, the placement of
DTB, kernel and initrd in the first RAM region that holds them, the DTB rewrite
(``/memory/reg``, ``/chosen/bootargs``, ``/chosen/linux,initrd-*``), ``-w`` output,
then create (``EEXIST`` ignored), five loads by name and start. Like the real
helper it does not catch ioctl errors: they end it with a Python-style traceback
whose last line is ``OSError: [Errno N] <strerror>``, exit 1.

Simulator specifics: the default architecture is the board's (the board's
``uname -m``), and only arm64 boots; ``linux-loader.bin`` is the simulator's stand-in
(:data:`LOADER_MAGIC`), from which the daemon recognises a Linux boot at start
(:mod:`.linux_boot`).
"""

from __future__ import annotations

import argparse
import errno
import gzip
import os
import socket
import struct
import sys
from pathlib import Path

from . import fdt, spawn
from . import protocol as p
from .board import load_board
from .cellfile import ArchitectureMismatch, ConfigRejected, CellConfig, check_signature, parse_cell
from .cellfile import MEM_COMM_REGION, MEM_DMA, MEM_EXECUTE, MEM_IO, MEM_READ, MEM_ROOTSHARED, MEM_WRITE

LOADER_MAGIC = b"jailhouse-sim linux-loader\n"
"""First bytes of the simulator's ``linux-loader.bin``."""
LOADER_PATH = Path("inmates", "tools", "arm64", "linux-loader.bin")
"""Where the helper takes the loader from under the simulator root (the real in-tree location)."""
INSTALLED_LOADER_PATH = Path("libexec", "jailhouse", "linux-loader.bin")
"""The installed location (``<prefix>/libexec/jailhouse``), where runphi looks by default."""
INMATE_DTB_PATH = Path("configs", "arm64", "dts", "inmate-qemu-arm64.dtb")
"""A guest device tree for ``-d`` (Jailhouse's in-tree name; see :func:`fdt.inmate_tree`)."""

_RAM_MASK = MEM_READ | MEM_WRITE | MEM_EXECUTE | MEM_DMA | MEM_IO | MEM_COMM_REGION | MEM_ROOTSHARED
_RAM_FLAGS = MEM_READ | MEM_WRITE | MEM_EXECUTE | MEM_DMA
_ARM64_KERNEL_ALIGNMENT = 0x200000
_UNAME = {"x86": "x86_64", "arm": "armv7l", "arm64": "aarch64"}


class HelperExit(Exception):
    """End the helper with ``code`` (the message was already printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def loader_image() -> bytes:
    """The bytes of the simulator's ``linux-loader.bin``."""
    return LOADER_MAGIC + b"Boots the kernel named by the parameters at reset address + 0x1000.\n"


def page_align(value: int, page: int = 0x1000) -> int:
    return (value + page - 1) & ~(page - 1)


def is_ram(flags: int) -> bool:
    """The real helper's RAM test: exactly R|W|X|DMA among the relevant flags."""
    return flags & _RAM_MASK == _RAM_FLAGS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0].replace("-", " ")),
                                     description="Boot Linux in a non-root cell.")
    parser.add_argument("config", metavar="CELLCONFIG", type=argparse.FileType("rb"),
                        help="cell configuration file")
    parser.add_argument("kernel", metavar="KERNEL", type=argparse.FileType("rb"),
                        help="image of the kernel to be booted")
    parser.add_argument("-d", "--dtb", metavar="DTB", type=argparse.FileType("rb"),
                        help="device tree for the kernel [arm/arm64 only]")
    parser.add_argument("-i", "--initrd", metavar="INITRD", type=argparse.FileType("rb"),
                        help="initrd/initramfs for the kernel")
    parser.add_argument("-c", "--cmdline", metavar='"CMDLINE"', help="kernel command line")
    parser.add_argument("-w", "--write-params", metavar="PARAMS_FILE", type=argparse.FileType("wb"),
                        help="only parse cell configuration, write out parameters into the specified "
                             "file and print required jailhouse cell commands to boot Linux to the console")
    parser.add_argument("-a", "--arch", metavar="ARCH", help="target architecture")
    parser.add_argument("-k", "--kernel-decomp-factor", metavar="FACTOR", type=int,
                        help="decompression factor of the kernel image, used to reserve space "
                             "between the kernel and the initramfs")
    return parser


def _fail(message: str, stream=None) -> HelperExit:
    print(message, file=stream or sys.stderr)
    return HelperExit(1)


def _crash(exception_line: str) -> HelperExit:
    """What an uncaught Python exception in the real helper looks like (last line is the point)."""
    print("Traceback (most recent call last):\n"
          '  File "/usr/libexec/jailhouse/jailhouse-cell-linux", line 1, in <module>\n'
          f"{exception_line}", file=sys.stderr)
    return HelperExit(1)


def resolve_arch(arch: str | None, board_arch: str) -> str:
    """``-a`` or the board's architecture; only arm64 boots in the simulator."""
    if arch is not None and arch not in _UNAME:
        raise _fail("Unknown architecture")
    if (arch or board_arch) != "arm64":
        raise _fail("Unsupported architecture")
    return "arm64"


def read_cell_config(data: bytes, name: str, board) -> CellConfig:
    """Parse the ``.cell`` as pyjailhouse does; failures print ``<message>: <file>``."""
    try:
        check_signature(data, board.profile, board.arch_code, system=False)
        return parse_cell(data, board.profile)
    except ConfigRejected as exc:
        message = {"Configuration revision mismatch": "Configuration file revision mismatch"}.get(
            exc.log or "", exc.log or "Not a cell configuration")
    except ArchitectureMismatch:
        message = "Configuration has unsupported architecture"
    except struct.error:
        message = "Not a cell configuration"
    raise _fail(f"{message}: {name}")


class Arm64Boot:
    """The arm64 placement and DTB rewrite of the real helper."""

    def __init__(self, args: argparse.Namespace, config: CellConfig) -> None:
        self.reset_address = config.cpu_reset_address
        raw = args.kernel.read()
        try:
            self.kernel = gzip.decompress(raw)
            self.kernel_gz = True
        except (OSError, EOFError):
            self.kernel, self.kernel_gz = raw, False
        if len(self.kernel) < 16:
            raise _crash("struct.error: unpack_from requires a buffer of at least 16 bytes "
                         f"for unpacking 8 bytes at offset 8 (actual buffer size is {len(self.kernel)})")
        kernel_size = page_align(len(self.kernel))
        (load_offset,) = struct.unpack_from("<8xQ", self.kernel)
        image_size = load_offset + kernel_size + _ARM64_KERNEL_ALIGNMENT
        self.initrd = args.initrd.read() if args.initrd else None
        if self.initrd is not None:
            decompression = (args.kernel_decomp_factor or 1) * kernel_size
            kernel_size += decompression
            image_size += decompression
        if not args.dtb:
            raise _fail("No device tree specified")
        dtb_blob = args.dtb.read()
        dtb_size = page_align(len(dtb_blob)) + 0x1000
        image_size += dtb_size + 0x2000
        regions = [r for r in config.memory_regions if is_ram(r.flags) and r.size >= image_size]
        if not regions:
            raise _fail("No space found to load all images")
        self.dtb_address = regions[0].virt_start or 0x2000
        self.kernel_address = page_align(self.dtb_address + dtb_size, _ARM64_KERNEL_ALIGNMENT) + load_offset
        self.initrd_address = self.kernel_address + kernel_size
        self.params = f"kernel=0x{self.kernel_address:x} dtb=0x{self.dtb_address:x}".encode()
        self.dtb = self._patched_dtb(dtb_blob, config, args.cmdline)

    def _patched_dtb(self, blob: bytes, config: CellConfig, cmdline: str | None) -> bytes:
        try:
            tree = fdt.parse(blob)
        except fdt.FdtError as exc:
            if str(exc).startswith("Unsupported DTB version"):
                raise _fail(str(exc), sys.stdout) from None
            raise _crash(f"RuntimeError: {exc}") from None
        try:
            address_cells, size_cells = tree.cells("#address-cells"), tree.cells("#size-cells")
        except fdt.FdtError:
            raise _crash("RuntimeError: Invalid DTB") from None
        address = ">Q" if address_cells == 2 else ">I"
        reg_format = address + ("Q" if size_cells == 2 else "I")
        tree.set("/memory", "device_type", fdt.string("memory"))
        reg = b"".join(struct.pack(reg_format, r.virt_start, r.size) for r in config.memory_regions
                       if is_ram(r.flags) and (r.virt_start > 0 or r.size > 0x10000))
        tree.set("/memory", "reg", reg)
        if cmdline:
            tree.set("/chosen", "bootargs", fdt.string(cmdline))
        if self.initrd is not None:
            tree.set("/chosen", "linux,initrd-start", struct.pack(address, self.initrd_address))
            tree.set("/chosen", "linux,initrd-end", struct.pack(address, self.initrd_address + len(self.initrd)))
        return fdt.serialize(tree)

    def images(self) -> list[tuple[bytes, int]]:
        """(bytes, guest address) in the order the real helper loads them."""
        images = [(loader_image(), self.reset_address), (self.kernel, self.kernel_address),
                  (self.dtb, self.dtb_address)]
        if self.initrd is not None:
            images.append((self.initrd, self.initrd_address))
        return images + [(self.params, self.reset_address + 0x1000)]

    def print_commands(self, args: argparse.Namespace, cell_name: str) -> None:
        """``-w``: write the DTB and print the equivalent commands, worded as the real helper."""
        args.write_params.write(self.dtb)
        args.write_params.close()
        kernel_name = args.kernel.name + ("-unzipped" if self.kernel_gz else "")
        line = (f"jailhouse cell load {cell_name} linux-loader.bin -a 0x{self.reset_address:x} "
                f'-s "{self.params.decode()}" -a 0x{self.reset_address + 0x1000:x} '
                f"{kernel_name} -a 0x{self.kernel_address:x} ")
        if self.initrd is not None:
            line += f"{args.initrd.name} -a 0x{self.initrd_address:x} "
        line += f"{args.write_params.name} -a 0x{self.dtb_address:x}"
        print("Modified device tree written. Start Linux with the following commands "
              "(adjusting paths as needed):\n")
        print(f"jailhouse cell create {args.config.name}")
        print(line)
        print(f"jailhouse cell start {cell_name}")
        if self.kernel_gz:
            print(f"\nNote that {args.kernel.name} is zipped and requires decompression first.")


class Driver:
    """The three ioctls the helper issues, sent to the simulator daemon."""

    def __init__(self, root: Path) -> None:
        self.socket_path = root / "run" / "jailhouse-sim.sock"

    def call(self, request: p.Request) -> int:
        """Send one request; the errno of the reply (0 on success).

        No daemon to talk to is the real helper failing to open ``/dev/jailhouse``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket_path))
            except OSError:
                raise _crash("FileNotFoundError: [Errno 2] No such file or directory: '/dev/jailhouse'") from None
            try:
                sock.sendall(p.encode(request))
                sock.shutdown(socket.SHUT_WR)
                reply = b"".join(iter(lambda: sock.recv(1 << 16), b""))
            except OSError as exc:
                return exc.errno or errno.EIO
        # The daemon vanished mid-call: the device went away.
        return p.decode_reply(reply).errno if reply else errno.ENODEV

    def check(self, err: int) -> None:
        if err:
            raise _crash(f"OSError: [Errno {err}] {os.strerror(err)}")

    def create(self, config: bytes) -> None:
        err = self.call(p.CellCreate(ioctl="JAILHOUSE_CELL_CREATE", config=config))
        if err != errno.EEXIST:
            self.check(err)

    def load(self, cell_name: str, data: bytes, address: int) -> None:
        cell = p.CellId(-1, cell_name[:31])
        self.check(self.call(p.CellLoad(ioctl="JAILHOUSE_CELL_LOAD", cell=cell, images=[p.Image(address, data)])))

    def start(self, cell_name: str) -> None:
        self.check(self.call(p.CellStart(ioctl="JAILHOUSE_CELL_START", cell=p.CellId(-1, cell_name[:31]))))


def run(argv: list[str], root: Path, board_name: str) -> int:
    """The helper's whole behaviour; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    board = load_board(board_name)
    resolve_arch(args.arch, board.architecture)
    config_bytes = args.config.read()
    config = read_cell_config(config_bytes, args.config.name, board)
    boot = Arm64Boot(args, config)
    if args.write_params:
        boot.print_commands(args, config.name)
        return 0
    loader = root / LOADER_PATH
    if not loader.is_file():
        raise _crash(f"FileNotFoundError: [Errno 2] No such file or directory: '{loader}'")
    driver = Driver(root)
    driver.create(config_bytes)
    for data, address in boot.images():
        driver.load(config.name, data, address)
    driver.start(config.name)
    return 0


def main(root: str, board: str, argv: list[str] | None = None) -> int:
    """Entry point of the installed ``bin/jailhouse-cell-linux``."""
    try:
        return run(sys.argv[1:] if argv is None else argv, Path(root), board)
    except HelperExit as exc:
        return exc.code
    except KeyboardInterrupt:
        return 1
    finally:
        sys.stdout.flush()


def install(root: Path, board: str) -> Path:
    """Write ``bin/jailhouse-cell-linux``, the stand-in ``linux-loader.bin`` (in-tree and
    installed locations) and a guest DTB (:data:`INMATE_DTB_PATH`) under ``root``."""
    import_root = spawn.import_root()
    script = root / "bin" / "jailhouse-cell-linux"
    script.parent.mkdir(parents=True, exist_ok=True)
    text = (f"#!{sys.executable} -I\nimport sys\n"
            + (f"sys.path.insert(0, {import_root!r})\n" if import_root else "")
            + f"from {spawn.module('cell_linux')} import main\n"
            f"sys.exit(main({str(root)!r}, {board!r}))\n")
    tmp = script.with_name(".jailhouse-cell-linux.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, script)
    for path in (LOADER_PATH, INSTALLED_LOADER_PATH):
        loader = root / path
        loader.parent.mkdir(parents=True, exist_ok=True)
        loader.write_bytes(loader_image())
    dtb = root / INMATE_DTB_PATH
    dtb.parent.mkdir(parents=True, exist_ok=True)
    dtb.write_bytes(fdt.serialize(fdt.inmate_tree()))
    return script
