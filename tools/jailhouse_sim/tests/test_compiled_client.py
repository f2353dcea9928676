"""The compiled ``bin/jailhouse`` (``jailhouse_client.c`` + ``relay.py``) against the Python client.

* Same stdout bytes, stderr bytes and exit status as the Python client, against the same
  running simulator, over a matrix of commands (success and failure), a sequence of
  state-changing commands, ``console -f``, and a board whose daemon is gone.
* Files named on the command line are read relative to the caller's cwd, and names only
  the caller's process can open (``/dev/stdin``) are read by the caller.
* The C client's side of the wire, against a scripted fake daemon: what it sends, each
  reply frame, a daemon that vanishes before or during a call.
* Without a working C compiler, ``up`` installs the Python client as ``bin/jailhouse``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tools.jailhouse_sim import cclient, spawn
from tools.jailhouse_sim.relay import MAGIC, HandedOver, RelayIO, ToolRequest, parse_request, serve_tool
from tools.jailhouse_sim.testing import SimBoard

from . import cells

ELF = b"\x7fELF"
MAGIC_LINE = "#!jailhouse-sim-inmate"


def run(tool: Path, args: tuple, cwd: Path, **kwargs) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) of ``tool ARGS`` run in ``cwd``."""
    done = subprocess.run([str(tool), *args], cwd=cwd, capture_output=True, timeout=60, **kwargs)
    return done.returncode, done.stdout, done.stderr


def run_compiled(sim: SimBoard, args: tuple, cwd: Path, **kwargs) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) of ``bin/jailhouse ARGS``, the compiled client."""
    return run(sim.jailhouse_path, args, cwd, **kwargs)


def run_python(sim: SimBoard, args: tuple, cwd: Path, **kwargs) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) of the Python client run in ``bin/jailhouse``'s place."""
    return run(sim.python_client_path, args, cwd, env=sim.python_client_env(), **kwargs)


def both(sim: SimBoard, args: tuple, cwd: Path, **kwargs) -> tuple[tuple, tuple]:
    """The compiled client's and the Python client's results for the same command."""
    return run_compiled(sim, args, cwd, **kwargs), run_python(sim, args, cwd, **kwargs)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """A board with one created (not started) cell ``parity``, and a work dir of input files."""
    base = tmp_path_factory.mktemp("compiled")
    work = base / "work"
    work.mkdir()
    good = cells.write(work, cells.runphi_cell("parity", {1}))
    good.rename(work / "good.cell")
    (work / "bad.cell").write_bytes(b"JHCELL\x0d\x00 definitely not a cell")
    (work / "image.bin").write_bytes(b"\x01\x02\x03")
    with SimBoard.running(base / "sim") as sim:
        assert sim.jailhouse_path.read_bytes()[:4] == ELF, "bin/jailhouse is not the compiled client"
        sim.jailhouse("cell", "create", work / "good.cell").check()
        yield sim, work


MATRIX = [
    (), ("bogus",), ("--help",), ("--version",), ("--version", "extra"),
    ("cell", "list"), ("cell", "list", "extra"),
    ("cell", "stats", "1"), ("cell", "stats", "--name", "parity"), ("cell", "stats", "nope"), ("cell", "stats"),
    ("cell", "start", "nope"), ("cell", "destroy", "0"), ("cell", "start", "0x"), ("cell", "start", "4294967296"),
    ("cell", "create", "bad.cell"), ("cell", "create", "missing.cell"), ("cell", "create", ""),
    ("cell", "create", "good.cell"), ("cell", "create", b"\xff.cell"), ("cell", "create", "."),
    ("cell", "load", "nope", "image.bin"), ("cell", "load", "parity", "-s", "x", "-a", "0x1g"),
    ("cell", "load", "parity", "missing.bin", "-a", "0"), ("cell", "shutdown", "1", "extra"),
    ("enable", "bad.cell"), ("enable",), ("console",), ("console", "-x"),
    ("config", "check", "x"), ("hardware", "check"), ("cell", "linux", "--help"), ("cell", "linux", "good.cell"),
]


@pytest.mark.parametrize("args", MATRIX, ids=lambda args: " ".join(map(str, args)) or "no-args")
def test_same_output_and_status_as_the_python_client(board, args):
    sim, work = board
    compiled, python = both(sim, args, work)
    assert compiled == python


def test_the_matrix_covers_success_and_failure(board):
    """The comparison above is not between two clients that always fail (or always succeed)."""
    sim, work = board
    statuses = {run_compiled(sim, args, work)[0] for args in MATRIX}
    assert {0, 1, 2} <= statuses


