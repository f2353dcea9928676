"""The shim's event publisher: envelopes to containerd's ttrpc events service, in order.

Like containerd's own shim publisher (reference/shim-v2.md §2.5, §5.1): events go to
``containerd.services.events.ttrpc.v1.Events/Forward`` on the socket containerd names
in ``TTRPC_ADDRESS``, each in an envelope stamped by the shim (time, namespace, topic,
the event as an Any under its bare type name, typeurl v1).

* :meth:`Publisher.publish` never blocks: it queues the envelope. The queue holds
  :data:`QUEUE_SIZE` waiting events; one more drops the oldest waiting one (with a warn).
* :meth:`Publisher.run` forwards the queue strictly in order, one event at a time. It
  connects on the first event, and again whenever the connection broke (containerd
  restarted: the old connection is closed). An event that fails (no socket, an error
  status, no answer within :data:`CALL_TIMEOUT`) is tried again after 1 s, 2 s, …
  (``backoff`` × attempt), :data:`MAX_RETRIES` times; then it is dropped with a warn and
  the next one goes. An event may arrive twice: one whose answer was lost with the
  connection goes again.
* :meth:`Publisher.flush` waits until what was published so far has been dealt with.

Topics: the task topics of §5.2 and runphi's :data:`CELL_FAILED` (docs/shim-events.md).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from runphi.container import ContainerRecord
from runphi.shim import typeurl
from runphi.shim.metrics import cell_cpus
from runphi.shim.proto import events_service_pb2, runphi_events_pb2
from runphi.shim.ttrpc import ConnectionClosed, TtrpcClient, TtrpcError

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
QUEUE_SIZE = 2048
MAX_RETRIES = 5
#: Seconds a Forward may take (containerd's publisher uses the same).
CALL_TIMEOUT = 5.0

TASK_CREATE = "/tasks/create"
TASK_START = "/tasks/start"
TASK_EXIT = "/tasks/exit"
TASK_DELETE = "/tasks/delete"
TASK_EXEC_ADDED = "/tasks/exec-added"
TASK_EXEC_STARTED = "/tasks/exec-started"
TASK_OOM = "/tasks/oom"
#: runphi's own: a :class:`runphi.shim.proto.runphi_events_pb2.CellFailed`.
CELL_FAILED = "/runphi/cell/failed"

_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
_IDENTIFIER_MAX = 76


def valid_identifier(text: str) -> bool:
    """Whether containerd accepts ``text`` as an identifier (a namespace, a topic component)."""
    return len(text) <= _IDENTIFIER_MAX and _IDENTIFIER.fullmatch(text) is not None


def validate_topic(topic: str) -> None:
    """Raise ValueError unless containerd accepts ``topic``: ``/`` then ``/``-separated identifiers."""
    if not topic.startswith("/") or len(topic) == 1:
        raise ValueError(f"event topic {topic!r} must start with '/' and have a component")
    for component in topic[1:].split("/"):
        if not valid_identifier(component):
            raise ValueError(f"event topic {topic!r}: {component!r} is not a valid identifier")


def cell_failed(record: ContainerRecord, state: str, failed_cpus: Iterable[int],
                failed_at_ns: int | None = None) -> runphi_events_pb2.CellFailed:
    """The :data:`CELL_FAILED` event of ``record``'s cell, in ``state`` (the hypervisor's word),
    seen at ``failed_at_ns`` (ns since the epoch; now by default)."""
    event = runphi_events_pb2.CellFailed(container_id=record.id, cell=record.cell.cell_name,
                                         failed_cpus=sorted(failed_cpus), state=state,
                                         cpus=cell_cpus(record, None))
    event.failed_at.FromNanoseconds(time.time_ns() if failed_at_ns is None else failed_at_ns)
    return event


@dataclass
class _Item:
    seq: int
    request: events_service_pb2.ForwardRequest

    def describe(self) -> str:
        envelope = self.request.envelope
        return f"{envelope.topic} ({envelope.event.type_url})"


class Publisher:
    """Forwards published events to containerd in order (see the module docstring).

    Use it from the trio thread only. ``warn`` gets one line per dropped event.
    ``retries``, ``backoff``, ``queue_size`` and ``call_timeout`` default to
    containerd's values; tests shorten them.
    """

    def __init__(self, ttrpc_address: str, namespace: str, warn: Callable[[str], None], *,
                 queue_size: int = QUEUE_SIZE, retries: int = MAX_RETRIES, backoff: float = 1.0,
                 call_timeout: float = CALL_TIMEOUT) -> None:
        if not valid_identifier(namespace):
            raise ValueError(f"namespace {namespace!r} is not a valid identifier")
        self.address = ttrpc_address.removeprefix("unix://")
        self.namespace = namespace
        self._warn = warn
        self._queue_size, self._retries, self._backoff = queue_size, retries, backoff
        self._call_timeout = call_timeout
        self._queue: deque[_Item] = deque()
        self._current: _Item | None = None
        self._published = 0
        # Sequence numbers of dropped events a flush may still have to report.
        self._dropped: list[int] = []
        self._flush_mark = 0
        self._flushing = 0
        self._changed = trio.Event()
        self._client: TtrpcClient | None = None
        self._nursery: trio.Nursery | None = None

    def publish(self, topic: str, event: Message) -> None:
        """Queue ``event`` under ``topic``, stamped now; never blocks.

        Raises ValueError for a topic containerd would reject (a programming error).
        When the queue is full, the oldest waiting event is dropped (and warned about).
        """
        validate_topic(topic)
        envelope = events_service_pb2.Envelope(namespace=self.namespace, topic=topic, event=typeurl.pack(event))
        envelope.timestamp.FromNanoseconds(time.time_ns())
        self._published += 1
        self._queue.append(_Item(self._published, events_service_pb2.ForwardRequest(envelope=envelope)))
        if len(self._queue) > self._queue_size:
            oldest = self._queue.popleft()
            self._drop(oldest, f"the queue of {self._queue_size} events is full")
        self._notify()

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every event published before the call was
        forwarded or dropped.

        True when they all were dealt with in time and none of those published since the
        previous flush began was dropped; False otherwise.
        """
        target, since = self._published, self._flush_mark
        self._flush_mark = target
        self._flushing += 1
        try:
            with trio.move_on_after(timeout):
                while self._unfinished_from() <= target:
                    await self._changed.wait()
        finally:
            self._flushing -= 1
        lost = any(since < seq <= target for seq in self._dropped)
        if not self._flushing:  # no flush still needs the drops up to the mark
            self._dropped = [seq for seq in self._dropped if seq > self._flush_mark]
        return self._unfinished_from() > target and not lost

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward queued events until cancelled; signals ``task_status.started()`` at once.

        An event in flight when cancelled goes back to the head of the queue.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._forward_forever()
            finally:
                if self._current is not None:
                    self._queue.appendleft(self._current)
                    self._current = None
                with trio.CancelScope(shield=True):
                    await self._disconnect()
                nursery.cancel_scope.cancel()

    async def _forward_forever(self) -> None:
        while True:
            while not self._queue:
                await self._changed.wait()
            item = self._current = self._queue.popleft()
            error = await self._deliver(item)
            self._current = None
            if error is not None:
                self._drop(item, f"{self._retries + 1} attempts to forward it to {self.address} failed, "
                                 f"the last with: {error}")
            self._notify()

    async def _deliver(self, item: _Item) -> Exception | None:
        """Forward ``item``, retrying with a growing pause; None once sent, else the last error."""
        error: Exception | None = None
        for attempt in range(self._retries + 1):
            if attempt:
                await trio.sleep(self._backoff * attempt)
            try:
                try:
                    await self._forward(item)
                except ConnectionClosed:
                    # A connection that broke since the last event (containerd restarted):
                    # one fresh connection at once, as containerd's publisher does.
                    await self._forward(item)
                return None
            except (TtrpcError, ConnectionClosed, OSError) as exc:
                error = exc
        return error

    async def _forward(self, item: _Item) -> None:
        """One Forward call; a broken connection is closed and forgotten (ConnectionClosed)."""
        client = await self._connection()
        try:
            await client.call(EVENTS_SERVICE, "Forward", item.request, empty_pb2.Empty, timeout=self._call_timeout)
        except ConnectionClosed:
            await self._disconnect()
            raise

    async def _connection(self) -> TtrpcClient:
        """The open connection, or a new one (OSError when containerd's socket does not answer)."""
        if self._client is None:
            assert self._nursery is not None
            stream = await trio.open_unix_socket(self.address)
            self._client = TtrpcClient(stream)
            self._nursery.start_soon(self._client.run)
        return self._client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _drop(self, item: _Item, reason: str) -> None:
        self._dropped.append(item.seq)
        self._warn(f"event {item.describe()} dropped: {reason}")

    def _unfinished_from(self) -> int:
        """The lowest sequence number neither forwarded nor dropped (past the last one if none)."""
        if self._current is not None:
            return self._current.seq
        return self._queue[0].seq if self._queue else self._published + 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
