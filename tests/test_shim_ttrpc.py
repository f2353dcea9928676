"""runphi.shim.ttrpc: framing, the server on a real unix socket, and the client.

Wire facts from reference/shim-v2.md §3. Raw-frame tests talk to the server with
:func:`encode_frame`/:class:`FrameReader` only, so they check what goes over the socket,
not what the client makes of it.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from google.protobuf import empty_pb2

from runphi.shim.proto import task_pb2, ttrpc_pb2
from runphi.shim.ttrpc import (
    MAX_PAYLOAD, TYPE_REQUEST, TYPE_RESPONSE, Code, ConnectionClosed, Frame, FrameReader, FrameTooLarge, Method,
    ProtocolError, TtrpcError, connect_unix, encode_frame, open_client, serve)

TASK = "containerd.task.v2.Task"


# ------------------------------------------------------------------------- framing


def test_header_is_big_endian_length_stream_type_flags():
    assert encode_frame(1, TYPE_REQUEST, b"abc") == b"\x00\x00\x00\x03" b"\x00\x00\x00\x01" b"\x01" b"\x00" b"abc"
    assert encode_frame(0x01020304, TYPE_RESPONSE, b"", flags=0x04) == bytes(
        [0, 0, 0, 0, 1, 2, 3, 4, 2, 4])
    assert len(encode_frame(7, TYPE_REQUEST, b"x" * 300)[:10]) == 10
    assert encode_frame(7, TYPE_REQUEST, b"x" * 300)[:4] == b"\x00\x00\x01\x2c"


def test_a_payload_over_4_mib_cannot_be_encoded():
    encode_frame(1, TYPE_REQUEST, b"\0" * MAX_PAYLOAD)
    with pytest.raises(ValueError):
        encode_frame(1, TYPE_REQUEST, b"\0" * (MAX_PAYLOAD + 1))


async def test_frames_round_trip_across_arbitrary_chunking():
    send, receive = trio.testing.memory_stream_one_way_pair()
    wire = encode_frame(1, TYPE_REQUEST, b"hello") + encode_frame(3, TYPE_RESPONSE, b"") + \
        encode_frame(5, 0x03, b"x" * 1000, flags=2)
    for start in range(0, len(wire), 7):  # split headers and payloads mid-way
        await send.send_all(wire[start:start + 7])
    await send.aclose()
    reader = FrameReader(receive)
    assert await reader.read() == Frame(1, TYPE_REQUEST, 0, b"hello")
    assert await reader.read() == Frame(3, TYPE_RESPONSE, 0, b"")
    assert await reader.read() == Frame(5, 0x03, 2, b"x" * 1000)
    assert await reader.read() is None


async def test_an_oversized_frame_is_skipped_and_reading_goes_on():
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(struct.pack(">IIBB", 11, 9, TYPE_REQUEST, 0) + b"y" * 11 + encode_frame(11, 1, b"ok"))
    await send.aclose()
    reader = FrameReader(receive, max_payload=10)
    with pytest.raises(FrameTooLarge) as caught:
        await reader.read()
    assert (caught.value.stream_id, caught.value.length) == (9, 11)
    assert await reader.read() == Frame(11, 1, 0, b"ok")


@pytest.mark.parametrize("wire", [b"\x00\x00\x00", encode_frame(1, 1, b"abc")[:-1]])
async def test_a_stream_ending_inside_a_frame_is_a_protocol_error(wire):
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(wire)
    await send.aclose()
    with pytest.raises(ProtocolError):
        await FrameReader(receive).read()


# ------------------------------------------------------------------------- server fixture


@dataclass
class Probe:
    """Handlers' shared state: Wait blocks until ``release``; the others answer at once."""

    wait_entered: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)
    wait_cancelled: trio.Event = field(default_factory=trio.Event)

    async def state(self, request):
        return task_pb2.StateResponse(id=request.id, exec_id=request.exec_id, pid=42)

    async def wait(self, request):
        self.wait_entered.set()
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.wait_cancelled.set()
            raise
        return task_pb2.WaitResponse(exit_status=3)

    async def kill(self, request):
        raise TtrpcError(Code.NOT_FOUND, f"process {request.id} already finished")

    async def pids(self, request):
        raise RuntimeError("boom")

    async def shutdown(self, request):
        await trio.sleep_forever()

    def services(self):
        return {TASK: {
            "State": Method(task_pb2.StateRequest, self.state),
            "Wait": Method(task_pb2.WaitRequest, self.wait),
            "Kill": Method(task_pb2.KillRequest, self.kill),
            "Pids": Method(task_pb2.PidsRequest, self.pids),
            "Shutdown": Method(task_pb2.ShutdownRequest, self.shutdown),
        }}


