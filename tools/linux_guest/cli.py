"""``python -m tools.linux_guest {fetch,build,run} [--cache DIR]``.

* ``fetch``: download Debian's arm64 kernel and busybox-static with apt into the cache
  (only when missing; ``--refresh`` asks apt for the newest versions). Needs root the first
  time, to add the ``arm64`` architecture to dpkg and update apt's lists.
* ``build``: ``fetch``, then build the initramfs. Prints ``kernel <path>`` and ``initrd <path>``.
* ``run``: ``build``, then boot the guest under QEMU with the serial console on this terminal
  (Ctrl-A x quits QEMU; ``poweroff`` in the guest ends it).
* ``zic``: ``build``, then make a Linux ZIC of it with mkzic: ``--bundle DIR`` (OCI bundle)
  and/or ``--archive FILE [--name NAME]`` (OCI image archive); prints mkzic's lines.
  ``--net`` asks for a network link (boot description ``"net": "true"``): runphi then adds
  ``runphi.net=<address>/<prefix>[,<gateway>]`` to the kernel command line and the guest
  serves a known page on port 80 (see :mod:`tools.linux_guest.initramfs`). The image is the
  same with or without it.

The cache is ``--cache DIR``, else ``$RUNPHI_CACHE``, else ``$XDG_CACHE_HOME/runphi``,
else ``~/.cache/runphi``. Errors: one ``linux_guest: ...`` line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from tools.linux_guest.errors import LinuxGuestError
from tools.linux_guest.guest import DEFAULT_KERNEL_PACKAGE, build, default_cache_dir, fetch, qemu_argv


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage mistakes: one line, exit 1."""
        self.exit(1, f"linux_guest: {message}: see python -m tools.linux_guest --help\n")


def _memory(text: str) -> int:
    if not text.isdigit() or int(text) < 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in MiB of at least 32")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache", type=Path, default=None,
                        help=f"cache directory (default {default_cache_dir()})")
    common.add_argument("--kernel-package", default=DEFAULT_KERNEL_PACKAGE,
                        help="Debian arm64 kernel package or metapackage (default %(default)s)")
    common.add_argument("--refresh", action="store_true",
                        help="ask apt for the newest versions instead of using the cache")
    parser = _Parser(prog="python -m tools.linux_guest",
                     description="Debian's arm64 kernel + a busybox initramfs for Linux ZICs.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    verbs.add_parser("fetch", parents=[common], help="download the kernel and busybox")
    verbs.add_parser("build", parents=[common], help="fetch, then build the initramfs")
    run = verbs.add_parser("run", parents=[common], help="build, then boot it under QEMU here")
    run.add_argument("--memory", type=_memory, default=96, help="guest RAM in MiB (default 96)")
    run.add_argument("--append", default="console=ttyAMA0", help="kernel command line")
    zic = verbs.add_parser("zic", parents=[common], help="build, then make a Linux ZIC with mkzic")
    zic.add_argument("--bundle", type=Path, help="write an OCI runtime bundle here (must not exist)")
    zic.add_argument("--archive", type=Path, help="write an OCI image archive here")
    zic.add_argument("--name", default="linux-guest:latest", help="image name (default %(default)s)")
    zic.add_argument("--memory", type=_memory, default=128, help="guest RAM in MiB (default 128)")
    zic.add_argument("--vcpus", type=int, default=1, help="guest CPUs (default 1)")
    zic.add_argument("--dtb", type=Path, help="guest device tree (default: the simulator board's)")
    zic.add_argument("--cmdline", help="kernel command line (bundle annotation org.runphi.linux.cmdline)")
    zic.add_argument("--terminal", action="store_true", help="bundle: process.terminal true")
    zic.add_argument("--net", action="store_true",
                     help='ask runphi for a network link (boot description "net": "true")')
    zic.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                     help="bundle annotation (repeatable)")
    return parser


def _run_verb(args: argparse.Namespace) -> int:
    if args.verb == "fetch":
        fetched = fetch(args.cache, args.kernel_package, args.refresh)
        print(f"kernel {fetched.kernel_package} {fetched.kernel_version}")
        print(f"busybox {fetched.busybox_version}")
        return 0
    guest = build(args.cache, args.kernel_package, args.refresh)
    if args.verb == "build":
        print(f"kernel {guest.kernel}")
        print(f"initrd {guest.initrd}")
        return 0
    if args.verb == "zic":
        return _make_zic(args, guest)
    argv = qemu_argv(guest, args.memory, args.append, monitor=True)
    if shutil.which(argv[0]) is None:
        raise LinuxGuestError(f"{argv[0]} not found", "install qemu-system-arm")
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _make_zic(args: argparse.Namespace, guest) -> int:
    from tools.linux_guest.zic import default_dtb, mkzic_argv
    from tools.mkzic.cli import main as mkzic

    if args.bundle is None and args.archive is None:
        raise LinuxGuestError("zic needs an output", "pass --bundle DIR and/or --archive FILE")
    dtb = args.dtb or default_dtb(args.cache or default_cache_dir())
    return mkzic(mkzic_argv(guest, dtb, memory_mib=args.memory, vcpus=args.vcpus, bundle=args.bundle,
                            archive=args.archive, name=args.name, terminal=args.terminal,
                            cmdline=args.cmdline, annotations=args.annotation, net=args.net))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _run_verb(args)
    except LinuxGuestError as exc:
        print(exc.line(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
