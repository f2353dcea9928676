"""runphi.shim.events: the publisher against a real ttrpc events server, and a real containerd.

The fake containerd is :func:`runphi.shim.ttrpc.serve` on a unix socket serving
``Events/Forward``; tests wait on what it received (a channel), never on time.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from google.protobuf import empty_pb2, timestamp_pb2

from runphi.shim.events import CELL_FAILED, EVENTS_SERVICE, QUEUE_SIZE, TASK_EXIT, Publisher, validate_topic
from runphi.shim.proto import events_pb2, events_service_pb2, runphi_events_pb2
from runphi.shim.ttrpc import Code, Method, TtrpcError, serve
from tools.testbed.containerd import NAMESPACE, EventLog

GUARD = 30  # seconds: a bound on a publisher bug, not synchronisation


class FakeEvents:
    """containerd's ttrpc events service as far as Forward goes; can be stopped and restarted.

    Received envelopes go to ``received`` in arrival order; ``attempts`` counts Forward
    calls per topic; a topic in ``failing`` is answered UNAVAILABLE.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._send, self.received = trio.open_memory_channel[events_service_pb2.Envelope](math.inf)
        self.attempts: Counter[str] = Counter()
        self.attempted_at: list[float] = []
        self.failing: set[str] = set()
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def forward(self, request):
        envelope = request.envelope
        self.attempts[envelope.topic] += 1
        self.attempted_at.append(trio.current_time())
        if envelope.topic in self.failing:
            raise TtrpcError(Code.UNAVAILABLE, "try later")
        self._send.send_nowait(envelope)
        return empty_pb2.Empty()

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen on ``path`` (a fresh socket) until :meth:`stop`."""
        await nursery.start(self._serve)

    async def _serve(self, task_status) -> None:
        Path(self.path).unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen()
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                await serve(trio.SocketListener(sock), {EVENTS_SERVICE: {
                    "Forward": Method(events_service_pb2.ForwardRequest, self.forward)}}, task_status=task_status)
        finally:
            sock.close()
            self._stopped.set()

    async def stop(self) -> None:
        """Close the listener and every connection (what a containerd restart does)."""
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()

    def drain(self) -> list[events_service_pb2.Envelope]:
        """Everything received and not yet taken."""
        envelopes = []
        while True:
            try:
                envelopes.append(self.received.receive_nowait())
            except trio.WouldBlock:
                return envelopes


@pytest.fixture
def socket_path() -> Iterator[str]:
    # Short on purpose: a unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="ev-") as directory:
        yield str(Path(directory) / "s")


@pytest.fixture
async def server(nursery, socket_path) -> FakeEvents:
    fake = FakeEvents(socket_path)
    await fake.start(nursery)
    return fake


@pytest.fixture
def warnings() -> list[str]:
    return []


def start(container_id: str) -> events_pb2.TaskStart:
    return events_pb2.TaskStart(container_id=container_id, pid=1)


def container_ids(envelopes) -> list[str]:
    return [events_pb2.TaskStart.FromString(e.event.value).container_id for e in envelopes]


# ------------------------------------------------------------------------- envelope and topics


async def test_envelope_is_stamped_at_publish_with_the_bare_type_name(nursery, server, warnings):
    publisher = Publisher(server.path, "k8s.io", warnings.append)
    before = time.time_ns()
    exit_event = events_pb2.TaskExit(container_id="c1", id="c1", pid=42, exit_status=3)
    publisher.publish(TASK_EXIT, exit_event)
    after = time.time_ns()
    await nursery.start(publisher.run)
    with trio.fail_after(GUARD):
        envelope = await server.received.receive()
    assert (envelope.namespace, envelope.topic) == ("k8s.io", "/tasks/exit")
    assert envelope.event.type_url == "containerd.events.TaskExit"
    assert events_pb2.TaskExit.FromString(envelope.event.value) == exit_event
    assert before <= envelope.timestamp.ToNanoseconds() <= after
    assert await publisher.flush(GUARD) and warnings == []


@pytest.mark.parametrize("topic", ["tasks/exit", "", "/", "/tasks//exit", "/tasks/exit/", "/tasks/ex it",
                                   "/tasks/-exit", "/tasks/exit_", "/" + "a" * 77])
def test_a_topic_containerd_would_reject_is_a_value_error(topic):
    publisher = Publisher("/nonexistent", "default", lambda line: None)
    with pytest.raises(ValueError):
        publisher.publish(topic, start("c1"))


@pytest.mark.parametrize("topic", ["/tasks/exec-added", CELL_FAILED, "/a", "/" + "a" * 76, "/v1.2/x_y"])
def test_valid_topics(topic):
    validate_topic(topic)


def test_an_invalid_namespace_is_a_value_error():
    with pytest.raises(ValueError):
        Publisher("/nonexistent", "bad namespace", lambda line: None)


# ------------------------------------------------------------------------- delivery


async def test_events_arrive_in_publish_order(nursery, server, warnings):
    publisher = Publisher(server.path, "default", warnings.append)
    await nursery.start(publisher.run)
    for n in range(100):
        publisher.publish("/tasks/start", start(f"c{n}"))
        if n % 7 == 0:
            await trio.lowlevel.checkpoint()  # let some go while others are still being published
    assert await publisher.flush(GUARD)
    assert container_ids(server.drain()) == [f"c{n}" for n in range(100)]
    assert server.attempts["/tasks/start"] == 100 and warnings == []


async def test_run_needs_no_socket_until_the_first_event(nursery, socket_path, warnings):
    publisher = Publisher(socket_path, "default", warnings.append)
    await nursery.start(publisher.run)  # nothing listens yet: run does not care
    server = FakeEvents(socket_path)
    await server.start(nursery)
    publisher.publish("/tasks/start", start("late"))
    assert await publisher.flush(GUARD)
    assert container_ids(server.drain()) == ["late"]


async def test_a_restarted_containerd_gets_the_next_event_without_a_retry_pause(nursery, server, warnings):
    # A backoff longer than the guard: delivery proves the reconnect needed no pause.
    publisher = Publisher(server.path, "default", warnings.append, backoff=10 * GUARD)
    await nursery.start(publisher.run)
    publisher.publish("/tasks/start", start("before"))
    assert await publisher.flush(GUARD)
    await server.stop()
    await server.start(nursery)
    publisher.publish("/tasks/start", start("after"))
    assert await publisher.flush(GUARD)
    assert container_ids(server.drain()) == ["before", "after"] and warnings == []


async def test_events_published_while_containerd_is_down_arrive_after_it_is_back(nursery, server, warnings):
    publisher = Publisher(server.path, "default", warnings.append, backoff=0.1)
    await nursery.start(publisher.run)
    first = [f"a{n}" for n in range(20)]
    for cid in first:
        publisher.publish("/tasks/start", start(cid))
    assert await publisher.flush(GUARD)  # every answer is in: nothing can arrive twice
    await server.stop()
    second = [f"b{n}" for n in range(20)]
    for cid in second:
        publisher.publish("/tasks/start", start(cid))
    await trio.lowlevel.checkpoint()  # the publisher finds the connection broken
    await server.start(nursery)
    assert await publisher.flush(GUARD)
    assert container_ids(server.drain()) == first + second and warnings == []


async def test_an_event_answered_with_errors_is_retried_then_dropped_and_the_next_goes(nursery, server, warnings):
    backoff = 0.01
    server.failing.add("/test/bad")
    publisher = Publisher(server.path, "default", warnings.append, backoff=backoff)
    await nursery.start(publisher.run)
    publisher.publish("/test/bad", start("bad"))
    publisher.publish("/tasks/start", start("good"))
    with trio.fail_after(GUARD):
        envelope = await server.received.receive()
    assert container_ids([envelope]) == ["good"]
    assert server.attempts["/test/bad"] == 6  # the first try and 5 retries
    gaps = [b - a for a, b in zip(server.attempted_at, server.attempted_at[1:6])]
    assert all(gap >= backoff * n for n, gap in enumerate(gaps, 1)), gaps  # the pause grows
    assert len(warnings) == 1
    assert "/test/bad (containerd.events.TaskStart) dropped" in warnings[0]
    assert "6 attempts" in warnings[0] and "UNAVAILABLE: try later" in warnings[0]
    assert not await publisher.flush(GUARD)  # one of those published since the start was lost
    publisher.publish("/tasks/start", start("next"))
    assert await publisher.flush(GUARD)  # ...but none since the previous flush


async def test_a_full_queue_drops_the_oldest_waiting_event(nursery, server, warnings):
    publisher = Publisher(server.path, "default", warnings.append)
    for n in range(QUEUE_SIZE + 2):  # not running yet: everything waits
        publisher.publish(f"/test/e{n}", start(f"c{n}"))
    assert len(warnings) == 2
    assert warnings[0].startswith("event /test/e0 (containerd.events.TaskStart) dropped: the queue of 2048")
    assert warnings[1].startswith("event /test/e1 ")
    await nursery.start(publisher.run)
    assert not await publisher.flush(GUARD)  # all dealt with, two of them lost
    assert [e.topic for e in server.drain()] == [f"/test/e{n}" for n in range(2, QUEUE_SIZE + 2)]


async def test_flush_without_a_running_publisher_times_out(socket_path):
    publisher = Publisher(socket_path, "default", lambda line: None)
    assert await publisher.flush(0)  # nothing published: nothing to wait for
    publisher.publish("/tasks/start", start("c1"))
    assert not await publisher.flush(0.01)


# ------------------------------------------------------------------------- a real containerd


@pytest.fixture
def event_log(containerd, tmp_path) -> Iterator[EventLog]:
    log = EventLog(containerd, tmp_path / "events.log")
    try:
        yield log
    finally:
        log.close()


@pytest.mark.containerd
async def test_a_real_containerd_hands_the_task_exit_to_ctr_events(containerd, event_log, nursery, warnings):
    publisher = Publisher(str(containerd.base / "ttrpc.sock"), NAMESPACE, warnings.append)
    await nursery.start(publisher.run)
    exited_at = timestamp_pb2.Timestamp()
    exited_at.FromNanoseconds(time.time_ns())
    # ctr does not know runphi's type: it skips the event and says so (reference/shim-v2.md §5.4).
    publisher.publish(CELL_FAILED, runphi_events_pb2.CellFailed(container_id="pub-e2e", state="failed"))
    publisher.publish(TASK_EXIT, events_pb2.TaskExit(container_id="pub-e2e", id="pub-e2e", pid=4242,
                                                     exit_status=7, exited_at=exited_at))
    assert await publisher.flush(GUARD), warnings
    assert await trio.to_thread.run_sync(event_log.exit_status, "pub-e2e") == 7
    [(topic, payload)] = event_log.topics("pub-e2e")
    assert topic == "/tasks/exit" and payload["pid"] == 4242
    line = next(line for line in event_log.path.read_text().splitlines() if "/tasks/exit" in line)
    assert f" {NAMESPACE} /tasks/exit " in line
    # Published first, so ctr had dealt with it before the exit.
    assert "type with url runphi.events.v1.CellFailed: not found" in event_log.path.read_text()


def test_cell_failed_names_the_cell_its_cpus_and_when():
    from runphi.backends.base import CellRecord
    from runphi.container import ContainerRecord
    from runphi.shim.events import cell_failed

    record = ContainerRecord(id="zic-1", bundle="/b", rootfs="/b/rootfs", created="2026-12-01T00:00:00Z",
                             status="running", oci_version="1.0.2",
                             cell=CellRecord(cell_name="runphi-zic-1", allocation={"cpus": [3, 2]}))
    event = cell_failed(record, "failed", {3}, failed_at_ns=1_796_000_000_123_456_789)
    assert (event.container_id, event.cell, list(event.failed_cpus), event.state, list(event.cpus)) == (
        "zic-1", "runphi-zic-1", [3], "failed", [2, 3])
    assert event.failed_at.ToNanoseconds() == 1_796_000_000_123_456_789
    before = time.time_ns()
    assert before <= cell_failed(record, "Comm ABI mismatch", []).failed_at.ToNanoseconds() <= time.time_ns()
