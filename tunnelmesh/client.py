"""A minimal client of the coordinators' public gRPC API (KV and cluster admin), multi-endpoint.

Any coordinator serves every call (followers forward writes and linearizable reads to the leader), so the
client does not need to find the leader; it needs to survive a coordinator that is down or has no leader.

Retry policy (tenacity): a call that fails with UNAVAILABLE (coordinator down, no leader, election in
progress) is retried on the next endpoint, with exponential backoff from 50 ms doubling to at most 1 s, until
the call's overall ``deadline`` (default 10 s) is spent; no new attempt starts in its last 0.25 s, so a caller
gets the server's reason (UNAVAILABLE "no leader") rather than a bare DEADLINE_EXCEEDED. Each attempt has its
own deadline (the time left, at most ``attempt_timeout``). Writes carry a request id that stays the same
across retries, so a retried write applies at most once. Other errors (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, ...) are raised at once as ``ClientError``. The full client (auth tokens, node API,
TLS) is built by a later issue.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from tunnelmesh.api.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc
from tunnelmesh.errors import TunnelMeshError

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
_MIN_ATTEMPT = 0.25  # seconds: shorter attempts could not finish, they would only hide the last reason


class ClientError(TunnelMeshError):
    """A call failed; ``code`` is the gRPC status of the last attempt."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRYABLE


class Client:
    """``async with Client(["10.0.0.2:8443", ...]) as c: await c.put(b"k", b"v")``."""

    def __init__(
        self, endpoints: Sequence[str], *, deadline: float = 10.0, attempt_timeout: float = 5.0
    ) -> None:
        if not endpoints:
            raise TunnelMeshError("client: give at least one coordinator address (host:port)")
        self.endpoints = list(endpoints)
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self._channels = [grpc.aio.insecure_channel(e) for e in self.endpoints]
        self._next = 0

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    async def _call(self, fn: Callable[[grpc.aio.Channel, float], Awaitable[T]]) -> T:
        start = time.monotonic()
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable),
                wait=wait_exponential(multiplier=0.05, max=1.0),
                stop=stop_after_delay(max(0.0, self.deadline - _MIN_ATTEMPT)),
                reraise=True,
            ):
                with attempt:
                    ch = self._channels[self._next % len(self._channels)]
                    left = max(0.05, min(self.attempt_timeout, self.deadline - (time.monotonic() - start)))
                    try:
                        return await fn(ch, left)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() in RETRYABLE:
                            self._next += 1  # try the next coordinator
                        raise
        except grpc.aio.AioRpcError as exc:
            raise ClientError(exc.code(), exc.details() or "") from None
        raise AssertionError("unreachable")

    # -- KV --------------------------------------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes, *, request_id: str | None = None) -> kv_pb2.KvPutResponse:
        req = kv_pb2.KvPutRequest(request_id=request_id or uuid.uuid4().hex, key=key, value=value)

        async def fn(ch: grpc.aio.Channel, t: float) -> kv_pb2.KvPutResponse:
            r: kv_pb2.KvPutResponse = await kv_pb2_grpc.KvServiceStub(ch).Put(req, timeout=t)
            return r

        return await self._call(fn)

    async def get(self, key: bytes, *, stale: bool = False) -> kv_pb2.KvGetResponse:
        req = kv_pb2.KvGetRequest(key=key, stale=stale)

        async def fn(ch: grpc.aio.Channel, t: float) -> kv_pb2.KvGetResponse:
            r: kv_pb2.KvGetResponse = await kv_pb2_grpc.KvServiceStub(ch).Get(req, timeout=t)
            return r

        return await self._call(fn)

    async def delete(self, key: bytes, *, request_id: str | None = None) -> kv_pb2.KvDeleteResponse:
        req = kv_pb2.KvDeleteRequest(request_id=request_id or uuid.uuid4().hex, key=key)

        async def fn(ch: grpc.aio.Channel, t: float) -> kv_pb2.KvDeleteResponse:
            r: kv_pb2.KvDeleteResponse = await kv_pb2_grpc.KvServiceStub(ch).Delete(req, timeout=t)
            return r

        return await self._call(fn)

    async def compare_and_set(
        self, key: bytes, expected: bytes | None, new: bytes, *, request_id: str | None = None
    ) -> kv_pb2.KvCompareAndSetResponse:
        req = kv_pb2.KvCompareAndSetRequest(request_id=request_id or uuid.uuid4().hex, key=key, new_value=new)
        if expected is not None:
            req.expected_value = expected

        async def fn(ch: grpc.aio.Channel, t: float) -> kv_pb2.KvCompareAndSetResponse:
            stub = kv_pb2_grpc.KvServiceStub(ch)
            r: kv_pb2.KvCompareAndSetResponse = await stub.CompareAndSet(req, timeout=t)
            return r

        return await self._call(fn)

    # -- cluster admin ---------------------------------------------------------------------------------------

    async def _admin(self, method: str, req: Any) -> Any:
        async def fn(ch: grpc.aio.Channel, t: float) -> Any:
            stub = admin_pb2_grpc.AdminServiceStub(ch)
            return await getattr(stub, method)(req, timeout=t)

        return await self._call(fn)

    async def cluster_status(self) -> admin_pb2.GetClusterStatusResponse:
        r: admin_pb2.GetClusterStatusResponse = await self._admin(
            "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
        )
        return r

    async def members(self) -> list[admin_pb2.Member]:
        r: admin_pb2.ListMembersResponse = await self._admin("ListMembers", admin_pb2.ListMembersRequest())
        return list(r.members)

    async def _via_leader(self, method: str, req: Any) -> Any:
        """Send to the leader's API address (TransferLeadership/RemoveMember act on the leader)."""
        status = await self.cluster_status()
        leader = next((m for m in status.members if m.is_leader), None)
        if leader is not None and leader.info.api_address and leader.info.api_address not in self.endpoints:
            async with Client([leader.info.api_address], deadline=self.deadline) as c:
                return await c._admin(method, req)
        if leader is not None and leader.info.api_address in self.endpoints:
            self._next = self.endpoints.index(leader.info.api_address)
        return await self._admin(method, req)

    async def transfer_leadership(self, target: str = "") -> admin_pb2.TransferLeadershipResponse:
        req = admin_pb2.TransferLeadershipRequest(request_id=uuid.uuid4().hex, target_member_id=target)
        r: admin_pb2.TransferLeadershipResponse = await self._via_leader("TransferLeadership", req)
        return r

    async def remove_member(self, member_id: str) -> admin_pb2.RemoveMemberResponse:
        req = admin_pb2.RemoveMemberRequest(request_id=uuid.uuid4().hex, member_id=member_id)
        r: admin_pb2.RemoveMemberResponse = await self._via_leader("RemoveMember", req)
        return r
