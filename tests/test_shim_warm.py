"""The shim's warm parent (runphi.shim.warm): it decides ``start`` and forks real shim servers.

Each test runs a real warm parent process and talks to it exactly as ``start`` does
(runphi.shim.handover.ask_warm_parent); the servers it forks are driven over ttrpc.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from runphi.shim.handover import ask_warm_parent, warm_socket
from runphi.shim.launch import answers
from runphi.shim.proto import task_pb2
from runphi.shim.service import TASK_SERVICE
from runphi.shim.ttrpc import Code, TtrpcError, connect_unix
from tests.test_lifecycle_harness import wait_for
from google.protobuf import empty_pb2

DEADLINE = 30.0


@pytest.fixture
def sockets(tmp_path_factory):
    """A short directory for unix sockets."""
    directory = Path(os.path.realpath("/tmp")) / f"rphi-warm-{os.getpid()}-{time.monotonic_ns()}"
    directory.mkdir()
    yield directory
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()


@pytest.fixture
def warm(sockets, tmp_path):
    """A warm parent on ``sockets/warm`` (idle exit after 60 s), its environment pointing at
    a private state dir; killed afterwards."""
    path = sockets / "warm"
    env = {**os.environ, "RUNPHI_STATE_DIR": str(tmp_path / "node"), "RUNPHI_BACKEND": "none",
           "RUNPHI_SHIM_SOCKET_DIR": str(sockets)}
    process = subprocess.Popen([sys.executable, "-m", "runphi.shim.warm", str(path), "60"], env=env,
                               stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: answers(str(path)), timeout=DEADLINE, what="the warm parent to listen")
        yield process, path
    finally:
        process.kill()
        process.wait()


async def connect_then_shutdown(path: Path) -> None:
    async with connect_unix(str(path)) as client:
        with pytest.raises(TtrpcError) as refused:
            await client.call(TASK_SERVICE, "Connect", task_pb2.ConnectRequest(id="nobody"),
                              task_pb2.ConnectResponse)
        assert refused.value.code == Code.NOT_FOUND
        await client.call(TASK_SERVICE, "Shutdown", task_pb2.ShutdownRequest(id="nobody"), empty_pb2.Empty)


def test_a_second_warm_parent_on_the_same_socket_exits_at_once(warm):
    _, path = warm
    second = subprocess.run([sys.executable, "-m", "runphi.shim.warm", str(path)], timeout=DEADLINE)
    assert second.returncode == 0
    assert answers(str(path))


def test_a_malformed_request_changes_nothing(warm, tmp_path):
    process, path = warm
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        client.sendall(b"not json")
        client.shutdown(socket.SHUT_WR)
        assert client.recv(64) == b""
    assert process.poll() is None
    assert ask(path, START_ARGV, bundle_with(tmp_path, {}, zic=False)) == b"runc "


def test_without_a_warm_parent_start_gets_no_answer(sockets):
    assert ask_warm_parent(str(sockets / "nowhere"), START_ARGV, "/") is None


def test_an_idle_warm_parent_exits_and_removes_its_socket(sockets):
    path = sockets / "idle"
    process = subprocess.Popen([sys.executable, "-m", "runphi.shim.warm", str(path), "0.5"],
                               stdin=subprocess.DEVNULL)
    assert process.wait(DEADLINE) == 0
    assert not path.exists()


def test_the_socket_name_follows_the_environment():
    assert warm_socket("/d", {"A": "1"}) == warm_socket("/d", {"A": "1"})
    assert warm_socket("/d", {"A": "1"}) != warm_socket("/d", {"A": "2"})
    assert warm_socket("/d", {}).startswith("/d/runphi-warm-")


def test_sigterm_ends_the_warm_parent_and_its_socket(warm):
    process, path = warm
    process.terminate()
    assert process.wait(DEADLINE) == 128 + 15
    assert not path.exists()


# ---- start through the warm parent ------------------------------------------------------------

def ask(warm_path: Path, argv: list[str], cwd: Path) -> bytes:
    """A ``start`` request as runphi.shim.handover.ask_warm_parent sends it; the raw answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(DEADLINE)
        client.connect(str(warm_path))
        client.sendall(json.dumps({"type": "start", "argv": argv, "cwd": str(cwd)}).encode())
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
    return answer


def bundle_with(base: Path, annotations: dict[str, str], zic: bool) -> Path:
    bundle = base / "bundle"
    (bundle / "rootfs" / ("boot" if zic else "etc")).mkdir(parents=True)
    if zic:
        (bundle / "rootfs" / "boot" / "config.json").write_text("{}")
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                                                    "annotations": annotations}))
    return bundle


START_ARGV = ["-namespace", "ns1", "-address", "/run/ctd/c.sock", "-id", "c1", "start"]


def test_start_of_a_plain_bundle_is_answered_runc(warm, tmp_path):
    _, path = warm
    assert ask(path, START_ARGV, bundle_with(tmp_path, {}, zic=False)) == b"runc "


def test_start_refusal_comes_back_as_one_error_line(warm, tmp_path):
    _, path = warm
    answer = ask(path, START_ARGV, bundle_with(tmp_path, {"org.runphi.runtime": "kata"}, zic=False))
    kind, _, line = answer.decode().partition(" ")
    assert kind == "error" and "org.runphi.runtime='kata'" in line and "\n" not in line


def test_start_of_a_zic_bundle_leaves_a_listening_server(warm, sockets, tmp_path):
    process, path = warm
    bundle = bundle_with(tmp_path, {}, zic=True)
    kind, _, address = ask(path, START_ARGV, bundle).decode().partition(" ")
    assert kind == "address" and address.startswith(f"unix://{sockets}/")
    server = Path(address.removeprefix("unix://"))
    assert (bundle / "address").read_text() == address
    assert (bundle / "runphi-shim.json").exists()
    # A second ZIC of the same group (the same id here) reuses the live server.
    assert ask(path, START_ARGV, bundle).decode() == f"address {address}"
    trio.run(connect_then_shutdown, server)
    wait_for(lambda: not server.exists(), timeout=DEADLINE, what="the server to remove its socket after Shutdown")
    assert process.poll() is None  # the warm parent stays for the next start