def test_relative_files_are_read_from_the_callers_cwd(board):
    sim, work = board
    elsewhere = work / "sub"
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(work / "bad.cell", elsewhere / "only-here.cell")
    compiled, python = both(sim, ("cell", "create", "only-here.cell"), elsewhere)
    assert compiled == python == (1, b"", b"JAILHOUSE_CELL_CREATE: Invalid argument\n")
    compiled, python = both(sim, ("cell", "create", "../bad.cell"), elsewhere)
    assert compiled == python == (1, b"", b"JAILHOUSE_CELL_CREATE: Invalid argument\n")


def scenario(guest: Path) -> list[tuple]:
    """Commands from creation to destruction (``cell stats`` while the counters cannot move)."""
    return [
        ("cell", "create", "seq.cell"), ("cell", "create", "seq.cell"),
        ("cell", "load", "seq", guest.name, "-a", "0x70000000", "-s", "k=v", "-a", "0x70001000"),
        ("cell", "stats", "seq"), ("cell", "list"), ("cell", "start", "seq"), ("cell", "list"),
        ("cell", "shutdown", "seq"), ("cell", "list"), ("cell", "destroy", "seq"), ("cell", "destroy", "seq"),
        ("cell", "list"),
    ]


def test_a_sequence_of_state_changes_reads_the_same(board):
    """The same commands, from the same state, once per client: the same answers at every step."""
    sim, work = board
    cells.write(work, cells.runphi_cell("seq", {2, 3})).rename(work / "seq.cell")
    guest = work / "seq-guest"
    guest.write_text(MAGIC_LINE + "\nhalt\n")
    steps = scenario(guest)
    compiled = [run_compiled(sim, args, work) for args in steps]
    python = [run_python(sim, args, work) for args in steps]
    assert compiled == python
    assert [status for status, _, _ in compiled].count(1) == 2  # EEXIST, then ENOENT
    assert b"running" in compiled[6][1] and b"seq" not in compiled[-1][1]


def test_callers_own_file_descriptors_are_read_by_the_caller(board):
    sim, work = board
    cells.write(work, cells.runphi_cell("fromstdin", {4})).rename(work / "stdin.cell")
    for tool in (run_compiled, run_python):
        with open(work / "stdin.cell", "rb") as stdin:
            assert tool(sim, ("cell", "create", "/dev/stdin"), work, stdin=stdin) == (0, b"", b"")
        assert b"fromstdin" in tool(sim, ("cell", "list"), work)[1]
        assert tool(sim, ("cell", "destroy", "fromstdin"), work) == (0, b"", b"")


