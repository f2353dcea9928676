"""QEMU's machine protocol (QMP): the messages runphi reads, and a blocking client.

QMP is one JSON object per line. After the greeting (``{"QMP": ...}``) a client
sends ``qmp_capabilities``; every command then gets exactly one ``return`` or
``error`` reply, and asynchronous ``event`` messages may come in between. This
module parses lines into :class:`QmpMessage` (msgspec) and offers
:class:`BlockingQmp`, the client of the verbs (``start``, ``state``, ``delete``)
and of the owner's bring-up; the owner's event loop (``watch``) reads the same
messages through trio.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import msgspec

from runphi.backends.base import BackendError

#: The control socket in a cell's directory, served by QEMU for the verbs.
CONTROL_SOCKET = "qmp.sock"


def control_path(dir_fd: int) -> str:
    """The control socket's address through an fd of its cell's directory: short whatever the
    directory's own path (a socket address holds 108 bytes)."""
    return f"/proc/self/fd/{dir_fd}/{CONTROL_SOCKET}"


class QmpError(BackendError):
    """QEMU refused a command, closed the connection or did not answer in time."""


class QmpMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One line from QEMU: a greeting, a reply (``return``/``error``) or an ``event``."""

    QMP: dict[str, Any] | None = None
    event: str | None = None
    data: dict[str, Any] = {}
    error: dict[str, Any] | None = None
    #: A reply's value; ``return`` is a Python keyword, hence the rename.
    value: Any = msgspec.field(default=None, name="return")

    @property
    def is_reply(self) -> bool:
        return self.event is None and self.QMP is None


class VcpuThread(msgspec.Struct, frozen=True):
    """One entry of ``query-cpus-fast``: a vCPU and the host thread that runs it."""

    cpu_index: int = msgspec.field(name="cpu-index")
    thread_id: int = msgspec.field(name="thread-id")


_decoder = msgspec.json.Decoder(QmpMessage)


def parse_line(line: bytes) -> QmpMessage:
    """One QMP line; QmpError when it is not a QMP message."""
    try:
        return _decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise QmpError(f"QEMU sent something that is not QMP: {line[:120]!r} ({exc})") from None


def command_line(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    """The line that sends ``command``."""
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    return msgspec.json.encode(message) + b"\n"


def reply_value(reply: QmpMessage, command: str) -> Any:
    """A reply's value; QmpError naming QEMU's own words when it is an error."""
    if reply.error is not None:
        raise QmpError(f"QEMU refused {command}: {reply.error.get('desc', reply.error)}")
    return reply.value


def vcpu_threads(value: Any) -> list[VcpuThread]:
    """``query-cpus-fast``'s value, by vCPU index."""
    return sorted(msgspec.convert(value, list[VcpuThread]), key=lambda cpu: cpu.cpu_index)


class BlockingQmp:
    """A QMP session over a connected socket, every read under ``timeout`` (events are kept)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._buffer = b""
        self.events: list[QmpMessage] = []

    @classmethod
    def connect(cls, cell_dir: str, timeout: float) -> BlockingQmp:
        """Open the control socket of the cell in ``cell_dir`` and negotiate.

        The path goes through an fd of the directory, so that a deep state directory
        never hits the 108-byte limit of a socket address."""
        dir_fd = os.open(cell_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(control_path(dir_fd))
            session = cls(sock, timeout)
            session.negotiate()
        except OSError as exc:
            sock.close()
            raise QmpError(f"cannot reach QEMU's control socket in {cell_dir}: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(dir_fd)
        return session

    def negotiate(self) -> None:
        """Read the greeting and leave capabilities negotiation mode."""
        greeting = self._read_message()
        if greeting.QMP is None:
            raise QmpError("QEMU's control socket did not greet with QMP")
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; its value (events that arrive meanwhile are kept in ``events``)."""
        try:
            self.sock.sendall(command_line(command, arguments))
        except OSError as exc:
            raise QmpError(f"QEMU closed its control connection ({exc.strerror or exc})") from None
        while True:
            message = self._read_message()
            if message.is_reply:
                return reply_value(message, command)
            if message.event is not None:
                self.events.append(message)

    def _read_message(self) -> QmpMessage:
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QmpError("QEMU did not answer on its control connection in time") from None
            except OSError as exc:
                raise QmpError(f"QEMU closed its control connection ({exc.strerror or exc})") from None
            if not chunk:
                raise QmpError("QEMU closed its control connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return parse_line(line)

    def take_unread(self) -> bytes:
        """Bytes received but not parsed yet (for a reader that takes the socket over)."""
        unread, self._buffer = self._buffer, b""
        return unread

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> BlockingQmp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
