"""The console log in the container's state directory and ``runphi logs [-f]``."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from runphi.console import ConsoleError
from runphi.console.ringlog import (
    ConsoleLogWriter,
    follow_console_log,
    read_console_log,
    writer_alive,
)
from runphi.container import ContainerRecord
from runphi.store import Store

RUNPHI = [sys.executable, "-c", "from runphi.cli import main; main()"]


def on_disk(state_dir) -> int:
    return sum(p.stat().st_size for p in state_dir.iterdir() if p.name.startswith("console.log"))


def test_keeps_the_newest_output_within_the_limit(tmp_path):
    limit = 1000
    rng = random.Random(1)
    writer = ConsoleLogWriter(tmp_path, limit=limit)
    stream = b""
    try:
        for _ in range(400):
            chunk = rng.randbytes(rng.randint(1, 60))
            writer.write(chunk)
            stream += chunk
            assert on_disk(tmp_path) <= limit
            kept = read_console_log(tmp_path)
            assert stream.endswith(kept)
            assert len(kept) > limit // 2 or kept == stream
    finally:
        writer.close()
    assert writer.error is None
    assert read_console_log(tmp_path) == kept  # still readable after the monitor is gone


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(min_value=2, max_value=200), chunks=st.lists(st.binary(max_size=150), max_size=30))
def test_any_write_sequence_keeps_a_bounded_suffix(tmp_path_factory, limit, chunks):
    state_dir = tmp_path_factory.mktemp("ring")
    writer = ConsoleLogWriter(state_dir, limit=limit)
    for chunk in chunks:
        writer.write(chunk)
    writer.close()
    stream = b"".join(chunks)
    kept = read_console_log(state_dir)
    assert stream.endswith(kept)
    assert len(kept) <= limit
    assert len(kept) >= min(len(stream), limit // 2)


def test_a_burst_larger_than_a_segment_keeps_its_end(tmp_path):
    writer = ConsoleLogWriter(tmp_path, limit=100)
    writer.write(b"x" * 10)
    writer.write(bytes(range(200)))
    writer.close()
    kept = read_console_log(tmp_path)
    assert len(kept) <= 100
    assert kept.endswith(bytes(range(150, 200)))


def test_no_log_yet_reads_empty(tmp_path):
    assert read_console_log(tmp_path) == b""
    assert not writer_alive(tmp_path)
    assert list(follow_console_log(tmp_path)) == []


def test_one_writer_per_container(tmp_path):
    writer = ConsoleLogWriter(tmp_path)
    try:
        assert writer_alive(tmp_path)
        with pytest.raises(ConsoleError, match="already has a writer"):
            ConsoleLogWriter(tmp_path)
    finally:
        writer.close()
    assert not writer_alive(tmp_path)


def test_a_killed_writer_is_seen_as_gone(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from runphi.console.ringlog import ConsoleLogWriter
        writer = ConsoleLogWriter({str(tmp_path)!r})
        writer.write(b"booting\\r\\n")
        print("ready", flush=True)
        sys.stdin.read()
    """)
    monitor = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    try:
        assert monitor.stdout.readline() == b"ready\n"
        assert writer_alive(tmp_path)
        monitor.send_signal(signal.SIGKILL)
        monitor.wait(timeout=30)
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        monitor.stdin.close()
        monitor.stdout.close()
    assert not writer_alive(tmp_path)
    assert list(follow_console_log(tmp_path)) == [b"booting\r\n"]


def test_follow_sees_every_byte_across_rotations(tmp_path):
    rng = random.Random(5)
    writer = ConsoleLogWriter(tmp_path, limit=300)
    chunks = [rng.randbytes(rng.randint(1, 50)) for _ in range(200)]
    pending = list(chunks)

    def guest_prints_then_still_running() -> bool:
        # Called by the follower once per round: the "guest" prints one chunk.
        if pending:
            writer.write(pending.pop(0))
            return True
        writer.close()
        return False

    followed = b"".join(
        follow_console_log(tmp_path, poll_interval=0, keep_following=guest_prints_then_still_running))
    assert followed == b"".join(chunks)


def _record(store: Store, container_id: str) -> None:
    store.container_dir(container_id).mkdir(parents=True)
    store.write(ContainerRecord(id=container_id, bundle="/b", rootfs="/b/rootfs",
                                created="2026-11-28T14:00:00.000000000Z", status="running",
                                oci_version="1.0.2"))


def test_logs_verb_prints_the_log_unchanged(tmp_path):
    store = Store(tmp_path / "root")
    _record(store, "zic1")
    writer = ConsoleLogWriter(store.container_dir("zic1"))
    guest_output = b"\x00Hello from cell zic1\r\n\xff\x1b[0m\r\n"
    writer.write(guest_output)
    writer.close()
    done = subprocess.run([*RUNPHI, "--root", str(store.root), "logs", "zic1"],
                          capture_output=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, guest_output, b"")


def test_logs_of_an_unknown_container(tmp_path):
    done = subprocess.run([*RUNPHI, "--root", str(tmp_path), "logs", "nope"],
                          capture_output=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == b""
    assert b"container does not exist" in done.stderr
    assert b"Traceback" not in done.stderr


def test_logs_follow_until_the_monitor_is_gone(tmp_path):
    store = Store(tmp_path / "root")
    _record(store, "zic1")
    writer = ConsoleLogWriter(store.container_dir("zic1"))
    writer.write(b"first\r\n")
    follower = subprocess.Popen([*RUNPHI, "--root", str(store.root), "logs", "-f", "zic1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert os.read(follower.stdout.fileno(), 100) == b"first\r\n"
        writer.write(b"second\r\n")
        assert os.read(follower.stdout.fileno(), 100) == b"second\r\n"
        writer.write(b"bye\r\n")
        writer.close()  # the monitor exits: the follower prints the rest and ends
        rest, errors = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert rest == b"bye\r\n"
    assert (follower.returncode, errors) == (0, b"")
