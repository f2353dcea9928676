"""``runphi-mkzic`` (``python -m tools.mkzic`` in the checkout): build a ZIC as an OCI bundle
and/or an OCI image archive.

Examples::

    python -m tools.mkzic --inmate hello.bin --os-var baremetal \\
        --starting-vaddress 0x70000000 --memory 16 --vcpus 1 \\
        --bundle out/hello --archive out/hello.tar --name hello:latest

    python -m tools.mkzic --config boot/config.json --kernel Image --dtb guest.dtb \\
        --initrd rootfs.cpio --archive linux.tar --name linux-guest:1.0

Prints one line per output: ``bundle <dir>`` and ``image <full name> <manifest digest> <archive>``.
Bad input: one ``mkzic: ...`` line on stderr, exit 1, nothing written.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import msgspec

from runphi.image import BootDescriptionFile, VcpuPin

from .boot import Description, decode_description, format_address
from .bundle import Resources, runtime_spec, write_bundle
from .errors import MkzicError
from .image import DEFAULT_ARCHITECTURE, build_image_archive, write_archive
from .names import parse_image_name
from .zic import ZicContents, assemble

#: The installed command; ``python -m <package>`` passes its own name instead.
PROG = "runphi-mkzic"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage mistakes are bad input too: one line, exit 1."""
        self.exit(1, f"mkzic: {message}: see {self.prog} --help\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _address(text: str) -> str:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (write 0x70000000)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return format_address(value)


def _pinning(text: str) -> list[VcpuPin]:
    pins = []
    for item in text.split(","):
        vcpu, sep, pcpu = item.partition(":")
        if not sep or not vcpu.isdigit() or not pcpu.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not VCPU:PCPU (e.g. 0:2,1:3)")
        pins.append(VcpuPin(vcpu=int(vcpu), pcpu=int(pcpu)))
    return pins


def _cpuset(text: str) -> str:
    for item in text.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and (not high.isdigit() or int(high) < int(low))):
            raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list (e.g. 2-3 or 1,3)")
    return text


