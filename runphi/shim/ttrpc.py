"""ttrpc, containerd's RPC protocol for shims, on trio (reference/shim-v2.md §3).

A connection carries only frames: a 10-byte big-endian header (payload length, stream
id, type, flags) and a protobuf payload of at most 4 MiB. A client sends a
``ttrpc.Request`` on an odd stream id; the server answers a ``ttrpc.Response`` on the
same id, with a ``google.rpc.Status`` only on failure. Only unary calls exist here (the
Task API and the events service are unary).

* :func:`serve` / :func:`serve_connection`: the server. Each request runs in its own
  task, so responses leave in completion order; one lock serializes frame writes.
* :class:`TtrpcClient` (via :func:`open_client`): concurrent calls on one connection,
  matched by stream id; the shim uses it to publish events to containerd.
* :func:`encode_frame` / :class:`FrameReader`: the framing both use.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf.message import DecodeError

from runphi.shim.proto import status_pb2, ttrpc_pb2

HEADER = struct.Struct(">IIBB")
MAX_PAYLOAD = 4 << 20
TYPE_REQUEST = 0x01
TYPE_RESPONSE = 0x02

_log = logging.getLogger(__name__)


class Code(enum.IntEnum):
    """gRPC status codes (the numbers containerd's ``errdefs.FromGRPC`` maps)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A call's failure status: a handler raises it, a client call raises it on a non-OK response."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class ProtocolError(Exception):
    """The byte stream is not a sequence of frames (e.g. it ended inside one)."""


class FrameTooLarge(Exception):
    """A frame declared a payload over the cap; its payload has been read and dropped."""

    def __init__(self, stream_id: int, length: int) -> None:
        super().__init__(f"frame of {length} bytes on stream {stream_id} exceeds {MAX_PAYLOAD}")
        self.stream_id = stream_id
        self.length = length


@dataclass(frozen=True)
class Frame:
    """One received frame."""

    stream_id: int
    type: int
    flags: int
    payload: bytes


def encode_frame(stream_id: int, frame_type: int, payload: bytes, flags: int = 0) -> bytes:
    """Header + payload, ready to send; raises ValueError for a payload over :data:`MAX_PAYLOAD`."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), stream_id, frame_type, flags) + payload


class FrameReader:
    """Reads whole frames from a trio receive stream, buffering partial reads."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_payload: int = MAX_PAYLOAD) -> None:
        self._stream = stream
        self._max_payload = max_payload
        self._buffer = bytearray()

    async def _fill(self, size: int) -> bool:
        """Buffer at least ``size`` bytes; False if the stream ended first."""
        while len(self._buffer) < size:
            chunk = await self._stream.receive_some()
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _discard(self, size: int) -> None:
        """Drop the next ``size`` bytes without holding them all in memory."""
        while size:
            if not self._buffer and not await self._fill(1):
                raise ProtocolError("stream ended inside an oversized frame")
            dropped = min(size, len(self._buffer))
            del self._buffer[:dropped]
            size -= dropped

    async def read(self) -> Frame | None:
        """The next frame, or None when the stream ends cleanly between frames.

        Raises :class:`FrameTooLarge` for an oversized frame (after skipping it, so
        reading can go on) and :class:`ProtocolError` if the stream ends inside a frame.
        """
        if not await self._fill(HEADER.size):
            if self._buffer:
                raise ProtocolError("stream ended inside a frame header")
            return None
        length, stream_id, frame_type, flags = HEADER.unpack(self._take(HEADER.size))
        if length > self._max_payload:
            await self._discard(length)
            raise FrameTooLarge(stream_id, length)
        if not await self._fill(length):
            raise ProtocolError("stream ended inside a frame payload")
        return Frame(stream_id, frame_type, flags, self._take(length))


class FrameWriter:
    """Sends frames on a trio stream; concurrent senders are serialized by one lock."""

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        self._lock = trio.Lock()

    async def send(self, stream_id: int, frame_type: int, payload: bytes) -> None:
        """Send one whole frame; frames from concurrent callers never interleave."""
        frame = encode_frame(stream_id, frame_type, payload)
        async with self._lock:
            await self._stream.send_all(frame)


# ------------------------------------------------------------------------- server

Handler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    """A unary method: its request message class and ``async def handler(request) -> response``."""

    request_type: type
    handler: Handler


Services = Mapping[str, Mapping[str, Method]]


def error_response(code: Code, message: str) -> Any:
    """A ttrpc Response carrying only a failure status."""
    return ttrpc_pb2.Response(status=status_pb2.Status(code=int(code), message=message))


def _parse(message_type: type, payload: bytes, what: str) -> Any:
    """``payload`` decoded as ``message_type``; INVALID_ARGUMENT if it does not decode."""
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"cannot decode {what}: {exc}") from exc
    return message