@pytest.fixture
def socket_path() -> Iterator[str]:
    # Short on purpose: a unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="ttrpc-") as directory:
        yield str(Path(directory) / "s")


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(nursery, socket_path, probe) -> str:
    """A ttrpc server for ``probe`` listening on ``socket_path``; stopped with the test's nursery."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(socket_path)
    sock.listen()
    await nursery.start(serve, trio.SocketListener(sock), probe.services())
    return socket_path


@pytest.fixture
async def raw(server) -> AsyncIterator[tuple[trio.SocketStream, FrameReader]]:
    stream = await trio.open_unix_socket(server)
    async with stream:
        yield stream, FrameReader(stream)


def request_bytes(service=TASK, method="State", payload=b"", timeout_nano=0):
    return ttrpc_pb2.Request(service=service, method=method, payload=payload,
                             timeout_nano=timeout_nano).SerializeToString()


async def read_response(reader):
    with trio.fail_after(10):  # a guard against hanging on a server bug, not synchronisation
        frame = await reader.read()
    assert frame is not None and frame.type == TYPE_RESPONSE
    response = ttrpc_pb2.Response()
    response.ParseFromString(frame.payload)
    return frame.stream_id, response


# ------------------------------------------------------------------------- server over a socket


async def test_unary_call_answers_on_the_same_stream_id_without_a_status(raw):
    stream, reader = raw
    payload = task_pb2.StateRequest(id="c1", exec_id="e1").SerializeToString()
    await stream.send_all(encode_frame(7, TYPE_REQUEST, request_bytes(payload=payload)))
    stream_id, response = await read_response(reader)
    assert stream_id == 7 and not response.HasField("status")
    state = task_pb2.StateResponse.FromString(response.payload)
    assert (state.id, state.exec_id, state.pid) == ("c1", "e1", 42)


async def test_client_call_ok(server):
    async with connect_unix(server) as client:
        state = await client.call(TASK, "State", task_pb2.StateRequest(id="c1"), task_pb2.StateResponse)
    assert (state.id, state.pid) == ("c1", 42)


@pytest.mark.parametrize(("service", "method", "message"), [
    ("containerd.task.v2.Nope", "State", "service containerd.task.v2.Nope"),
    (TASK, "Pause", "method Pause"),
])
async def test_unknown_service_or_method_is_unimplemented(server, service, method, message):
    async with connect_unix(server) as client:
        with pytest.raises(TtrpcError) as caught:
            await client.call(service, method, task_pb2.PauseRequest(id="c1"), empty_pb2.Empty)
    assert (caught.value.code, caught.value.message) == (Code.UNIMPLEMENTED, message)


@pytest.mark.parametrize("request_payload", [
    b"\xff\xff",  # the ttrpc Request itself does not decode
    request_bytes(payload=b"\xff\xff"),  # the Request does, its StateRequest payload does not
])
async def test_undecodable_request_is_invalid_argument(raw, request_payload):
    stream, reader = raw
    await stream.send_all(encode_frame(1, TYPE_REQUEST, request_payload))
    stream_id, response = await read_response(reader)
    assert (stream_id, response.status.code) == (1, Code.INVALID_ARGUMENT)


async def test_even_stream_id_is_invalid_argument(raw):
    stream, reader = raw
    await stream.send_all(encode_frame(2, TYPE_REQUEST, request_bytes()))
    stream_id, response = await read_response(reader)
    assert (stream_id, response.status.code) == (2, Code.INVALID_ARGUMENT)


async def test_oversized_frame_is_resource_exhausted_and_the_connection_survives(raw):
    stream, reader = raw
    length = MAX_PAYLOAD + 1
    await stream.send_all(struct.pack(">IIBB", length, 5, TYPE_REQUEST, 0) + b"\0" * length)
    await stream.send_all(encode_frame(7, TYPE_REQUEST, request_bytes()))
    # Both answers are in flight at once, so they may come in either order.
    answers = dict([await read_response(reader), await read_response(reader)])
    assert {sid: r.status.code for sid, r in answers.items()} == {5: Code.RESOURCE_EXHAUSTED, 7: Code.OK}


async def test_handler_error_status_carries_code_and_message(server):
    async with connect_unix(server) as client:
        with pytest.raises(TtrpcError) as caught:
            await client.call(TASK, "Kill", task_pb2.KillRequest(id="c1", signal=9), empty_pb2.Empty)
    assert (caught.value.code, caught.value.message) == (Code.NOT_FOUND, "process c1 already finished")
    assert caught.value.code == 5


async def test_any_other_handler_exception_is_unknown_with_its_message(server):
    async with connect_unix(server) as client:
        with pytest.raises(TtrpcError) as caught:
            await client.call(TASK, "Pids", task_pb2.PidsRequest(id="c1"), task_pb2.PidsResponse)
        # The connection still serves calls after a handler failed.
        await client.call(TASK, "State", task_pb2.StateRequest(id="c1"), task_pb2.StateResponse)
    assert (caught.value.code, caught.value.message) == (Code.UNKNOWN, "boom")


async def test_unknown_frame_type_is_ignored(raw):
    stream, reader = raw
    await stream.send_all(encode_frame(1, 0x03, b"data frame from ttrpc 1.2") + encode_frame(3, 0x7F, b""))
    await stream.send_all(encode_frame(5, TYPE_REQUEST, request_bytes()))
    stream_id, response = await read_response(reader)
    assert (stream_id, response.status.code) == (5, Code.OK)


async def test_responses_leave_in_completion_order(raw, probe):
    stream, reader = raw
    wait = task_pb2.WaitRequest(id="c1").SerializeToString()
    await stream.send_all(encode_frame(1, TYPE_REQUEST, request_bytes(method="Wait", payload=wait)))
    await probe.wait_entered.wait()
    await stream.send_all(encode_frame(3, TYPE_REQUEST, request_bytes()))
    stream_id, response = await read_response(reader)
    assert stream_id == 3 and task_pb2.StateResponse.FromString(response.payload).pid == 42
    probe.release.set()
    stream_id, response = await read_response(reader)
    assert stream_id == 1 and task_pb2.WaitResponse.FromString(response.payload).exit_status == 3


async def test_concurrent_client_calls_are_matched_by_stream_id(server, probe):
    results = {}

    async def call_wait(client):
        results["wait"] = await client.call(TASK, "Wait", task_pb2.WaitRequest(id="c1"), task_pb2.WaitResponse)

    async with connect_unix(server) as client, trio.open_nursery() as nursery:
        nursery.start_soon(call_wait, client)
        await probe.wait_entered.wait()
        state = await client.call(TASK, "State", task_pb2.StateRequest(id="c2"), task_pb2.StateResponse)
        assert "wait" not in results and state.id == "c2"
        probe.release.set()
    assert results["wait"].exit_status == 3


async def test_deadline_answers_deadline_exceeded(raw):
    stream, reader = raw
    await stream.send_all(encode_frame(1, TYPE_REQUEST, request_bytes(
        method="Shutdown", payload=task_pb2.ShutdownRequest(id="c1").SerializeToString(),
        timeout_nano=20_000_000)))
    stream_id, response = await read_response(reader)
    assert (stream_id, response.status.code) == (1, Code.DEADLINE_EXCEEDED)


async def test_closing_the_connection_cancels_its_pending_requests(server, probe):
    async with connect_unix(server) as client, trio.open_nursery() as nursery:
        async def call_wait():
            with pytest.raises(ConnectionClosed):  # the client closes under the call
                await client.call(TASK, "Wait", task_pb2.WaitRequest(id="c1"), task_pb2.WaitResponse)

        nursery.start_soon(call_wait)
        await probe.wait_entered.wait()
        await client.aclose()
    await probe.wait_cancelled.wait()


# ------------------------------------------------------------------------- client against a scripted peer


async def test_client_uses_odd_stream_ids_and_matches_out_of_order_answers():
    client_end, peer = trio.testing.memory_stream_pair()
    results = {}

    async def call(name):
        results[name] = await client.call(TASK, "State", task_pb2.StateRequest(id=name), task_pb2.StateResponse)

    async with open_client(client_end) as client, trio.open_nursery() as nursery:
        reader = FrameReader(peer)
        nursery.start_soon(call, "first")
        first = await reader.read()
        nursery.start_soon(call, "second")
        second = await reader.read()
        assert (first.stream_id, second.stream_id) == (1, 3)
        for frame in (second, first):  # answer in the other order
            request = ttrpc_pb2.Request.FromString(frame.payload)
            assert (request.service, request.method) == (TASK, "State")
            asked = task_pb2.StateRequest.FromString(request.payload)
            answer = ttrpc_pb2.Response(payload=task_pb2.StateResponse(id=asked.id).SerializeToString())
            await peer.send_all(encode_frame(frame.stream_id, TYPE_RESPONSE, answer.SerializeToString()))
    assert (results["first"].id, results["second"].id) == ("first", "second")


async def test_client_call_fails_when_the_peer_hangs_up():
    client_end, peer = trio.testing.memory_stream_pair()
    async with open_client(client_end) as client, trio.open_nursery() as nursery:
        async def hang_up():
            await FrameReader(peer).read()
            await peer.aclose()

        nursery.start_soon(hang_up)
        with pytest.raises(ConnectionClosed):
            await client.call(TASK, "State", task_pb2.StateRequest(id="c1"), task_pb2.StateResponse)


async def test_client_timeout_is_deadline_exceeded(server):
    async with connect_unix(server) as client:
        with pytest.raises(TtrpcError) as caught:
            await client.call(TASK, "Shutdown", task_pb2.ShutdownRequest(id="c1"), empty_pb2.Empty, timeout=0.02)
        # Whichever side's deadline fired first, the connection stays usable.
        await client.call(TASK, "State", task_pb2.StateRequest(id="c1"), task_pb2.StateResponse)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
