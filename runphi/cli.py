"""runphi's command line: runc's syntax, parsed here and dispatched to a verb module.

Accepted exactly as containerd's shim and humans write it (oci-runtime.md §1.3):
global flags before the verb, ``--x v`` and ``--x=v``, the single-dash long form
of every long flag (``-no-subreaper``), runc's short aliases, signals as numbers
or names with or without ``SIG``.

Dispatch: verbs that name an existing container are routed by ownership — a
runphi record under ``<root>/<id>/`` means runphi handles it, anything else is
``exec``ed into the real runc with the original argv (``runphi.forward``).
Then ``runphi.verbs.<module>.run(args, ctx) -> int`` is imported lazily and
called. A :class:`~runphi.errors.RunphiError` becomes one error log line, the
bare message on stderr when logging elsewhere, and exit status 1.

Lean: only argparse, msgspec and the stdlib are imported at module level.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Callable, NoReturn

from runphi import OCI_SPEC_VERSION, __version__
from runphi.errors import ContainerNotFound, InvalidId, RunphiError, UsageError
from runphi.log import LOG_FORMATS

#: runc's id charset (Go ``^[\w+-\.]+$``: the range ``+-.`` includes ``,``).
_ID_RE = re.compile(r"[A-Za-z0-9_+,.\-]+")
MAX_ID_LENGTH = 255


def validate_id(container_id: str) -> str:
    """Return ``container_id`` if it is a valid id (runc's rules + a length limit)."""
    if (not _ID_RE.fullmatch(container_id) or container_id in (".", "..")
            or len(container_id) > MAX_ID_LENGTH):
        raise InvalidId(
            f"invalid container id {container_id!r}: use letters, digits and _ + , - . only "
            f"(no '/', not '.' or '..', at most {MAX_ID_LENGTH} characters)",
            container_id=None)
    return container_id


def parse_signal(text: str) -> int:
    """Signal number from ``15``, ``TERM``, ``SIGTERM`` or ``term``; ArgumentTypeError if none."""
    import signal

    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
        raise argparse.ArgumentTypeError(f"invalid signal {text!r}: numbers go from 1 to {signal.NSIG - 1}")
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"invalid signal {text!r}: use a number (15) or a name (TERM, SIGKILL)") from None


