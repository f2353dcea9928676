"""``containerd-shim-runphi-v2``: containerd's runtime ``io.containerd.runphi.v2`` (DESIGN §13).

Parses containerd's shim flags (Go style, one dash) and dispatches, nothing else:

* ``start``: :func:`runphi.shim.bootstrap.start` — decide ZIC or plain, print an address;
* ``delete``: :func:`runphi.shim.cleanup.delete` — clean up after a task's connection closed;
* ``-v``: the version.

Lean: no trio, no protobuf on the ``start`` path of a plain container.
"""

from __future__ import annotations

import argparse
import sys

from runphi import __version__
from runphi.errors import RunphiError


class ShimFlags(argparse.Namespace):
    """containerd's shim command line (shim-v2.md §2.1, §2.4)."""

    namespace: str
    address: str
    publish_binary: str
    id: str
    bundle: str
    socket: str
    debug: bool
    version: bool
    action: str | None


def parse_flags(argv: list[str]) -> ShimFlags:
    """The flags containerd passes (unknown ones are an error, as with Go's flag package)."""
    parser = argparse.ArgumentParser(prog="containerd-shim-runphi-v2", add_help=True, allow_abbrev=False)
    parser.add_argument("-namespace", default="")
    parser.add_argument("-address", default="")
    parser.add_argument("-publish-binary", dest="publish_binary", default="")
    parser.add_argument("-id", default="")
    parser.add_argument("-bundle", default="")
    parser.add_argument("-socket", default="")
    parser.add_argument("-debug", action="store_true")
    parser.add_argument("-v", dest="version", action="store_true")
    parser.add_argument("action", nargs="?", choices=("start", "delete"))
    return parser.parse_args(argv, namespace=ShimFlags())


def main(argv: list[str] | None = None) -> int:
    """Run the action containerd asked for; one error line and exit 1 when it cannot."""
    flags = parse_flags(sys.argv[1:] if argv is None else argv)
    if flags.version:
        print(f"containerd-shim-runphi-v2:\n  Version: {__version__}\n  Runtime: io.containerd.runphi.v2")
        return 0
    if flags.action is None:
        sys.stderr.write("containerd-shim-runphi-v2: containerd runs this shim with `start` or `delete`\n")
        return 1
    try:
        if flags.action == "start":
            from runphi.shim.bootstrap import start

            return start(flags)
        from runphi.shim.cleanup import delete

        return delete(flags)
    except RunphiError as error:
        # `start`'s output is read combined; this one line is what containerd reports.
        sys.stderr.write(f"{error.message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
