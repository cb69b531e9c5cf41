"""``KvService.Session``: the stream protocol (coord/kv_session.py) and the client's ``KvSession``, over a
real in-process gRPC server whose operations the test controls. The same path against a real coordinator
(auth, Raft, grpcurl) is tests/integration/test_kv_session.py."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from tunnelmesh.api.v1 import kv_pb2, kv_pb2_grpc
from tunnelmesh.client import ClientError, KvSession
from tunnelmesh.coord import kv_session


class Ops:
    """Operations that finish when the test says: ``release(key)``; ``fail(key, code)`` answers an error."""

    def __init__(self) -> None:
        self.gates: dict[bytes, asyncio.Event] = {}
        self.started: list[bytes] = []
        self.cancelled: list[bytes] = []
        self.errors: dict[bytes, grpc.StatusCode] = {}
        self.timeouts: list[int] = []

    def gate(self, key: bytes) -> asyncio.Event:
        return self.gates.setdefault(key, asyncio.Event())

    async def run(self, req: kv_pb2.KvSessionRequest, which: str) -> kv_pb2.KvSessionResponse:
        key = getattr(req, which).key
        self.started.append(key)
        self.timeouts.append(req.timeout_ms)
        try:
            await self.gate(key).wait()
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        if key in self.errors:
            error = kv_pb2.KvError(code=self.errors[key].value[0], message=f"{key.decode()} failed")
            return kv_pb2.KvSessionResponse(id=req.id, error=error)
        return kv_pb2.KvSessionResponse(id=req.id, get=kv_pb2.KvGetResponse(found=True, value=b"v:" + key))


class Servicer(kv_pb2_grpc.KvServiceServicer):
    def __init__(self, ops: Ops, max_in_flight: int) -> None:
        self.ops = ops
        self.max_in_flight = max_in_flight
        self.abort_with: grpc.StatusCode | None = None

    async def Session(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        if self.abort_with is not None:
            await context.abort(self.abort_with, "told to")
        await kv_session.serve(request_iterator, context, self.ops.run, max_in_flight=self.max_in_flight)


@pytest.fixture
async def server() -> AsyncIterator[Callable[..., Any]]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []
    stops.clear()

    async def start(max_in_flight: int = 64) -> tuple[Ops, Servicer, grpc.aio.Channel]:
        ops = Ops()
        servicer = Servicer(ops, max_in_flight)  # type: ignore[abstract]  # only Session is served
        srv = grpc.aio.server()
        kv_pb2_grpc.add_KvServiceServicer_to_server(servicer, srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        servers.append(srv)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(ch)
        stops.append(srv.stop)
        return ops, servicer, ch

    yield start
    for ch in channels:
        await ch.close()
    for srv in servers:
        await srv.stop(None)


stops: list[Callable[[float | None], Any]] = []  # the fixture's servers' stop(grace), last one last


def get(op_id: int, key: bytes) -> kv_pb2.KvSessionRequest:
    return kv_pb2.KvSessionRequest(id=op_id, get=kv_pb2.KvGetRequest(key=key))


async def until(cond: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(5):
            while not cond():  # noqa: ASYNC110 - polls state that gRPC's tasks change
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within 5 s: {what}") from None


async def test_answers_come_in_completion_order_and_half_close_waits_for_them(server: Any) -> None:
    ops, _, ch = await server()
    call = kv_pb2_grpc.KvServiceStub(ch).Session()
    for i, key in enumerate((b"a", b"b", b"c"), start=1):
        await call.write(get(i, key))
    await call.done_writing()
    await until(lambda: len(ops.started) == 3, "all three running")
    for key in (b"c", b"a", b"b"):
        ops.gate(key).set()
        resp = await call.read()
        assert resp.get.value == b"v:" + key
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_at_most_max_in_flight_operations_run_and_the_rest_wait_unread(server: Any) -> None:
    ops, _, ch = await server(max_in_flight=2)
    call = kv_pb2_grpc.KvServiceStub(ch).Session()
    for i, key in enumerate((b"a", b"b", b"c", b"d"), start=1):
        await call.write(get(i, key))
    await until(lambda: len(ops.started) == 2, "two running")
    await asyncio.sleep(0.1)
    assert ops.started == [b"a", b"b"]  # c and d wait for room
    ops.gate(b"b").set()
    assert (await call.read()).id == 2
    await until(lambda: len(ops.started) == 3, "c started once b was answered")
    assert ops.started[2] == b"c"
    call.cancel()


@pytest.mark.parametrize(
    ("second", "detail", "reason"),
    [
        (kv_pb2.KvSessionRequest(id=9), "operation 9 has no op", "missing_op"),
        (get(1, b"again"), "operation id 1 is already in flight", "duplicate_id"),
    ],
)
async def test_a_broken_protocol_ends_the_stream_and_cancels_what_is_in_flight(
    server: Any, second: kv_pb2.KvSessionRequest, detail: str, reason: str
) -> None:
    ops, _, ch = await server()
    before = kv_session.BROKEN.labels(reason)._value.get()
    call = kv_pb2_grpc.KvServiceStub(ch).Session()
    await call.write(get(1, b"slow"))
    await until(lambda: ops.started == [b"slow"], "first running")
    await call.write(second)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (err.value.details() or "")
    assert ops.cancelled == [b"slow"]
    assert kv_session.BROKEN.labels(reason)._value.get() == before + 1
    assert kv_session.SESSIONS._value.get() == 0


async def test_a_client_that_goes_away_cancels_its_operations(server: Any) -> None:
    ops, _, ch = await server()
    call = kv_pb2_grpc.KvServiceStub(ch).Session()
    await call.write(get(1, b"x"))
    await until(lambda: ops.started == [b"x"], "running")
    assert kv_session.SESSIONS._value.get() == 1
    call.cancel()
    await until(lambda: ops.cancelled == [b"x"], "cancelled on the server")
    await until(lambda: kv_session.SESSIONS._value.get() == 0, "session closed")


# -- the client's KvSession -------------------------------------------------------------------------------


async def test_client_session_matches_answers_to_concurrent_callers(server: Any) -> None:
    ops, _, ch = await server()
    s = KvSession(ch)
    keys = [f"k{i}".encode() for i in range(50)]
    calls = [asyncio.ensure_future(s.get(k, timeout=3.0)) for k in keys]
    await until(lambda: len(ops.started) == 50, "all running")
    assert set(ops.timeouts) == {3000}  # the caller's timeout is the coordinator's budget
    for k in reversed(keys):
        ops.gate(k).set()
    assert [r.value for r in await asyncio.gather(*calls)] == [b"v:" + k for k in keys]
    await s.close()


async def test_client_session_raises_an_operations_own_error_and_goes_on(server: Any) -> None:
    ops, _, ch = await server()
    ops.errors[b"bad"] = grpc.StatusCode.FAILED_PRECONDITION
    ops.gate(b"bad").set()
    ops.gate(b"good").set()
    s = KvSession(ch)
    with pytest.raises(ClientError) as err:
        await s.get(b"bad")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "bad failed" in str(err.value)
    assert (await s.get(b"good")).value == b"v:good"
    await s.close()


async def test_client_session_fails_its_waiters_when_the_stream_breaks(server: Any) -> None:
    ops, _, ch = await server()
    s = KvSession(ch)
    waiting = asyncio.ensure_future(s.get(b"w"))
    await until(lambda: ops.started == [b"w"], "running")
    await stops[-1](None)  # the coordinator stops with the operation in flight
    with pytest.raises(ClientError) as err:
        await waiting
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value  # retryable, with the same request id
    await s.close()


async def test_client_session_reopens_after_the_server_ended_the_stream(server: Any) -> None:
    ops, servicer, ch = await server()
    s = KvSession(ch)
    servicer.abort_with = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ClientError) as err:
        await s.get(b"first", timeout=2.0)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "told to" in str(err.value)
    servicer.abort_with = None
    ops.gate(b"second").set()
    assert (await s.get(b"second", timeout=2.0)).value == b"v:second"  # a new stream
    await s.close()


async def test_client_session_refused_fails_every_waiting_operation_and_leaves_nothing_unretrieved(
    server: Any,
) -> None:
    _, servicer, ch = await server()
    servicer.abort_with = grpc.StatusCode.UNAUTHENTICATED
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    s = KvSession(ch)
    results = await asyncio.gather(*(s.get(f"k{i}".encode()) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, ClientError) and r.code == grpc.StatusCode.UNAUTHENTICATED for r in results)
    await s.close()
    del results
    gc.collect()
    await asyncio.sleep(0)
    assert unhandled == []  # e.g. "Future exception was never retrieved"
    loop.set_exception_handler(None)


async def test_client_session_gives_up_after_its_timeout(server: Any) -> None:
    _, _, ch = await server()
    s = KvSession(ch)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ClientError) as err:
        await s.get(b"never", timeout=0.2)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no answer to the get in 0.2 s" in str(err.value)
    assert loop.time() - t0 < 3.0
    await s.close()


async def test_client_session_write_held_back_by_flow_control_gives_up_at_its_timeout(server: Any) -> None:
    # The coordinator runs one operation and reads no further (max_in_flight=1): a megabyte put then fills the
    # stream's HTTP/2 window and its write blocks. It must end at its own deadline, and take the stream with
    # it (half a message may be on the wire): the operation held there fails UNAVAILABLE, to be retried.
    ops, _, ch = await server(max_in_flight=1)
    s = KvSession(ch)
    held = asyncio.ensure_future(s.get(b"held", timeout=30.0))
    await until(lambda: ops.started == [b"held"], "running")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    big = b"x" * (1 << 20)  # 32 MiB in all: more than any window the transport grants a stream nobody reads
    puts = await asyncio.gather(
        *(s.put(f"p{i}".encode(), big, timeout=0.5) for i in range(32)), return_exceptions=True
    )
    assert loop.time() - t0 < 3.0
    failed = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
    assert all(isinstance(p, ClientError) and p.code in failed for p in puts), puts
    with pytest.raises(ClientError) as err:
        await held
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "reset" in str(err.value)
    await until(lambda: ops.cancelled == [b"held"], "the stream's operation cancelled on the server")
    assert ops.started == [b"held"]  # no put reached it
    ops.gate(b"after").set()
    assert (await s.get(b"after", timeout=2.0)).value == b"v:after"  # on a new stream
    await s.close()
