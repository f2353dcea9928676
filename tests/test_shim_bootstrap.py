"""``containerd-shim-runphi-v2 start|delete`` as containerd runs them, without containerd.

The real console script runs in a bundle directory with containerd's argv and
environment; containerd's runc shim is played by a script on PATH that records how
it was started (the hand-over must be an exec with the identical argv, cwd and env).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runphi.shim.bootstrap import server_address, start_output
from runphi.shim.handover import DELETE_ANSWER_NAME, MARKER_NAME
from runphi.shim.proto import task_pb2

SHIM = Path(sys.executable).parent / "containerd-shim-runphi-v2"
FLAGS = ["-namespace", "ns1", "-address", "/run/ctd/containerd.sock", "-publish-binary", "/usr/bin/containerd",
         "-id", "c1"]

RECORDER = """#!/bin/sh
{ printf '%s\\n' "$0" "$@"; echo "cwd=$(pwd)"; echo "marker=$RECORD_MARKER"; } > "$RECORD_TO"
echo unix:///run/containerd/s/from-runc
"""


@pytest.fixture
def runc_shim(tmp_path):
    """A ``containerd-shim-runc-v2`` on PATH that records its argv, cwd and one env variable."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "containerd-shim-runc-v2"
    script.write_text(RECORDER)
    script.chmod(0o755)
    return bindir, tmp_path / "record.txt"


def bundle_with(tmp_path: Path, annotations: dict[str, str], *, zic: bool = False) -> Path:
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    if zic:
        (rootfs / "boot").mkdir()
        (rootfs / "boot" / "config.json").write_text("{}")
    else:
        (rootfs / "etc").mkdir()  # a plain rootfs (not empty: nothing to ask containerd about)
    config = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "annotations": annotations,
              "process": {"args": ["/bin/true"], "cwd": "/"}}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def run_shim(bundle: Path, *args: str, path: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    if path is not None:
        environment["PATH"] = f"{path}{os.pathsep}{environment['PATH']}"
    return subprocess.run([str(SHIM), *args], cwd=bundle, env=environment, capture_output=True, timeout=60)


def test_start_hands_a_plain_container_to_runcs_shim_unchanged(tmp_path, runc_shim):
    bindir, record = runc_shim
    bundle = bundle_with(tmp_path, {})
    done = run_shim(bundle, *FLAGS, "start", path=bindir, RECORD_TO=str(record), RECORD_MARKER="kept")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"unix:///run/containerd/s/from-runc\n"  # runc's output, nothing of ours
    assert done.stderr == b""
    argv0, *rest = record.read_text().splitlines()
    assert Path(argv0).name == "containerd-shim-runc-v2"
    assert rest == [*FLAGS, "start", f"cwd={bundle}", "marker=kept"]
    assert not (bundle / MARKER_NAME).exists()


def test_start_hands_a_pod_sandbox_to_runc_even_with_runphis_annotation(tmp_path, runc_shim):
    bindir, record = runc_shim
    bundle = bundle_with(tmp_path, {"io.kubernetes.cri.container-type": "sandbox",
                                    "org.runphi.runtime": "runphi"}, zic=True)
    done = run_shim(bundle, *FLAGS, "start", path=bindir, RECORD_TO=str(record))
    assert done.returncode == 0, done.stderr
    assert record.read_text().splitlines()[-3] == "start"


def test_start_refuses_a_bad_runtime_annotation_with_one_line(tmp_path, runc_shim):
    bindir, record = runc_shim
    bundle = bundle_with(tmp_path, {"org.runphi.runtime": "kata"})
    done = run_shim(bundle, *FLAGS, "start", path=bindir, RECORD_TO=str(record))
    assert done.returncode == 1
    assert done.stdout == b""
    [line] = done.stderr.decode().splitlines()
    assert "org.runphi.runtime='kata'" in line and "must be" in line
    assert not record.exists() and not (bundle / MARKER_NAME).exists()


def test_delete_of_a_bundle_runphi_handed_over_is_runcs_delete(tmp_path, runc_shim):
    bindir, record = runc_shim
    bundle = bundle_with(tmp_path, {})
    done = run_shim(bundle, *FLAGS, "-bundle", str(bundle), "delete", path=bindir, RECORD_TO=str(record))
    assert done.returncode == 0, done.stderr
    assert record.read_text().splitlines()[1:-2] == [*FLAGS, "-bundle", str(bundle), "delete"]


def test_delete_after_the_servers_delete_prints_exactly_its_answer(tmp_path, runc_shim):
    bindir, record = runc_shim
    bundle = bundle_with(tmp_path, {}, zic=True)
    (bundle / MARKER_NAME).write_text('{"address":"unix:///x"}')
    answer = task_pb2.DeleteResponse(pid=42, exit_status=143)
    answer.exited_at.FromNanoseconds(1_700_000_000_123_456_789)
    (bundle / DELETE_ANSWER_NAME).write_bytes(answer.SerializeToString())
    done = run_shim(bundle, *FLAGS, "-bundle", str(bundle), "delete", path=bindir, RECORD_TO=str(record),
                    RUNPHI_STATE_DIR=str(tmp_path / "node"))
    assert done.returncode == 0, done.stderr
    assert task_pb2.DeleteResponse.FromString(done.stdout) == answer
    assert not record.exists()


def test_delete_without_any_trace_of_the_task_answers_137(tmp_path, runc_shim):
    bindir, record = runc_shim
    bundle = bundle_with(tmp_path, {}, zic=True)
    (bundle / MARKER_NAME).write_text('{"address":"unix:///x"}')
    for _ in range(2):  # idempotent
        done = run_shim(bundle, *FLAGS, "-bundle", str(bundle), "delete", path=bindir, RECORD_TO=str(record),
                        RUNPHI_STATE_DIR=str(tmp_path / "node"), RUNPHI_BACKEND="none")
        assert done.returncode == 0, done.stderr
        response = task_pb2.DeleteResponse.FromString(done.stdout)
        assert response.exit_status == 137 and response.exited_at.seconds > 0


def test_version_and_usage():
    shown = subprocess.run([str(SHIM), "-v"], capture_output=True, timeout=60)
    assert shown.returncode == 0 and b"io.containerd.runphi.v2" in shown.stdout
    bare = subprocess.run([str(SHIM)], capture_output=True, timeout=60)
    assert bare.returncode == 1 and bare.stderr.count(b"\n") == 1


def test_start_output_is_plain_for_16_and_bootstrap_json_for_17_and_2x():
    address = "unix:///run/containerd/s/abc"
    assert start_output(address, {}) == address
    for version in ("2", "3"):
        printed = json.loads(start_output(address, {"MAX_SHIM_VERSION": version}))
        assert printed == {"version": 2, "address": address, "protocol": "ttrpc"}


def test_server_address_groups_a_pod_and_never_collides_with_runcs():
    one = server_address("/run/containerd/containerd.sock", "k8s.io", "pod-1")
    assert one == server_address("/run/containerd/containerd.sock", "k8s.io", "pod-1")
    assert one != server_address("/run/containerd/containerd.sock", "k8s.io", "pod-2")
    runc = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod-1").hexdigest()
    assert one.startswith("unix:///run/containerd/s/") and not one.endswith(runc)
    assert len(one.removeprefix("unix://")) < 108  # a unix socket path
