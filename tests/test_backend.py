"""The Jailhouse backend's own pieces: undo order, shutdown deadline, resource release by cell."""

from __future__ import annotations

import pytest

from runphi.backends.base import BackendError
from runphi.backends.base import shutdown_timeout
from runphi.backends.jailhouse.backend import JailhouseBackend
from runphi.undo import UndoStack
from runphi.config import load_runtime_config
from runphi.errors import RunphiError
from tests.test_lifecycle_harness import board_running, subreaper  # noqa: F401


def test_undo_runs_in_reverse_and_collects_failures():
    done = []
    undo = UndoStack()
    undo.push("first", lambda: done.append(1))

    def broken() -> None:
        raise RunphiError("cannot")

    undo.push("second", broken)
    undo.push("third", lambda: done.append(3))
    problems = undo.unwind()
    assert done == [3, 1]
    assert problems == ["second: cannot"]
    assert undo.unwind() == []


def test_discarded_undo_does_nothing():
    done = []
    undo = UndoStack()
    undo.push("x", lambda: done.append(1))
    undo.discard()
    assert undo.unwind() == [] and done == []


def test_shutdown_deadline_from_annotation_or_config():
    assert shutdown_timeout({}, 10000) == 10.0
    assert shutdown_timeout({"org.runphi.shutdown-timeout-ms": "250"}, 10000) == 0.25
    for bad in ("0", "-1", "soon", "1.5"):
        with pytest.raises(BackendError, match="positive number of milliseconds"):
            shutdown_timeout({"org.runphi.shutdown-timeout-ms": bad}, 10000)


def test_destroying_a_vanished_cell_still_releases_its_resources(subreaper, tmp_path):
    from runphi.backends.jailhouse.allocator import ResourceRequest
    from runphi.backends.jailhouse.names import cell_name

    with board_running(tmp_path / "sim") as board:
        (tmp_path / "runphi.toml").write_text("")
        config = load_runtime_config({"RUNPHI_CONFIG": str(tmp_path / "runphi.toml"), "RUNPHI_BACKEND": "jailhouse",
                                      "RUNPHI_SYSFS": str(board.sysfs), "RUNPHI_JAILHOUSE": str(board.tool),
                                      "RUNPHI_PLATFORM": "sim-qemu-arm64", "RUNPHI_STATE_DIR": str(tmp_path / "node")})
        backend = JailhouseBackend(config)
        long_id = "a-container-id-far-longer-than-thirty-one-bytes"
        backend.allocator().allocate(long_id, ResourceRequest(cpu_count=1, memory=16 << 20))
        backend.allocator().allocate("other", ResourceRequest(cpu_count=1, memory=16 << 20))
        backend.destroy_cell(cell_name(long_id))  # no such cell: only the ledger changes
        assert [a.container_id for a in backend.allocator().allocations()] == ["other"]
