"""``jailhouse-sim``: bring a simulated Jailhouse board up and down.

    jailhouse-sim up --root DIR [--board NAME|FILE] [--engine script|qemu] [--disabled]
    jailhouse-sim down --root DIR
    jailhouse-sim status --root DIR [--json]
    jailhouse-sim inject --root DIR [--errno E] [--count N] [--delay-ms MS] [--op OP] [--clear]
    jailhouse-sim kill --root DIR
    jailhouse-sim serve --root DIR ...      (the daemon itself, in the foreground)
    jailhouse-sim boards

Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

from . import spawn
from .layout import SimLayout

PROG = "jailhouse-sim"
STOP_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0


class CliError(Exception):
    """A user-facing failure: printed as one line, exit 1."""


# ---- talking to a daemon --------------------------------------------------------------------


def request(layout: SimLayout, message: dict, timeout: float = 10.0) -> dict:
    """Send one request to the daemon and return its decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(layout.socket))
        sock.sendall(json.dumps(message).encode())
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    if not chunks:
        raise ConnectionError("daemon closed the connection without replying")
    return json.loads(b"".join(chunks))


def daemon_pid(layout: SimLayout) -> int | None:
    """The pid in the pid file if that process is alive (not a zombie), else None."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def query_status(layout: SimLayout) -> dict | None:
    """The running daemon's status, or None if no daemon answers at ``layout``."""
    try:
        return request(layout, {"op": "status"}, timeout=5.0)["status"]
    except (OSError, ConnectionError, KeyError, ValueError):
        return None


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait (on a pidfd, no polling) until ``pid`` exits; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable) or not process_alive(pid)
    finally:
        os.close(fd)


# ---- installation -----------------------------------------------------------------------------


def install_client(layout: SimLayout, rcpus: int) -> None:
    """Install the ``jailhouse`` tool: the stdlib-only Python client with this root baked in as
    ``libexec/jailhouse-sim/jailhouse.py``, and as ``bin/jailhouse`` the compiled client that has
    the daemon run that same code for it (``relay.py``) — or, with no C compiler here, the
    Python client itself."""
    from importlib import resources

    from .cclient import client_binary

    source = (resources.files(__package__) / "jailhouse_client.py").read_text()
    header = f"#!{sys.executable} -IS\nSIM_ROOT = {str(layout.root)!r}\nRCPUS = {rcpus}\n"
    script = (header + source).encode()
    _write_executable(layout.python_client, script)
    binary = client_binary()
    _write_executable(layout.bin_jailhouse, binary if binary is not None else script)


