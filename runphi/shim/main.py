"""``containerd-shim-runphi-v2``: containerd's runtime ``io.containerd.runphi.v2`` (DESIGN §13).

Parses containerd's shim flags (Go style, one dash) and dispatches, nothing else:

* ``start``: :func:`runphi.shim.bootstrap.start` — decide ZIC or plain, print an address;
* ``delete``: :func:`runphi.shim.cleanup.delete` — clean up after a task's connection closed;
* ``-v``: the version.

Lean: no trio, no protobuf on the ``start`` path of a plain container.
"""

from __future__ import annotations

import sys

from runphi import __version__
from runphi.errors import RunphiError, UsageError

#: Flags taking a value, by name (Go's flag package: ``-name value`` or ``-name=value``).
VALUE_FLAGS = {"namespace": "namespace", "address": "address", "publish-binary": "publish_binary",
               "id": "id", "bundle": "bundle", "socket": "socket"}
#: Boolean flags (``-name``, ``-name=true``, ``-name=false``).
BOOL_FLAGS = {"debug": "debug", "v": "version"}
ACTIONS = ("start", "delete")


class ShimFlags:
    """containerd's shim command line (shim-v2.md §2.1, §2.4)."""

    def __init__(self) -> None:
        self.namespace = ""
        self.address = ""
        self.publish_binary = ""
        self.id = ""
        self.bundle = ""
        self.socket = ""
        self.debug = False
        self.version = False
        self.action: str | None = None


def parse_flags(argv: list[str]) -> ShimFlags:
    """containerd's flags, parsed as Go's flag package does (one or two dashes, ``-name=value``,
    flags before the action); UsageError naming what is wrong. argparse is not used: it
    cannot read ``-debug=false`` and costs every ``start`` and ``delete`` a few ms."""
    flags = ShimFlags()
    args = list(argv)
    while args and args[0].startswith("-") and args[0] not in ("-", "--"):
        name, has_value, value = args.pop(0).lstrip("-").partition("=")
        if name in BOOL_FLAGS:
            if has_value and value not in ("true", "false", "1", "0"):
                raise UsageError(f"invalid boolean value {value!r} for flag -{name}")
            setattr(flags, BOOL_FLAGS[name], not has_value or value in ("true", "1"))
        elif name in VALUE_FLAGS:
            if not has_value:
                if not args:
                    raise UsageError(f"flag needs an argument: -{name}")
                value = args.pop(0)
            setattr(flags, VALUE_FLAGS[name], value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
    if args and args[0] == "--":
        args.pop(0)
    if len(args) > 1 or (args and args[0] not in ACTIONS):
        raise UsageError(f"unexpected arguments {' '.join(args)!r}: the action is `start` or `delete`")
    flags.action = args[0] if args else None
    return flags


def main(argv: list[str] | None = None) -> int:
    """Run the action containerd asked for; one error line and exit 1 when it cannot."""
    try:
        flags = parse_flags(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        sys.stderr.write(f"containerd-shim-runphi-v2: {error.message}\n")
        return 2
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