def _terminal_columns() -> int:
    """What ``shutil.get_terminal_size().columns`` says, without importing shutil.

    argparse builds a help formatter on every ``add_argument`` and its default
    width imports shutil (and with it bz2, lzma, zlib): a few ms on every verb.
    """
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    stdout = sys.__stdout__
    if stdout is None:
        return 80
    try:
        return os.get_terminal_size(stdout.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's default formatter at argparse's default width (terminal columns - 2)."""
    return argparse.HelpFormatter(prog, width=_terminal_columns() - 2)


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing and exiting 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _help_formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _flag(parser: argparse.ArgumentParser, name: str, *shorts: str, **kwargs) -> None:
    """Add ``--name`` plus its single-dash long form and short aliases."""
    kwargs.setdefault("dest", name.replace("-", "_"))
    parser.add_argument(f"--{name}", f"-{name}", *shorts, **kwargs)


def _bool(parser: argparse.ArgumentParser, name: str, *shorts: str, help: str = "") -> None:
    _flag(parser, name, *shorts, action="store_true", help=help)


def _id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("container_id", metavar="ID", help="container id")


# --- per-verb parsers -------------------------------------------------------------

def _create_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "bundle", "-b", default=".", help="bundle directory (default: cwd)")
    _flag(p, "console-socket", help="AF_UNIX socket that receives the pty master")
    _flag(p, "pid-file", help="file to write the container's pid to")
    _bool(p, "no-pivot")
    _bool(p, "no-new-keyring")
    _flag(p, "preserve-fds", type=int, default=0, help="extra fds passed to the container")


def _p_create(p):
    _create_flags(p)
    _id(p)


def _p_run(p):
    _create_flags(p)
    _bool(p, "detach", "-d", help="detach from the container")
    _bool(p, "keep", help="do not delete the container after it exits")
    _bool(p, "no-subreaper")
    _id(p)


def _p_id_only(p):
    _id(p)


def _p_kill(p):
    _bool(p, "all", "-a", help="signal every process of the container")
    _id(p)
    p.add_argument("signal", nargs="?", default=15, type=parse_signal,
                   help="signal number or name (default SIGTERM)")


def _p_delete(p):
    _bool(p, "force", "-f", help="kill the container first if it is not stopped")
    _id(p)


def _p_list(p):
    _flag(p, "format", "-f", choices=("table", "json"), default="table")
    _bool(p, "quiet", "-q", help="print ids only")


def _p_ps(p):
    _flag(p, "format", "-f", choices=("table", "json"), default="table")
    _id(p)
    p.add_argument("ps_args", nargs=argparse.REMAINDER, help="arguments for ps (default -ef)")


def _p_events(p):
    _flag(p, "interval", default="5s", help="stats interval (Go duration, e.g. 5s)")
    _bool(p, "stats", help="print one stats record and exit")
    _id(p)


def _p_metrics(p):
    _flag(p, "format", choices=("prometheus", "openmetrics"), default="prometheus",
          help="text format of the one-shot output (the exporter follows the scraper's Accept)")
    _flag(p, "listen", metavar="ADDR:PORT", default="",
          help="serve /metrics on ADDR:PORT (ADDR defaults to 127.0.0.1) instead of printing once")


def _p_top(p):
    _flag(p, "interval", default="1", help="seconds between refreshes")
    _bool(p, "once", help="print one plain-text view and exit (the default when stdout is not a terminal)")


def _p_spec(p):
    _flag(p, "bundle", "-b", default=".", help="where to write config.json")
    _bool(p, "rootless")


def _p_exec(p):
    _flag(p, "console-socket")
    _flag(p, "cwd")
    _flag(p, "env", "-e", action="append", default=[])
    _bool(p, "tty", "-t")
    _flag(p, "user", "-u")
    _flag(p, "additional-gids", "-g", action="append", default=[])
    _flag(p, "process", "-p")
    _bool(p, "detach", "-d")
    _flag(p, "pid-file")
    _flag(p, "process-label")
    _flag(p, "apparmor")
    _bool(p, "no-new-privs")
    _flag(p, "cap", "-c", action="append", default=[])
    _flag(p, "preserve-fds", type=int, default=0)
    _flag(p, "cgroup", action="append", default=[])
    _bool(p, "ignore-paused")
    _id(p)
    p.add_argument("command", nargs=argparse.REMAINDER)


def _p_update(p):
    _flag(p, "resources", "-r")
    for name in ("blkio-weight", "cpu-period", "cpu-quota", "cpu-share", "cpu-rt-period",
                 "cpu-rt-runtime", "cpuset-cpus", "cpuset-mems", "kernel-memory",
                 "kernel-memory-tcp", "memory", "memory-reservation", "memory-swap",
                 "pids-limit", "l3-cache-schema", "mem-bw-schema"):
        _flag(p, name)
    _id(p)


def _criu_flags(p) -> None:
    for name in ("image-path", "work-path", "parent-path", "manage-cgroups-mode", "lsm-profile",
                 "lsm-mount-context", "status-fd", "page-server"):
        _flag(p, name)
    for name in ("tcp-established", "ext-unix-sk", "shell-job", "file-locks", "lazy-pages",
                 "auto-dedup"):
        _bool(p, name)
    _flag(p, "empty-ns", action="append", default=[])


def _p_checkpoint(p):
    _criu_flags(p)
    _bool(p, "leave-running")
    _bool(p, "pre-dump")
    _id(p)


def _p_restore(p):
    _criu_flags(p)
    _flag(p, "console-socket")
    _flag(p, "bundle", "-b", default=".")
    _bool(p, "detach", "-d")
    _flag(p, "pid-file")
    _bool(p, "no-subreaper")
    _bool(p, "no-pivot")
    _id(p)


def _p_cell_config(p):
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help="OCI bundle of a ZIC")
    _flag(p, "platform", help="platform template name or path (default: from runphi.toml)")
    _flag(p, "format", choices=("c", "text", "binary"), default="text")
    _flag(p, "output", "-o", help="write here instead of stdout")
    _flag(p, "decode", metavar="FILE", help="decode an existing .cell file instead")
    _flag(p, "profile", help="with --decode: the cell format profile (default: detected from the file)")


def _p_logs(p):
    _bool(p, "follow", "-f", help="keep printing new console output")
    _id(p)


def _p_none(p):
    pass


class Verb:
    """One verb: its parser builder, its module, and how it is routed."""

    def __init__(self, build: Callable, module: str, summary: str, *, by_id: bool = False) -> None:
        self.build = build
        self.module = module
        self.summary = summary
        #: Routed by ownership of the id: no runphi record → the real runc.
        self.by_id = by_id


VERBS: dict[str, Verb] = {
    "create": Verb(_p_create, "create", "create a container (ZIC or, forwarded, a plain one)"),
    "start": Verb(_p_id_only, "start", "start a created container", by_id=True),
    "run": Verb(_p_run, "run", "create and start a container"),
    "state": Verb(_p_id_only, "state", "print the OCI state of a container", by_id=True),
    "kill": Verb(_p_kill, "kill", "send a signal to a container", by_id=True),
    "delete": Verb(_p_delete, "delete", "delete a container and its resources", by_id=True),
    "list": Verb(_p_list, "list", "list runphi's and runc's containers"),
    "ps": Verb(_p_ps, "ps", "host processes of a container", by_id=True),
    "events": Verb(_p_events, "events", "stream a container's events and statistics", by_id=True),
    "features": Verb(_p_none, "features", "print runphi's features as JSON"),
    "spec": Verb(_p_spec, "spec", "write an example ZIC config.json"),
    "exec": Verb(_p_exec, "unsupported", "run a process in a container (runc only)", by_id=True),
    "pause": Verb(_p_id_only, "unsupported", "pause a container (runc only)", by_id=True),
    "resume": Verb(_p_id_only, "unsupported", "resume a container (runc only)", by_id=True),
    "update": Verb(_p_update, "unsupported", "update resources (runc only)", by_id=True),
    "checkpoint": Verb(_p_checkpoint, "unsupported", "checkpoint a container (runc only)", by_id=True),
    "restore": Verb(_p_restore, "unsupported", "restore a container (runc only)", by_id=True),
    "cell-config": Verb(_p_cell_config, "cell_config", "render or decode a ZIC's Jailhouse cell config"),
    "logs": Verb(_p_logs, "logs", "print a ZIC's console log"),
    "metrics": Verb(_p_metrics, "metrics", "print or serve the node's ZIC metrics (Prometheus)"),
    "top": Verb(_p_top, "top", "a live view of the node's ZICs"),
}


def _global_parser() -> _Parser:
    p = _Parser(prog="runphi", add_help=False)
    _flag(p, "root", help="state root (default: <state_dir>/default)")
    _flag(p, "log", help="append log lines to this file (default: stderr)")
    _flag(p, "log-format", default="text")
    _bool(p, "debug")
    _bool(p, "systemd-cgroup")
    _flag(p, "criu")
    _flag(p, "rootless", help="true|false|auto (accepted; cgroup errors do not apply to cells)")
    _bool(p, "version", "-v")
    _bool(p, "help", "-h")
    p.add_argument("verb", nargs="?")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def verb_parser(name: str) -> _Parser:
    """The argparse parser of one verb (built on demand: a verb call builds only its own)."""
    verb = VERBS[name]
    parser = _Parser(prog=f"runphi {name}", description=verb.summary)
    verb.build(parser)
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace | None]:
    """Split argv into (global options, verb arguments); raises :class:`UsageError`."""
    options = _global_parser().parse_args(argv)
    if options.log_format not in LOG_FORMATS:
        raise UsageError(f"invalid log-format: {options.log_format}")
    if options.version or options.help or not options.verb:
        return options, None
    if options.verb not in VERBS:
        raise UsageError(f"unknown command {options.verb!r} (see runphi --help for the list)")
    args = verb_parser(options.verb).parse_args(options.rest)
    args.verb = options.verb
    if getattr(args, "container_id", None) is not None:
        validate_id(args.container_id)
    return options, args


def _help_text() -> str:
    lines = ["usage: runphi [global flags] COMMAND [flags] [args]", "",
             "An OCI runtime for partitioned containers (ZICs); plain containers go to runc.",
             "", "commands:"]
    lines += [f"  {name:<12} {verb.summary}" for name, verb in VERBS.items()]
    lines += ["", "global flags: --root DIR, --log FILE, --log-format text|json, --debug,",
              "              --systemd-cgroup, --criu PATH, --rootless, --version, --help",
              "", "runphi COMMAND --help shows the flags of one command."]
    return "\n".join(lines) + "\n"


def _version_text(backend: str) -> str:
    return f"runphi version {__version__}\nspec: {OCI_SPEC_VERSION}\nbackend: {backend}\n"


def _fallback_log(argv: list[str]):
    """Best-effort logger when the command line itself is bad: honour --log/--log-format."""
    from runphi.log import VerbLog

    path, fmt = None, "text"
    for i, arg in enumerate(argv):
        for name in ("log", "log-format"):
            for prefix in (f"--{name}", f"-{name}"):
                value = None
                if arg == prefix and i + 1 < len(argv):
                    value = argv[i + 1]
                elif arg.startswith(prefix + "="):
                    value = arg[len(prefix) + 1:]
                if value is not None:
                    if name == "log":
                        path = value
                    elif value in LOG_FORMATS:
                        fmt = value
    return VerbLog(path, fmt, "error")


def _load_verb_module(verb: str):
    module_name = f"runphi.verbs.{VERBS[verb].module}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise RunphiError(f"the {verb!r} command is not available in this runphi build yet "
                          f"({module_name} is missing)") from None


def _dispatch(options: argparse.Namespace, args: argparse.Namespace, argv: list[str]) -> int:
    from runphi.config import load_runtime_config
    from runphi.context import Context, GlobalOptions
    from runphi.log import resolve_level

    config = load_runtime_config()
    global_options = GlobalOptions(root=options.root, log=options.log, log_format=options.log_format,
                                   debug=options.debug, systemd_cgroup=options.systemd_cgroup,
                                   criu=options.criu, rootless=options.rootless)
    ctx = Context(global_options, config, argv, resolve_level(options.debug, config.log.level))
    try:
        if VERBS[args.verb].by_id and not ctx.store.holds(args.container_id):
            from runphi.forward import forward_unowned

            return forward_unowned(ctx, args)
        return _load_verb_module(args.verb).run(args, ctx)
    except RunphiError as error:
        if error.container_id is None:
            error.container_id = getattr(args, "container_id", None)
        ctx.log.fatal(error)
        return error.exit_code
    except OSError as exc:  # the environment (permissions, full disk), not the input
        container_id = getattr(args, "container_id", None)
        subject = f" container {container_id}" if container_id else ""
        where = f": {exc.filename}" if exc.filename else ""
        ctx.log.fatal(RunphiError(f"runphi {args.verb}{subject} failed: {exc.strerror or exc}{where}",
                                  container_id=container_id))
        return 1


def run_cli(argv: list[str]) -> int:
    """Run one runphi command line; returns the exit status."""
    try:
        options, args = parse(argv)
        if options.version:
            from runphi.config import load_runtime_config

            sys.stdout.write(_version_text(load_runtime_config().backend))
            return 0
        if args is None:
            sys.stdout.write(_help_text())
            return 0
        return _dispatch(options, args, argv)
    except RunphiError as error:
        _fallback_log(argv).fatal(error)
        return error.exit_code
    except SystemExit as exit_request:  # argparse's own --help of a verb
        return exit_request.code if isinstance(exit_request.code, int) else 0
    except KeyboardInterrupt:
        return 130


def main() -> NoReturn:
    """Console-script entry point."""
    code = run_cli(sys.argv[1:])
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.exit(code)