def _write_executable(target: Path, data: bytes) -> None:
    """Replace ``target`` atomically with an executable file holding ``data``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, target)


def install_cell_linux(root: Path, board: str) -> None:
    """Write the ``jailhouse cell linux`` helper and its ``linux-loader.bin`` under ``root``."""
    from .cell_linux import install

    install(root, board)


def install_system_config(layout: SimLayout, board) -> Path:
    from .cellfile import minimal_system_config

    path = layout.system_config(board.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(minimal_system_config(board.profile, board.arch_code))
    return path


def cleanup_leftovers(layout: SimLayout) -> None:
    """Remove what a dead daemon may have left: sockets, pid file, sysfs (its taps died with it), UART links."""
    import shutil

    for path in (layout.socket, layout.pid_file, layout.console_device):
        if path.exists() or path.is_symlink():
            path.unlink()
    shutil.rmtree(layout.sysfs, ignore_errors=True)
    shutil.rmtree(layout.pci_bus, ignore_errors=True)
    if layout.dev.is_dir():
        for link in layout.dev.glob("ttyAMA*"):
            if link.is_symlink():
                link.unlink()


def load_board_or_fail(name: str):
    from .board import BoardError, load_board

    try:
        return load_board(name)
    except BoardError as e:
        raise CliError(str(e)) from None


def check_engine(name: str) -> None:
    from .engines import EngineUnavailable, load_engine

    try:
        load_engine(name)
    except EngineUnavailable as e:
        raise CliError(str(e)) from None


def describe(status: dict) -> str:
    lines = [
        f"{PROG}: board {status['board']} up (engine {status['engine']}, pid {status['pid']}, "
        f"hypervisor {'enabled' if status['enabled'] else 'disabled'})",
        f"root       {status['root']}",
        f"jailhouse  {status['jailhouse']}",
        f"sysfs      {status['sysfs']}",
    ]
    if status["console"]:
        lines.append(f"console    {status['console']}  (root cell + hypervisor debug console)")
    for index, path in sorted(status["uarts"].items(), key=lambda kv: int(kv[0])):
        if int(index) != 0:
            lines.append(f"uart {index}     {path}")
    lines.append(f"hv console {SimLayout(status['root']).console_device}  (/dev/jailhouse: the hypervisor console)")
    lines.append(f"kernel log {status['kernel_log']}")
    lines.append(f"daemon log {status['daemon_log']}")
    return "\n".join(lines)


# ---- verbs ----------------------------------------------------------------------------------


def daemon_argv(layout: SimLayout, board: str, engine: str, enable: bool, ready_fd: int) -> list[str]:
    argv = [sys.executable, "-m", spawn.module("cli"), "serve", "--root", str(layout.root),
            "--board", board, "--engine", engine, "--ready-fd", str(ready_fd)]
    return argv + ([] if enable else ["--disabled"])


def wait_ready(read_fd: int, layout: SimLayout) -> None:
    """Block until the daemon reports readiness on the pipe (or dies)."""
    with os.fdopen(read_fd, "rb") as pipe:
        readable, _, _ = select.select([pipe], [], [], READY_TIMEOUT_S)
        message = pipe.readline().decode(errors="replace").strip() if readable else "timed out"
    if message == "ok":
        return
    if not message:
        try:
            tail = layout.daemon_log.read_text().strip().splitlines()[-1:]
        except OSError:
            tail = []
        message = f"the daemon exited during start-up ({tail[0] if tail else 'no log'})"
    raise CliError(f"cannot start the simulator in {layout.root}: {message}")


def cmd_up(args: argparse.Namespace) -> int:
    layout = SimLayout(args.root)
    board = load_board_or_fail(args.board)
    running = query_status(layout) if daemon_pid(layout) else None
    if running is not None:
        if running["board"] != board.name or running["engine"] != args.engine:
            raise CliError(
                f"a simulator with board {running['board']} (engine {running['engine']}) is already running in "
                f"{layout.root}; run `{PROG} down --root {layout.root}` first"
            )
        print(describe(running))
        return 0
    check_engine(args.engine)
    cleanup_leftovers(layout)
    layout.run.mkdir(parents=True, exist_ok=True)
    install_client(layout, board.rcpus)
    install_cell_linux(layout.root, args.board)
    install_system_config(layout, board)
    read_fd, write_fd = os.pipe()
    with open(layout.daemon_log, "ab") as log:
        subprocess.Popen(
            daemon_argv(layout, args.board, args.engine, not args.disabled, write_fd),
            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True, env=spawn.child_env(), cwd="/",
        )
    os.close(write_fd)
    wait_ready(read_fd, layout)
    status = query_status(layout)
    if status is None:
        raise CliError(f"the simulator in {layout.root} started but does not answer; see {layout.daemon_log}")
    print(describe(status))
    return 0


def stop_daemon(layout: SimLayout, pid: int) -> None:
    """Ask the daemon to stop, escalating to SIGTERM and SIGKILL; returns once it exited."""
    try:
        request(layout, {"op": "stop"}, timeout=STOP_TIMEOUT_S)
    except (OSError, ConnectionError, ValueError):
        pass
    if wait_exit(pid, STOP_TIMEOUT_S):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_exit(pid, STOP_TIMEOUT_S):
            return
    raise CliError(f"simulator daemon pid {pid} in {layout.root} did not exit after SIGKILL")


def cmd_down(args: argparse.Namespace) -> int:
    layout = SimLayout(args.root)
    pid = daemon_pid(layout)
    if pid is not None:
        stop_daemon(layout, pid)
    cleanup_leftovers(layout)
    print(f"{PROG}: {'stopped' if pid else 'not running'} in {layout.root}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    layout = SimLayout(args.root)
    pid = daemon_pid(layout)
    if pid is None:
        raise CliError(f"no simulator is running in {layout.root}")
    os.kill(pid, signal.SIGKILL)
    wait_exit(pid, STOP_TIMEOUT_S)
    print(f"{PROG}: killed daemon pid {pid} (the board vanished; `{PROG} down --root {layout.root}` cleans up)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    layout = SimLayout(args.root)
    status = query_status(layout) if daemon_pid(layout) else None
    if status is None:
        if args.json:
            print(json.dumps(None))
        raise CliError(f"no simulator is running in {layout.root}")
    print(json.dumps(status, indent=2) if args.json else describe(status))
    return 0


def parse_errno(text: str) -> int:
    if text.isdigit():
        return int(text)
    value = getattr(errno, text.upper(), None)
    if not isinstance(value, int):
        raise CliError(f"unknown errno {text!r} (use a name such as EBUSY or a number)")
    return value


def cmd_inject(args: argparse.Namespace) -> int:
    layout = SimLayout(args.root)
    message = {"op": "inject", "count": args.count, "errno": parse_errno(args.errno) if args.errno else 0,
               "delay_ms": args.delay_ms, "only": args.op, "clear": args.clear}
    if not (args.clear or message["errno"] or args.delay_ms):
        raise CliError("inject needs --errno, --delay-ms or --clear")
    try:
        reply = request(layout, message)
    except (OSError, ConnectionError) as e:
        raise CliError(f"no simulator answers in {layout.root}: {e}") from None
    if reply.get("errno"):
        raise CliError(f"inject rejected: {reply.get('message', os.strerror(reply['errno']))}")
    return 0


def cmd_boards(args: argparse.Namespace) -> int:
    from .board import load_board, shipped_boards

    for name in shipped_boards():
        print(f"{name:24} {load_board(name).description}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The daemon in the foreground (what ``up`` starts in the background)."""
    layout = SimLayout(args.root)
    ready_pipe = os.fdopen(args.ready_fd, "w") if args.ready_fd is not None else None

    def ready(error: str) -> None:
        nonlocal ready_pipe
        if ready_pipe is not None:
            ready_pipe.write((error or "ok") + "\n")
            ready_pipe.close()
            ready_pipe = None

    if args.pdeathsig:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    try:
        board = load_board_or_fail(args.board)
        if daemon_pid(layout) not in (None, os.getpid()):
            raise CliError(f"a simulator is already running in {layout.root}")
        import trio

        from .daemon import serve
        from .engines import EngineUnavailable

        try:
            trio.run(lambda: serve(layout, board, args.engine, enable=not args.disabled, ready=ready))
        except EngineUnavailable as e:
            raise CliError(str(e)) from None
    except CliError as e:
        ready(str(e))
        raise
    except OSError as e:
        ready(f"{e.strerror}: {e.filename}" if e.filename else str(e))
        raise CliError(str(e)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Simulated Jailhouse board for runphi tests.")
    sub = parser.add_subparsers(dest="verb", required=True)

    def with_root(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--root", required=True, help="simulator root directory")
        return p

    up = with_root(sub.add_parser("up", help="start a simulated board in the background"))
    serve = with_root(sub.add_parser("serve", help="run the simulator daemon in the foreground"))
    for p in (up, serve):
        p.add_argument("--board", default=os.environ.get("JAILHOUSE_SIM_BOARD", "sim-qemu-arm64"),
                       help="shipped board name or board TOML path (default sim-qemu-arm64)")
        p.add_argument("--engine", default=os.environ.get("JAILHOUSE_SIM_ENGINE", "script"),
                       choices=("script", "qemu"), help="default guest engine (default script)")
        p.add_argument("--disabled", action="store_true", help="leave the hypervisor disabled")
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--pdeathsig", action="store_true", help="exit when the parent process dies")
    with_root(sub.add_parser("down", help="stop the board and everything it started"))
    with_root(sub.add_parser("kill", help="SIGKILL the daemon (simulates a vanished board)"))
    status = with_root(sub.add_parser("status", help="show where everything is"))
    status.add_argument("--json", action="store_true")
    inject = with_root(sub.add_parser("inject", help="make upcoming jailhouse calls fail or stall"))
    inject.add_argument("--errno", help="fail with this errno (name or number)")
    inject.add_argument("--count", "--fail", type=int, default=1, help="how many calls (-1: all; default 1)")
    inject.add_argument("--delay-ms", type=int, default=0, help="delay each affected call")
    inject.add_argument("--op", choices=("enable", "disable", "create", "load", "shutdown", "start", "destroy"),
                        help="only affect this operation")
    inject.add_argument("--clear", action="store_true", help="drop all pending injections")
    sub.add_parser("boards", help="list shipped boards")
    return parser


VERBS = {"up": cmd_up, "down": cmd_down, "kill": cmd_kill, "status": cmd_status, "inject": cmd_inject,
         "serve": cmd_serve, "boards": cmd_boards}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except CliError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