def _lookup(services: Services, request: Any) -> Method:
    """The method a request names; UNIMPLEMENTED naming the unknown service or method."""
    methods = services.get(request.service)
    if methods is None:
        raise TtrpcError(Code.UNIMPLEMENTED, f"service {request.service}")
    method = methods.get(request.method)
    if method is None:
        raise TtrpcError(Code.UNIMPLEMENTED, f"method {request.method}")
    return method


async def _run_handler(method: Method, message: Any, timeout_nano: int) -> Any:
    """The handler's response, under the client's deadline when it sent one (> 0)."""
    if timeout_nano <= 0:
        return await method.handler(message)
    with trio.move_on_after(timeout_nano / 1e9):
        return await method.handler(message)
    raise TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")


async def _dispatch(services: Services, frame: Frame) -> Any:
    """The Response for one request frame; raises TtrpcError for protocol-level failures."""
    if frame.stream_id % 2 != 1:
        raise TtrpcError(Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
    request = _parse(ttrpc_pb2.Request, frame.payload, "request")
    method = _lookup(services, request)
    message = _parse(method.request_type, request.payload, f"{request.service}/{request.method} payload")
    response = await _run_handler(method, message, request.timeout_nano)
    return ttrpc_pb2.Response(payload=response.SerializeToString())


async def _answer(services: Services, writer: FrameWriter, frame: Frame) -> None:
    """Handle one request and send its response on the same stream id.

    Cancellation (the connection closing) propagates; every exception a handler raises
    becomes a status: TtrpcError its own, anything else UNKNOWN (and logged).
    """
    try:
        response = await _dispatch(services, frame)
    except TtrpcError as exc:
        response = error_response(exc.code, exc.message)
    except Exception as exc:
        _log.exception("ttrpc request on stream %d failed", frame.stream_id)
        response = error_response(Code.UNKNOWN, str(exc))
    payload = response.SerializeToString()
    if len(payload) > MAX_PAYLOAD:
        payload = error_response(Code.RESOURCE_EXHAUSTED, "response exceeds 4 MiB").SerializeToString()
    await _send_quietly(writer, frame.stream_id, payload)


async def _send_quietly(writer: FrameWriter, stream_id: int, payload: bytes) -> None:
    """Send a response; a peer that has gone away no longer wants it."""
    try:
        await writer.send(stream_id, TYPE_RESPONSE, payload)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _read_requests(services: Services, stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
    """Start a task per request frame until the peer closes, breaks framing or the connection breaks."""
    reader, writer = FrameReader(stream), FrameWriter(stream)
    while True:
        try:
            frame = await reader.read()
        except FrameTooLarge as exc:
            response = error_response(Code.RESOURCE_EXHAUSTED, str(exc))
            nursery.start_soon(_send_quietly, writer, exc.stream_id, response.SerializeToString())
            continue
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            _log.debug("ttrpc connection ended: %s", exc)
            return
        if frame is None:
            return
        # Unknown frame types (a ttrpc >= 1.2 data frame, say) are ignored, as in Go.
        if frame.type == TYPE_REQUEST:
            nursery.start_soon(_answer, services, writer, frame)


async def serve_connection(stream: trio.abc.Stream, services: Services) -> None:
    """Serve one connection until the peer closes it; then cancel its unfinished requests.

    Returns (closing ``stream``) once the peer has hung up, the bytes stopped being
    frames, or the connection broke; it never raises for any of those.
    """
    async with stream, trio.open_nursery() as nursery:
        await _read_requests(services, stream, nursery)
        # Like Go's ttrpc, a request's context ends with its connection (a Wait, say).
        nursery.cancel_scope.cancel()


async def serve(listener: trio.abc.Listener[Any], services: Services, *,
                task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections on ``listener`` forever, each served by :func:`serve_connection`.

    ``services`` maps a service name (``containerd.task.v2.Task``) to its methods by
    name (``Create``). Signals ``task_status.started()`` once accepting.
    """
    async def handle(stream: trio.abc.Stream) -> None:
        await serve_connection(stream, services)

    await trio.serve_listeners(handle, [listener], task_status=task_status)


# ------------------------------------------------------------------------- client


class ConnectionClosed(Exception):
    """The connection ended before the call's response arrived."""


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    response: Any = None
    error: Exception | None = None


class TtrpcClient:
    """Unary ttrpc calls over one stream: odd stream ids 1, 3, 5…, any number in flight.

    :func:`open_client` runs its response reader; or start :meth:`run` in a nursery
    yourself and :meth:`aclose` the client when done.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._writer = FrameWriter(stream)
        self._next_stream_id = 1
        self._pending: dict[int, _Pending] = {}
        self._closed: Exception | None = None

    async def call(self, service: str, method: str, request: Any, response_type: type,
                   timeout: float | None = None) -> Any:
        """The decoded response of ``service/method``; raises TtrpcError on a failure status.

        ``timeout`` (seconds) is sent as ``timeout_nano`` and also bounds the local wait
        (DEADLINE_EXCEEDED). Raises :class:`ConnectionClosed` if the connection ends first.
        """
        if self._closed is not None:
            raise self._closed
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        timeout_nano = int(timeout * 1e9) if timeout is not None else 0
        envelope = ttrpc_pb2.Request(service=service, method=method, timeout_nano=timeout_nano,
                                     payload=request.SerializeToString())
        pending = self._pending[stream_id] = _Pending()
        try:
            await self._send_request(stream_id, envelope.SerializeToString())
            with trio.move_on_after(timeout if timeout is not None else float("inf")):
                await pending.done.wait()
        finally:
            del self._pending[stream_id]
        return _result(pending, response_type)

    async def _send_request(self, stream_id: int, payload: bytes) -> None:
        try:
            await self._writer.send(stream_id, TYPE_REQUEST, payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"ttrpc connection failed: {exc}") from exc

    async def aclose(self) -> None:
        """Close the stream; :meth:`run` then returns and waiting calls fail."""
        await self._stream.aclose()

    def _deliver(self, frame: Frame) -> None:
        pending = self._pending.get(frame.stream_id)
        if frame.type != TYPE_RESPONSE or pending is None:
            return  # a late answer to a call that timed out, or a frame type we do not speak
        try:
            pending.response = _parse(ttrpc_pb2.Response, frame.payload, "response")
        except TtrpcError as exc:
            pending.error = exc
        pending.done.set()

    async def run(self) -> None:
        """Deliver responses until the stream ends or is closed; then fail every call still waiting.

        Never raises for a broken or closed connection.
        """
        reader = FrameReader(self._stream)
        try:
            while (frame := await reader.read()) is not None:
                self._deliver(frame)
            self._closed = ConnectionClosed("ttrpc connection closed")
        except (ProtocolError, FrameTooLarge, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed = ConnectionClosed(f"ttrpc connection failed: {exc}")
        for pending in self._pending.values():
            pending.error = self._closed
            pending.done.set()


def _known_code(code: int) -> Code:
    """``code`` as a :class:`Code`; a number outside gRPC's set counts as UNKNOWN."""
    try:
        return Code(code)
    except ValueError:
        return Code.UNKNOWN


def _result(pending: _Pending, response_type: type) -> Any:
    """A finished (or abandoned) call's decoded response, or the exception it ended with."""
    if not pending.done.is_set():
        raise TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
    if pending.error is not None:
        raise pending.error
    response = pending.response
    code = response.status.code if response.HasField("status") else Code.OK
    if code != Code.OK:
        raise TtrpcError(_known_code(code), response.status.message)
    return _parse(response_type, response.payload, "response payload")


@asynccontextmanager
async def open_client(stream: trio.abc.Stream) -> AsyncIterator[TtrpcClient]:
    """A client on ``stream`` with its reader running; on exit the stream is closed.

    An exception from the ``async with`` body comes out as itself, not inside an
    exception group (the reader task never raises).
    """
    client = TtrpcClient(stream)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        raise group.exceptions[0] from None


@asynccontextmanager
async def connect_unix(path: str) -> AsyncIterator[TtrpcClient]:
    """A client connected to the ttrpc server listening on the unix socket ``path``."""
    stream = await trio.open_unix_socket(path)
    async with open_client(stream) as client:
        yield client