def _architecture(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an OCI architecture name (arm64, amd64, ...)")
    return text


def _annotation(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The mkzic command line (also the source of ``--help``), as invoked by ``prog``."""
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,
        description="Build a ZIC (partitioned container) from a guest image and a boot description, "
        "as an OCI runtime bundle (--bundle) and/or an OCI image archive for `ctr image import` (--archive).",
    )
    guest = parser.add_argument_group("guest files (placed under /boot/ in the image)")
    guest.add_argument("--inmate", type=Path, metavar="FILE", help="raw guest binary (Linux guests: the kernel Image)")
    guest.add_argument("--kernel", type=Path, metavar="FILE", help="Linux kernel, when separate from the inmate")
    guest.add_argument("--dtb", type=Path, metavar="FILE", help="device tree for a Linux guest")
    guest.add_argument("--initrd", type=Path, metavar="FILE", help="initramfs for a Linux guest")

    boot = parser.add_argument_group("boot description (/boot/config.json); flags override --config")
    boot.add_argument("--config", type=Path, metavar="FILE", help="start from this boot description")
    boot.add_argument("--os-var", metavar="NAME", help="linux, zephyr, baremetal, freertos, ...")
    boot.add_argument("--starting-vaddress", type=_address, metavar="ADDR", help="load and entry address, e.g. 0x70000000")
    boot.add_argument("--memory", type=_positive_int, metavar="MIB", help="guest RAM in MiB")
    boot.add_argument("--vcpus", type=_positive_int, metavar="N", help="number of CPUs")
    boot.add_argument("--vcpu-pinning", type=_pinning, metavar="V:P,...", help="explicit physical CPUs, e.g. 0:2,1:3")
    boot.add_argument("--net", metavar="VALUE", help="networking (none/no = no link)")
    boot.add_argument("--netconf", metavar="NAME", help="network name on the root side")
    boot.add_argument("--rpu", action="store_true", help="run on a real-time core (sets rpu_req)")

    bundle = parser.add_argument_group("OCI runtime bundle")
    bundle.add_argument("--bundle", type=Path, metavar="DIR", help="write a bundle here (must not exist)")
    bundle.add_argument("--cpus", type=_positive_float, metavar="N", help="linux.resources CPU limit (quota/period)")
    bundle.add_argument("--cpuset", type=_cpuset, metavar="LIST", help="linux.resources.cpu.cpus, e.g. 2-3")
    bundle.add_argument("--memory-limit", type=_positive_int, metavar="MIB", help="linux.resources memory limit in MiB")
    bundle.add_argument("--annotation", type=_annotation, action="append", default=[], metavar="KEY=VALUE",
                        help="config.json annotation, e.g. org.runphi.runtime=runphi (repeatable)")
    bundle.add_argument("--terminal", action="store_true", help="set process.terminal (for `-t` style runs)")
    bundle.add_argument("--hostname", metavar="NAME", help="process hostname (default: the bundle directory name)")

    image = parser.add_argument_group("OCI image archive")
    image.add_argument("--archive", type=Path, metavar="FILE", help="write an image archive (tar) here")
    image.add_argument("--name", metavar="NAME", help="image name, e.g. hello:1.0 (stored as docker.io/library/hello:1.0)")
    image.add_argument("--arch", type=_architecture, default=DEFAULT_ARCHITECTURE, metavar="ARCH", help="image architecture (default %(default)s)")
    return parser


def _description(args: argparse.Namespace) -> Description:
    """The starting description (``--config`` or empty) with the boot flags applied."""
    if args.config is None:
        base = Description(known=BootDescriptionFile())
    else:
        try:
            data = args.config.read_bytes()
        except OSError as exc:
            raise MkzicError(f"cannot read boot description {args.config}: {exc.strerror}", "check the path") from None
        base = decode_description(data, str(args.config))
    overrides = {
        "os_var": args.os_var,
        "starting_vaddress": args.starting_vaddress,
        "memory": args.memory,
        "vcpus": args.vcpus,
        "vcpu_pinning": args.vcpu_pinning,
        "net": args.net,
        "netconf": args.netconf,
        "rpu_req": True if args.rpu else None,
    }
    given = {field: value for field, value in overrides.items() if value is not None}
    return Description(known=msgspec.structs.replace(base.known, **given), passthrough=base.passthrough)


def _guest_files(args: argparse.Namespace) -> dict[str, Path]:
    files = {"inmate": args.inmate, "kernel": args.kernel, "dtb": args.dtb, "initrd": args.initrd}
    return {field: path for field, path in files.items() if path is not None}


def _check_outputs(args: argparse.Namespace) -> None:
    if args.bundle is None and args.archive is None:
        raise MkzicError("nothing to build", "give --bundle DIR and/or --archive FILE")
    if args.archive is not None and args.name is None:
        raise MkzicError("--archive needs an image name", "add --name NAME[:TAG]")
    bundle_only = {"--cpus": args.cpus, "--cpuset": args.cpuset, "--memory-limit": args.memory_limit,
                   "--hostname": args.hostname, "--annotation": args.annotation or None,
                   "--terminal": args.terminal or None}
    stray = [flag for flag, value in bundle_only.items() if value is not None]
    if args.bundle is None and stray:
        raise MkzicError(f"{', '.join(stray)} only apply to a bundle", "add --bundle DIR or drop them")


def _build(args: argparse.Namespace) -> list[str]:
    """Do the work for parsed ``args``; return the lines to print."""
    _check_outputs(args)
    name = None if args.name is None else parse_image_name(args.name)
    zic: ZicContents = assemble(_description(args), _guest_files(args))
    lines = []
    archive = None if name is None else build_image_archive(zic, name, args.arch)
    if args.bundle is not None:
        spec = runtime_spec(
            zic,
            hostname=args.hostname or args.bundle.absolute().name,
            resources=Resources(cpus=args.cpus, cpuset=args.cpuset, memory_mib=args.memory_limit),
            annotations=dict(args.annotation),
            terminal=args.terminal,
        )
        lines.append(f"bundle {write_bundle(args.bundle, zic, spec)}")
    if archive is not None:
        try:
            path = write_archive(args.archive, archive)
        except MkzicError:
            if args.bundle is not None:
                shutil.rmtree(args.bundle.absolute())  # all or nothing: drop the bundle just written
            raise
        lines.append(f"image {archive.name.full()} {archive.manifest.digest} {path}")
    return lines


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point: build what the flags ask for; 0 on success, 1 with one error line otherwise."""
    args = build_parser(prog).parse_args(argv)
    try:
        lines = _build(args)
    except MkzicError as exc:
        print(exc.line(), file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