def test_a_fifo_is_read_by_the_caller_not_the_daemon(board):
    sim, work = board
    cells.write(work, cells.runphi_cell("fromfifo", {5})).rename(work / "fifo-source.cell")
    fifo = work / "cell.fifo"
    os.mkfifo(fifo)
    client = subprocess.Popen([str(sim.jailhouse_path), "cell", "create", fifo.name], cwd=work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with open(fifo, "wb") as writer:  # opens once a reader has opened the FIFO ...
            sim.wait_status(lambda status: status["tool_runs"] == 0)  # ... and the daemon is not that reader
            writer.write((work / "fifo-source.cell").read_bytes())
        out, err = client.communicate(timeout=60)
    finally:
        client.kill()
        client.wait()
    assert (client.returncode, out, err) == (0, b"", b"")
    sim.jailhouse("cell", "destroy", "fromfifo").check()


async def follow(sim: SimBoard, python: bool) -> trio.Process:
    """A ``console -f`` of the compiled client (or of the Python client in its place)."""
    tool = sim.python_client_path if python else sim.jailhouse_path
    return await trio.lowlevel.open_process([str(tool), "console", "-f"], stdout=subprocess.PIPE,
                                            env=sim.python_client_env() if python else None)


async def read_until(process: trio.Process, seen: bytearray, marker: bytes) -> None:
    with trio.fail_after(10):
        while marker not in seen:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"{process.args} ended before {marker!r}"
            seen += chunk


async def test_console_follow_streams_the_same_bytes_and_ends_with_the_client(jailhouse_sim, tmp_path):
    sim = jailhouse_sim
    cell = cells.write(tmp_path, cells.runphi_cell("followed", {1}))
    followers = [await follow(sim, python=False), await follow(sim, python=True)]
    seen = [bytearray(), bytearray()]
    try:
        for process, data in zip(followers, seen):
            await read_until(process, data, b"Activating hypervisor\n")
        assert sim.status()["tool_runs"] == 1  # the compiled follower, served by the daemon
        sim.jailhouse("cell", "create", cell).check()
        marker = b'Created cell "followed"\n'
        for process, data in zip(followers, seen):
            await read_until(process, data, marker)
        assert seen[0][:seen[0].index(marker)] == seen[1][:seen[1].index(marker)]
        for process in followers:
            process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                assert await process.wait() == 1  # KeyboardInterrupt in the Python client
        sim.wait_status(lambda status: status["tool_runs"] == 0)
    finally:
        for process in followers:
            process.kill()
            await process.wait()
            await process.stdout.aclose()


def test_without_a_daemon_it_answers_as_the_python_client(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    sim = SimBoard.start(tmp_path / "sim")
    try:
        sim.jailhouse("cell", "create", cells.write(work, cells.runphi_cell("stale", {1}))).check()
        sim.kill()
        for args in [("cell", "list"), ("cell", "start", "1"), ("console",), ("--help",), ("cell", "stats", "1"),
                     ("cell", "linux", "--help"), ("cell", "create", "missing.cell")]:
            compiled, python = both(sim, args, work)
            assert compiled == python, args
        assert b"stale" in run_compiled(sim, ("cell", "list"), work)[1]
        assert run_compiled(sim, ("cell", "start", "1"), work) == (
            1, b"", b"opening /dev/jailhouse: No such file or directory\n")
    finally:
        sim.stop()


# ---- the daemon's side, in process ----------------------------------------------------------


def test_requests_must_be_c_strings_with_an_absolute_cwd():
    assert parse_request(b"/x/jailhouse\0/w\0/bin\0cell\0list\0") == ToolRequest(
        "/x/jailhouse", "/w", "/bin", ("cell", "list"))
    assert parse_request(b"jh\0/\0\0").args == ()
    for bad in (b"jh\0/\0", b"jh\0/\0/bin\0cell", b"jh\0relative\0/bin\0"):
        with pytest.raises(ValueError):
            parse_request(bad)


def test_relay_hands_over_names_only_the_caller_can_open(tmp_path):
    def relay_io(sent: list[bytes]) -> RelayIO:
        return RelayIO(ToolRequest("jailhouse", str(tmp_path), "", ()), sent.append, lambda data: b"{}",
                       lambda seconds: None)

    (tmp_path / "f").write_bytes(b"data")
    with relay_io([]).open("f") as f:
        assert f.read() == b"data"
    for name in ("/dev/stdin", "/dev/fd/0", "/proc/self/fd/0", "../../../../../../../../proc/self/environ"):
        sent: list[bytes] = []
        with pytest.raises(HandedOver):
            relay_io(sent).open(name)
        assert sent == [b"F\0\0\0\0"], name


async def test_a_client_that_hangs_up_ends_its_run(tmp_path):
    """A ``console -f`` whose client dies is noticed while the console is idle."""
    polled = trio.Event()

    async def answer(data: bytes) -> bytes:
        polled.set()
        return b'{"head": 0, "saved_seen": 0}'

    daemon_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    body = b"".join(field + b"\0" for field in (b"jailhouse", b"/", b"", b"console", b"-f"))
    client_end.sendall(MAGIC + struct.pack(">I", len(body)) + body)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(daemon_end))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_tool, stream, b"", answer, str(tmp_path), 0, trio.CapacityLimiter(1))
            await polled.wait()
            client_end.close()
    await stream.aclose()


# ---- the C client's side, against a scripted fake daemon --------------------------------------


@pytest.fixture
def fake_root(tmp_path):
    """A root with the compiled client, a listening socket, and a Python client stand-in that
    prints what it was run with."""
    binary = cclient.client_binary()
    assert binary is not None, "cc could not build jailhouse_client.c"
    root = tmp_path / "root"
    for directory in ("bin", "run", "libexec/jailhouse-sim"):
        (root / directory).mkdir(parents=True)
    (root / "bin/jailhouse").write_bytes(binary)
    (root / "bin/jailhouse").chmod(0o755)
    stand_in = root / "libexec/jailhouse-sim/jailhouse.py"
    stand_in.write_text('#!/bin/sh\necho "python client as $JAILHOUSE_SIM_EXECFN: $*"\n')
    stand_in.chmod(0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(root / "run/jailhouse-sim.sock"))
    listener.listen(1)
    listener.settimeout(30)
    yield root, listener
    listener.close()


def exchange(root: Path, listener: socket.socket, frames: bytes, *args: str) -> tuple[bytes, tuple]:
    """Run the client, answer its request with ``frames`` and close; (request body, its result)."""
    client = subprocess.Popen([str(root / "bin/jailhouse"), *args], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, "PATH": "/test/path"})
    conn, _ = listener.accept()
    with conn:
        head = b""
        while len(head) < 9:
            head += conn.recv(9 - len(head))
        assert head[:5] == MAGIC
        body = b""
        while len(body) < struct.unpack(">I", head[5:])[0]:
            body += conn.recv(65536)
        conn.sendall(frames)
    out, err = client.communicate(timeout=30)
    return body, (client.returncode, out, err)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def test_the_client_sends_execfn_cwd_path_and_arguments(fake_root):
    root, listener = fake_root
    body, result = exchange(root, listener, frame(b"x", struct.pack(">I", 0)), "cell", "", "list")
    assert body == f"{root}/bin/jailhouse\0{root}\0/test/path\0cell\0\0list\0".encode()
    assert result == (0, b"", b"")


