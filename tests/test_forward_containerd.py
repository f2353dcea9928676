"""Plain containers through runphi under a real containerd behave exactly like runc.

Every scenario runs twice in the same private containerd — once with runc as
the shim's binary, once with runphi (which forwards to runc) — and the
observable results (stdout, stderr, exit code) must be identical.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.fdread import read_to_eof, read_until
from tools.testbed.containerd import PrivateContainerd

pytestmark = pytest.mark.containerd

RUNC = "runc"


def _binaries(runphi_bin: Path) -> dict[str, str]:
    import shutil

    return {"runc": shutil.which(RUNC), "runphi": str(runphi_bin)}


def _run(containerd: PrivateContainerd, binary: str, rootfs: Path, cid: str, *cmd: str,
         extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return containerd.ctr("run", "--rm", *containerd.runtime_flags(binary), *extra, "--rootfs",
                          str(rootfs), cid, *cmd)


@pytest.mark.parametrize("which", ["runc", "runphi"])
def test_output_and_exit_code_7(containerd, busybox_rootfs, runphi_bin, which):
    binary = _binaries(runphi_bin)[which]
    result = _run(containerd, binary, busybox_rootfs, f"exit7-{which}",
                  "sh", "-c", "echo hello out; echo hello err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"hello out\n", b"hello err\n")


def test_runphi_matches_runc_output_exactly(containerd, busybox_rootfs, runphi_bin):
    outcomes = {}
    for which, binary in _binaries(runphi_bin).items():
        result = _run(containerd, binary, busybox_rootfs, "same-id",
                      "sh", "-c", "echo one; echo two >&2; ls /; exit 3")
        outcomes[which] = (result.returncode, result.stdout, result.stderr)
    assert outcomes["runphi"] == outcomes["runc"]
    assert outcomes["runc"][0] == 3


def _read_pty_until_exit(master: int, process: subprocess.Popen, timeout: float) -> bytes:
    """Everything ctr writes to its terminal, until the pty closes (ctr has exited)."""
    try:
        return read_to_eof(master, timeout)
    except AssertionError:
        process.kill()
        raise


def _ctr_run_on_a_pty(containerd, binary: str, rootfs: Path, cid: str) -> tuple[int, bytes]:
    master, slave = os.openpty()
    argv = containerd.ctr_argv("run", "--rm", "-t", *containerd.runtime_flags(binary), "--rootfs",
                               str(rootfs), cid,
                               "sh", "-c", "test -t 0 && test -t 1 && echo on-a-tty; exit 5")
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=containerd.env,
                               start_new_session=True)
    os.close(slave)
    try:
        output = _read_pty_until_exit(master, process, timeout=60)
    finally:
        os.close(master)
    return process.wait(30), output


def test_tty_mode_through_a_real_pty(containerd, busybox_rootfs, runphi_bin):
    outcomes = {which: _ctr_run_on_a_pty(containerd, binary, busybox_rootfs, f"tty-{which}")
                for which, binary in _binaries(runphi_bin).items()}
    assert outcomes["runphi"] == outcomes["runc"]
    code, output = outcomes["runphi"]
    assert code == 5
    assert b"on-a-tty\r" in output


@pytest.mark.parametrize("which", ["runc", "runphi"])
def test_task_kill_gives_128_plus_signal(containerd, busybox_rootfs, runphi_bin, which):
    binary = _binaries(runphi_bin)[which]
    cid = f"kill-{which}"
    argv = containerd.ctr_argv("run", "--rm", *containerd.runtime_flags(binary), "--rootfs",
                               str(busybox_rootfs), cid, "sh", "-c", "echo ready; exec sleep 1000")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=containerd.env)
    try:
        read_until(process.stdout.fileno(), b"ready", timeout=60)
        killed = containerd.ctr("task", "kill", "--signal", "SIGKILL", cid)
        assert killed.returncode == 0, killed.stderr
        assert process.wait(60) == 137
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def _without_times(text: bytes) -> bytes:
    return re.sub(rb'time="[^"]*" ', b"", text)


def test_detached_task_exec_kill_and_rm_like_runc(containerd, busybox_rootfs, runphi_bin):
    outcomes = {}
    for which, binary in _binaries(runphi_bin).items():
        cid = "detached"
        started = containerd.ctr("run", "-d", *containerd.runtime_flags(binary), "--rootfs",
                                 str(busybox_rootfs), cid, "sleep", "1000")
        assert started.returncode == 0, started.stderr
        execed = containerd.ctr("task", "exec", "--exec-id", "e1", cid, "echo", "from exec")
        ps = containerd.ctr("task", "ps", cid)
        killed = containerd.ctr("task", "kill", "--signal", "SIGKILL", cid)
        removed = containerd.ctr("task", "rm", "--force", cid)
        gone = containerd.ctr("task", "ls", "--quiet")
        containerd.ctr("containers", "rm", cid, check=True)
        outcomes[which] = {
            "exec": (execed.returncode, execed.stdout, execed.stderr),
            "ps_rc": ps.returncode,
            "ps_rows": len(ps.stdout.splitlines()),
            "kill": (killed.returncode, killed.stdout, killed.stderr),
            "rm": (removed.returncode, removed.stdout, _without_times(removed.stderr)),
            "tasks_left": gone.stdout,
        }
    assert outcomes["runphi"] == outcomes["runc"]
    assert outcomes["runc"]["exec"][:2] == (0, b"from exec\n")
    assert outcomes["runc"]["tasks_left"] == b""


def test_runphi_error_reaches_ctr_as_one_json_line(containerd, busybox_rootfs, runphi_bin, tmp_path):
    """A ZIC without a backend: ctr shows runphi's one-line reason (read from log.json)."""
    config = tmp_path / "zic-rootfs" / "boot"
    config.mkdir(parents=True)
    (config / "config.json").write_text('{"os_var": "baremetal"}')
    result = containerd.ctr("run", "--rm", *containerd.runtime_flags(runphi_bin), "--rootfs",
                            str(tmp_path / "zic-rootfs"), "zic-no-backend", "boot")
    assert result.returncode == 1
    assert b"OCI runtime create failed: cannot create ZIC zic-no-backend: no partitioning backend" \
        in result.stderr, result.stderr


