"""The container store: atomic writes, per-container locks, status machine, ids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest

from runphi.cli import validate_id
from runphi.container import (ContainerRecord, identify_process, live_status, oci_state,
                              transition)
from runphi.errors import ContainerExists, ContainerNotFound, IllegalTransition, InvalidId
from runphi.oci import encode_state
from runphi.files import atomic_write
from runphi.store import RECORD_NAME, Store

REPO_ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT)


def test_crash_between_write_and_rename_keeps_the_old_record(state_root, make_record):
    record = make_record("c1", "created")
    store = Store(state_root)
    # A real process writes the new record's temp file, then dies by SIGKILL
    # before it can rename it into place.
    crashed = _python("""
        import os, signal, sys
        from pathlib import Path
        from runphi.files import write_temp
        from runphi.store import Store
        store = Store(Path(sys.argv[1]))
        record = store.read("c1")
        data = b'{"torn": true'
        write_temp(store.record_path("c1"), data)
        os.kill(os.getpid(), signal.SIGKILL)
    """, str(state_root))
    assert crashed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in store.container_dir("c1").iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the crashed writer left its temp file"
    assert store.read("c1") == record
    # The next write replaces the record whole; the stray temp file does not matter.
    store.write(transition(record, "running"))
    assert store.read("c1").status == "running"


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


RACER = """
    import sys
    from pathlib import Path
    import msgspec
    from runphi.store import Store
    store = Store(Path(sys.argv[1]))
    for _ in range(int(sys.argv[2])):
        with store.locked("race"):
            record = store.read("race")
            count = int(record.annotations.get("n", "0"))
            annotations = {**record.annotations, "n": str(count + 1)}
            store.write(msgspec.structs.replace(record, annotations=annotations))
"""


def test_two_processes_racing_on_one_container_serialize(state_root, make_record):
    make_record("race", "created")
    rounds = 150
    racers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(RACER), str(state_root),
                                str(rounds)], cwd=REPO_ROOT) for _ in range(2)]
    assert [racer.wait(120) for racer in racers] == [0, 0]
    assert Store(state_root).read("race").annotations["n"] == str(2 * rounds)


def test_lock_waiter_sees_deleted_container_as_missing(state_root, make_record):
    make_record("gone", "created")
    store = Store(state_root)
    waiter_code = """
        import sys
        from pathlib import Path
        from runphi.errors import ContainerNotFound
        from runphi.store import Store
        print("waiting", flush=True)
        try:
            with Store(Path(sys.argv[1])).locked("gone"):
                print("found")
        except ContainerNotFound as exc:
            print(exc)
    """
    with store.locked("gone"):
        waiter = subprocess.Popen([sys.executable, "-c", textwrap.dedent(waiter_code), str(state_root)],
                                  stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        assert waiter.stdout.readline() == "waiting\n"
        store.remove("gone")
    out, _ = waiter.communicate(timeout=60)
    assert out == "container does not exist\n"


def test_creating_refuses_taken_ids_and_cleans_up_on_failure(state_root, make_record):
    record = make_record("dup", "created")
    store = Store(state_root)
    with pytest.raises(ContainerExists, match="container with id exists: dup"):
        with store.creating(record):
            pass
    fresh = msgspec.structs.replace(record, id="fails")
    with pytest.raises(RuntimeError):
        with store.creating(fresh):
            raise RuntimeError("backend failed")
    assert not store.container_dir("fails").exists()
    assert store.ids() == ["dup"]


def test_runc_owned_directory_counts_as_taken(state_root):
    (state_root / "runc-one").mkdir()
    (state_root / "runc-one" / "state.json").write_text("{}")
    store = Store(state_root)
    assert store.taken("runc-one") and not store.holds("runc-one")
    assert store.ids() == []


@pytest.mark.parametrize("old,new", [
    ("creating", "created"), ("creating", "stopped"), ("created", "running"),
    ("created", "stopped"), ("running", "stopped"),
])
def test_legal_transitions(make_record, old, new):
    assert transition(make_record(f"t-{old}-{new}", old), new).status == new


@pytest.mark.parametrize("old,new", [
    ("created", "creating"), ("running", "created"), ("running", "creating"),
    ("stopped", "running"), ("stopped", "created"), ("creating", "running"),
])
def test_illegal_transitions_are_refused(make_record, old, new):
    record = make_record(f"t-{old}-{new}", old)
    with pytest.raises(IllegalTransition, match=f"cannot go from {old} to {new}"):
        transition(record, new)


def test_status_is_live(make_record, state_root):
    alive = make_record("alive", "running")
    dead = make_record("dead", "running", alive=False)
    assert live_status(alive) == "running"
    assert live_status(dead) == "stopped"
    reused = msgspec.structs.replace(alive, monitor_start_time=alive.monitor_start_time + 1)
    assert live_status(reused) == "stopped", "a recycled pid must not count as the monitor"


def test_state_document_encoding_matches_runc(make_record):
    record = make_record("enc", "created", annotations={"org.example.k": "v"})
    encoded = encode_state(oci_state(record))
    assert not encoded.endswith(b"\n")
    assert encoded.startswith(b'{\n  "ociVersion": "1.0.2",\n  "id": "enc",\n  "pid": ')
    keys = list(msgspec.json.decode(encoded))
    assert keys == ["ociVersion", "id", "pid", "status", "bundle", "rootfs", "created",
                    "annotations", "owner"]
    stopped = oci_state(msgspec.structs.replace(record, status="stopped", annotations={}))
    decoded = msgspec.json.decode(encode_state(stopped))
    assert decoded["pid"] == 0 and decoded["owner"] == "" and "annotations" not in decoded
    assert decoded["created"] == "2023-11-14T22:13:20.123456Z"


@pytest.mark.parametrize("good", ["a", "abc-DEF_1.2", "x+y,z", "." * 3, "a" * 255, "k8s_POD_x"])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "/abs", "a b", "é", "a" * 256, "x\n"])
def test_invalid_ids_are_refused_clearly(bad):
    with pytest.raises(InvalidId, match="invalid container id"):
        validate_id(bad)


def test_read_of_unknown_id(state_root):
    with pytest.raises(ContainerNotFound, match="^container does not exist$"):
        Store(state_root).read("nope")


def test_record_file_is_msgspec_json(make_record, state_root):
    record = make_record("fmt", "created")
    raw = (state_root / "fmt" / RECORD_NAME).read_bytes()
    assert msgspec.json.decode(raw, type=ContainerRecord) == record
    assert identify_process(record.monitor_pid) == (record.monitor_pid, record.monitor_start_time)
    assert os.stat(state_root / "fmt" / RECORD_NAME).st_mode & 0o777 == 0o600