def test_the_client_replays_frames_in_order_and_exits_with_the_status(fake_root):
    root, listener = fake_root
    frames = frame(b"o", b"out 1\n") + frame(b"e", b"err\n") + frame(b"c", b"X: gone\n") + frame(b"r") \
        + frame(b"o", b"\xff" * 70000) + frame(b"x", struct.pack(">I", 3))
    _, result = exchange(root, listener, frames, "console")
    assert result == (3, b"out 1\n" + b"\xff" * 70000, b"err\n")


@pytest.mark.parametrize("frames, stderr", [
    (frame(b"c", b"JAILHOUSE_CELL_CREATE: No such device\n"), b"JAILHOUSE_CELL_CREATE: No such device\n"),
    (frame(b"c", b"read(console): No such device\n") + frame(b"r") + frame(b"o", b"x"),
     b"opening /dev/jailhouse: No such file or directory\n"),
])
def test_a_daemon_that_vanishes_mid_run_is_reported_as_the_python_client_would(fake_root, frames, stderr):
    root, listener = fake_root
    _, (status, _, err) = exchange(root, listener, frames, "console", "-f")
    assert (status, err) == (1, stderr)


@pytest.mark.parametrize("frames", [b"", frame(b"F")], ids=["silent-daemon", "hand-over"])
def test_the_python_client_takes_over_a_call_nothing_was_said_about(fake_root, frames):
    root, listener = fake_root
    _, result = exchange(root, listener, frames, "cell", "list")
    assert result == (0, f"python client as {root}/bin/jailhouse: cell list\n".encode(), b"")


def test_no_daemon_runs_the_python_client(fake_root):
    root, listener = fake_root
    listener.close()
    os.unlink(root / "run/jailhouse-sim.sock")
    done = subprocess.run([str(root / "bin/jailhouse"), "--version"], capture_output=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, f"python client as {root}/bin/jailhouse: --version\n".encode())


def test_exec_frames_run_the_helper_with_the_given_path(fake_root, tmp_path):
    root, listener = fake_root
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    helper = helpers / "jailhouse-cell-linux"
    helper.write_text('#!/bin/sh\necho "helper $0 PATH=$PATH: $*"\n')
    helper.chmod(0o755)
    payload = b"".join(f + b"\0" for f in (f"{helpers}:/x".encode(), b"jailhouse-cell-linux", b"linux", b"-h"))
    _, result = exchange(root, listener, frame(b"X", payload), "cell", "linux", "-h")
    assert result == (0, f"helper {helper} PATH={helpers}:/x: -h\n".encode(), b"")
    missing = b"".join(f + b"\0" for f in (str(tmp_path / "none").encode(), b"jailhouse-cell-linux", b"linux"))
    _, result = exchange(root, listener, frame(b"X", missing), "cell", "linux")
    assert result == (1, b"", b"execvp: No such file or directory\n")


def test_the_c_source_is_warning_free_c99():
    compiler = shutil.which("cc")
    assert compiler is not None, "no cc: run setup.sh (Debian package gcc)"
    done = subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only", "-x", "c",
                           "-"], input=cclient.source(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()


# ---- without a C compiler -------------------------------------------------------------------


def fake_compilers(tmp_path: Path) -> dict[str, Path]:
    """PATH directories: one without any ``cc``, one whose ``cc`` always fails."""
    empty, failing = tmp_path / "no-cc", tmp_path / "failing-cc"
    empty.mkdir()
    failing.mkdir()
    (failing / "cc").write_text("#!/bin/sh\necho 'cc: broken' >&2\nexit 1\n")
    (failing / "cc").chmod(0o755)
    return {"no cc": empty, "failing cc": failing}


def test_up_installs_the_python_client_when_no_compiler_can_build_the_c_one(tmp_path):
    env = spawn.child_env()
    for name, path_dir in fake_compilers(tmp_path).items():
        root = tmp_path / name.replace(" ", "-")
        cli = [sys.executable, "-m", "tools.jailhouse_sim.cli"]
        up = subprocess.run([*cli, "up", "--root", str(root)], capture_output=True, text=True, timeout=120,
                            env={**env, "PATH": str(path_dir)})
        try:
            assert up.returncode == 0, up.stderr
            tool = root / "bin/jailhouse"
            assert tool.read_bytes() == (root / "libexec/jailhouse-sim/jailhouse.py").read_bytes(), name
            assert tool.read_text().startswith(f"#!{sys.executable} -IS\n")
            listed = subprocess.run([str(tool), "cell", "list"], capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0 and "sim-qemu-arm64" in listed.stdout, listed.stderr
        finally:
            subprocess.run([*cli, "down", "--root", str(root)], capture_output=True, timeout=120, env=env)