def test_a_second_private_containerd_with_its_own_environment(start_containerd, runphi_bin, tmp_path):
    """The factory fixture: its env reaches runphi through containerd and the shim."""
    from tools.testbed.containerd import make_busybox_rootfs

    missing = tmp_path / "not-there.toml"
    daemon = start_containerd(env={"RUNPHI_CONFIG": str(missing)})
    rootfs = make_busybox_rootfs(tmp_path / "rootfs")
    result = daemon.ctr("run", "--rm", *daemon.runtime_flags(runphi_bin), "--rootfs", str(rootfs),
                        "second", "sh")
    assert result.returncode == 1
    assert f"configuration file {missing} (from RUNPHI_CONFIG) does not exist".encode() in result.stderr


@pytest.mark.parametrize("planted", ["/etc/shadow", "../../..", "fifo"])
def test_an_unusable_boot_description_fails_with_runphis_line_under_ctr(containerd, runphi_bin, tmp_path,
                                                                         planted):
    """runc never gets such an image: no unrelated exec error, no rootfs/dev/* left behind."""
    rootfs = tmp_path / "odd-rootfs"
    (rootfs / "boot").mkdir(parents=True)
    (rootfs / "boot" / "ticker.bin").write_bytes(b"\0" * 16)
    description = rootfs / "boot" / "config.json"
    if planted == "fifo":
        os.mkfifo(description)
    else:
        description.symlink_to(planted)
    result = containerd.ctr("run", "--rm", *containerd.runtime_flags(runphi_bin), "--rootfs", str(rootfs),
                            "zic-odd", "/boot/ticker.bin")
    assert result.returncode == 1
    assert b"OCI runtime create failed: cannot create container zic-odd: boot description " \
        in result.stderr, result.stderr
    assert b"/boot/config.json" in result.stderr and b"permission denied" not in result.stderr
    assert sorted(p.name for p in rootfs.iterdir()) == ["boot"]
    assert containerd.ctr("containers", "ls", "-q").stdout.split().count(b"zic-odd") == 0
