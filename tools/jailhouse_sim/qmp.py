"""A small QMP (QEMU Machine Protocol) client over any trio byte stream.

QMP is one JSON object per line. After the greeting the client must send
``qmp_capabilities``; from then on command replies (matched by ``id``) and
asynchronous events (``SHUTDOWN``, ``RESET``, ``STOP``...) arrive interleaved,
so one task (:meth:`QmpClient.serve`) reads every line and routes it.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import trio


class QmpError(Exception):
    """QEMU answered a command with an error, or the connection ended."""


class QmpVersion(msgspec.Struct):
    qemu: dict[str, int]
    package: str = ""


class QmpGreetingBody(msgspec.Struct):
    version: QmpVersion
    capabilities: list[str] = []


class QmpGreeting(msgspec.Struct):
    QMP: QmpGreetingBody


class QmpErrorBody(msgspec.Struct):
    desc: str
    # `class` is a Python keyword.
    error_class: str = msgspec.field(default="", name="class")


class QmpMessage(msgspec.Struct):
    """Any message after the greeting: a reply (return/error + id) or an event."""

    event: str | None = None
    data: dict[str, Any] = {}
    timestamp: dict[str, int] = {}
    result: Any = msgspec.field(default=msgspec.UNSET, name="return")
    error: QmpErrorBody | None = None
    id: int | None = None


class QmpCommand(msgspec.Struct, omit_defaults=True):
    execute: str
    arguments: dict[str, Any] | None = None
    id: int | None = None


class ShutdownEventData(msgspec.Struct):
    """Payload of the SHUTDOWN event: ``guest`` is true when the guest asked for it;
    ``reason`` is ``guest-shutdown``, ``guest-reset``, ``guest-panic``, ``host-qmp-quit``..."""

    guest: bool
    reason: str


class QmpEvent(msgspec.Struct, frozen=True):
    """An asynchronous event, e.g. ``SHUTDOWN`` with data ``{"guest": true, "reason": "guest-shutdown"}``."""

    name: str
    data: dict[str, Any]


_greeting_decoder = msgspec.json.Decoder(QmpGreeting)
_message_decoder = msgspec.json.Decoder(QmpMessage)
_encoder = msgspec.json.Encoder()

MAX_LINE = 1 << 20


class LineReader:
    """Split a byte stream into lines; returns b"" at end of stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> bytes:
        """Return the next line without its terminator, or b"" once the stream ended."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[: end + 1]
                # A blank line never happens in QMP; skip it rather than report EOF.
                if line:
                    return line
                continue
            if len(self._buffer) > MAX_LINE:
                raise QmpError(f"QMP line longer than {MAX_LINE} bytes")
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return b""
            self._buffer += chunk


class QmpClient:
    """One QMP session. Create with :meth:`connect`, run :meth:`serve` in a task,
    then call :meth:`execute`; events are received from :attr:`events`."""

    def __init__(self, stream: trio.abc.Stream, reader: LineReader, greeting: QmpGreeting) -> None:
        self._stream = stream
        self._reader = reader
        self.greeting = greeting
        self._next_id = 1
        self._pending: dict[int, _Reply] = {}
        self._closed = False
        self._event_send, self.events = trio.open_memory_channel[QmpEvent](math.inf)

    @classmethod
    async def connect(cls, stream: trio.abc.Stream) -> QmpClient:
        """Read the greeting and leave capabilities negotiation mode.

        Raises QmpError if the peer closes or sends something that is not QMP."""
        reader = LineReader(stream)
        try:
            line = await reader.readline()
            if not line:
                raise QmpError("QMP connection closed before the greeting")
            greeting = _greeting_decoder.decode(line)
            await stream.send_all(_encoder.encode(QmpCommand("qmp_capabilities")) + b"\n")
            reply = _message_decoder.decode(await reader.readline() or b"{}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise QmpError("QMP connection closed during the handshake") from None
        except msgspec.DecodeError as exc:
            raise QmpError(f"not QMP: {exc}") from None
        if reply.error is not None or reply.result is msgspec.UNSET:
            raise QmpError(f"qmp_capabilities refused: {reply}")
        return cls(stream, reader, greeting)

    async def serve(self) -> None:
        """Route every incoming message until the connection ends.

        On return the event channel is closed and pending commands fail."""
        try:
            while line := await self._reader.readline():
                self._route(_message_decoder.decode(line))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except msgspec.DecodeError as exc:
            raise QmpError(f"not QMP: {exc}") from None
        finally:
            self._closed = True
            self._event_send.close()
            for reply in self._pending.values():
                reply.fail(QmpError("QMP connection closed"))
            self._pending.clear()

    def _route(self, message: QmpMessage) -> None:
        if message.event is not None:
            self._event_send.send_nowait(QmpEvent(message.event, message.data))
            return
        reply = self._pending.pop(message.id, None) if message.id is not None else None
        if reply is None:
            return
        if message.error is not None:
            reply.fail(QmpError(f"{message.error.error_class}: {message.error.desc}"))
        else:
            reply.succeed(message.result)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its ``return`` value; raises QmpError on an error reply."""
        if self._closed:
            raise QmpError("QMP connection closed")
        command_id = self._next_id
        self._next_id += 1
        reply = _Reply()
        self._pending[command_id] = reply
        try:
            await self._stream.send_all(_encoder.encode(QmpCommand(command, arguments, command_id)) + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._pending.pop(command_id, None)
            raise QmpError("QMP connection closed") from None
        return await reply.wait()


class _Reply:
    """The future result of one command."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: Any = None
        self._error: QmpError | None = None

    def succeed(self, value: Any) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: QmpError) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value
