"""The client of the coordinators' public gRPC API (KV, cluster and mesh admin), multi-endpoint, over TLS.

Connecting: every coordinator serves its public API over TLS with the chain "coordinator certificate + cluster
CA". A client trusts exactly the cluster CA (``ca_pem``: ``ca.crt`` of a coordinator's data dir, or the CA a
node pinned with its join token; never the system roots) and checks that the server is *a coordinator of that
cluster*: coordinator certificates name the coordinator by identity (``coord.<cluster>.tunnelmesh.invalid``),
not necessarily by the address dialled, so :func:`open_channel` overrides the TLS target name with
``pki.coordinator_channel_options(<cluster id read from the CA>)``. Any other client must do the same (see
docs/api.md). Admin and KV calls carry ``authorization: Bearer tma_...`` (``token``), attached to every call
of the channel.

Any coordinator serves every call (followers forward writes and linearizable reads to the leader), so the
client does not need to find the leader; it needs to survive a coordinator that is down or has no leader.

Retry policy (tenacity): a call that fails with UNAVAILABLE (coordinator down, no leader, election in
progress, TLS handshake refused) is retried on the next endpoint, with exponential backoff from 50 ms
doubling to at most 1 s, until the call's overall ``deadline`` (default 10 s) is spent; no new attempt starts
in its last 0.25 s, so a caller gets the server's reason (UNAVAILABLE "no leader") rather than a bare
DEADLINE_EXCEEDED. Each attempt has its own deadline (the time left, at most ``attempt_timeout``). Writes
carry a request id that stays the same across retries, so a retried write applies at most once. Other
errors (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...) are raised
at once as ``ClientError``.

KV operations go over one ``KvService.Session`` stream per coordinator (:class:`KvSession`), shared by every
task using the client: an operation is a message on an open stream rather than a call of its own, which costs
the coordinator (and this process) a fraction of the CPU and saves about a millisecond per operation.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from tunnelmesh import pki
from tunnelmesh.api.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc
from tunnelmesh.errors import TunnelMeshError

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
DEFAULT_OP_TIMEOUT = 5.0  # seconds, as a unary call without a deadline
_MIN_ATTEMPT = 0.25  # seconds: shorter attempts could not finish, they would only hide the last reason


class ClientError(TunnelMeshError):
    """A call failed; ``code`` is the gRPC status of the last attempt."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and exc.code in RETRYABLE


def cluster_id_of(ca_pem: bytes) -> str | None:
    """The cluster id a TunnelMesh CA certificate names (None for an operator-supplied CA)."""
    try:
        certs = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise TunnelMeshError(
            "the CA file is not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ) from None
    ids = {pki.ca_cluster_id(c) for c in certs}
    return ids.pop() if len(ids) == 1 else None


def _channel_options(ca_pem: bytes, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    cluster_id = cluster_id_of(ca_pem)
    # An operator-supplied CA names no cluster: its coordinators' certificates must then match the address.
    names = pki.coordinator_channel_options(cluster_id) if cluster_id else []
    return [*names, *options]


class _BearerToken:
    """Adds ``authorization: Bearer <token>`` to every call of an asyncio channel. Not
    ``grpc.access_token_call_credentials``: gRPC runs such a metadata plugin on a thread of its own for every
    call, which costs the client more CPU and latency than the call itself."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        md = grpc.aio.Metadata(*details.metadata) if details.metadata else grpc.aio.Metadata()
        md.add(*self._header)
        return details._replace(metadata=md)


# grpc.aio files an interceptor under the first of the kinds it is an instance of: one class per kind.
class _BearerUnaryUnary(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def _bearer(token: str) -> list[grpc.aio.ClientInterceptor]:
    # No stream-stream interceptor: grpc.aio proxies every write of an intercepted bidirectional stream
    # through a queue, an async generator and a task per write, and leaks them when the stream breaks.
    # The one bidirectional method, KvService.Session, gets the header from KvSession (``_STREAM_TOKENS``).
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary)
    return [kind(token) for kind in kinds]


_STREAM_TOKENS: weakref.WeakKeyDictionary[grpc.aio.Channel, str] = weakref.WeakKeyDictionary()
"""The token :func:`open_channel` was given, per channel, for the bidirectional streams it opens."""


def open_channel(
    address: str, *, ca_pem: bytes, token: str | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A TLS channel to a coordinator's public API: trusts only ``ca_pem``, accepts only a coordinator of the
    CA's cluster, and sends ``token`` (``tma_...``/``tmn_...``) as ``authorization: Bearer`` on every call
    (on a :class:`KvSession` of the channel too)."""
    channel = grpc.aio.secure_channel(
        address,
        pki.channel_credentials(ca_pem),
        options=_channel_options(ca_pem, options),
        interceptors=_bearer(token) if token else None,
    )
    if token:
        _STREAM_TOKENS[channel] = token
    return channel


def open_sync_channel(
    address: str, *, ca_pem: bytes, token: str | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """:func:`open_channel` for blocking code (the token as call credentials: fine off the hot path)."""
    creds = pki.channel_credentials(ca_pem)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, creds, options=_channel_options(ca_pem, options))


_ANSWER_GRACE = 0.5  # seconds a session operation waits past its timeout for the coordinator's own answer

SESSION_READY_HEADER = ("tunnelmesh-session", "ready")
"""The response header a coordinator sends as soon as it has accepted a ``KvService.Session``. The client
waits for it before its first write: a stream refused at the start (the API token) ends without it, and a
write racing that refusal would turn the refusal's status into grpc.aio's local INTERNAL."""


class KvSession:
    """KV operations on one ``KvService.Session`` stream of ``channel`` (kv.proto), many in flight at once.

    Safe to share between the tasks of one event loop: each operation gets a fresh id, its request goes out
    on the stream, and a reader task hands each answer to its waiter. The stream opens with the first
    operation and again after it ended. Operations fail with ``ClientError``: with their own status (as the
    unary call would), or with the stream's when it breaks under them (a write among them may have been
    applied: retry it with the same ``request_id``), or DEADLINE_EXCEEDED when no answer came within
    ``timeout`` (the coordinator's budget for it, sent along; plus a moment for its own answer). No retries
    here; :class:`Client` retries across coordinators.
    """

    def __init__(self, channel: grpc.aio.Channel, *, token: str | None = None) -> None:
        """``token``: the API token to send; default: the one :func:`open_channel` made ``channel`` with."""
        self._stub = kv_pb2_grpc.KvServiceStub(channel)
        token = token or _STREAM_TOKENS.get(channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None  # done once the coordinator accepted the stream
        self._waiters: dict[int, asyncio.Future[kv_pb2.KvSessionResponse]] = {}
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write at a time per stream
        self._last_id = 0
        self._closing = False  # close() was called: a cancelled stream is ours, not the coordinator's

    async def put(
        self,
        key: bytes,
        value: bytes,
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_OP_TIMEOUT,  # noqa: ASYNC109 - sent as the op's budget
    ) -> kv_pb2.KvPutResponse:
        req = kv_pb2.KvPutRequest(request_id=request_id or uuid.uuid4().hex, key=key, value=value)
        r: kv_pb2.KvPutResponse = await self.run("put", req, timeout)
        return r

    async def get(
        self,
        key: bytes,
        *,
        stale: bool = False,
        timeout: float = DEFAULT_OP_TIMEOUT,  # noqa: ASYNC109 - sent as the op's budget
    ) -> kv_pb2.KvGetResponse:
        r: kv_pb2.KvGetResponse = await self.run("get", kv_pb2.KvGetRequest(key=key, stale=stale), timeout)
        return r

    async def delete(
        self,
        key: bytes,
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_OP_TIMEOUT,  # noqa: ASYNC109 - sent as the op's budget
    ) -> kv_pb2.KvDeleteResponse:
        req = kv_pb2.KvDeleteRequest(request_id=request_id or uuid.uuid4().hex, key=key)
        r: kv_pb2.KvDeleteResponse = await self.run("delete", req, timeout)
        return r

    async def compare_and_set(
        self,
        key: bytes,
        expected: bytes | None,
        new: bytes,
        *,
        request_id: str | None = None,
        timeout: float = DEFAULT_OP_TIMEOUT,  # noqa: ASYNC109 - sent as the op's budget
    ) -> kv_pb2.KvCompareAndSetResponse:
        req = kv_pb2.KvCompareAndSetRequest(request_id=request_id or uuid.uuid4().hex, key=key, new_value=new)
        if expected is not None:
            req.expected_value = expected
        r: kv_pb2.KvCompareAndSetResponse = await self.run("compare_and_set", req, timeout)
        return r

    async def run(
        self,
        which: str,
        request: Any,
        timeout: float,  # noqa: ASYNC109 - sent as the op's budget
    ) -> Any:
        """Send one operation (``which``: the ``op`` field to set) and wait for its answer."""
        self._last_id += 1
        op_id = self._last_id
        msg = kv_pb2.KvSessionRequest(id=op_id, timeout_ms=max(1, min(int(timeout * 1000), 2**32 - 1)))
        getattr(msg, which).CopyFrom(request)
        answer = asyncio.get_running_loop().create_future()
        self._waiters[op_id] = answer
        try:
            async with asyncio.timeout(timeout + _ANSWER_GRACE):
                call, ready = self._open()
                if not ready.done():
                    await asyncio.shield(ready)  # shared by every operation waiting for the stream to open
                ready.result()  # the stream's refusal, if it was refused
                async with self._write_lock:
                    try:
                        await call.write(msg)
                    except grpc.aio.AioRpcError as exc:
                        raise ClientError(exc.code(), exc.details() or "") from None
                    except asyncio.InvalidStateError:
                        pass  # the stream ended before this write; its reader fails the waiter, saying why
                    except asyncio.CancelledError:
                        # Out of time (or cancelled) mid-write: the stream cannot be trusted with another
                        # write, so end it; the next operation opens a new one.
                        call.cancel()
                        raise
                resp = await answer
        except TimeoutError:
            raise ClientError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer to the {which} in {timeout:.3g} s"
            ) from None
        finally:
            self._waiters.pop(op_id, None)
            if answer.done() and not answer.cancelled():
                answer.exception()  # a failure the stream reported while this one was failing otherwise
        if resp.HasField("error"):
            raise ClientError(status_code(resp.error.code), resp.error.message)
        return getattr(resp, which)

    async def close(self) -> None:
        """End the stream; operations still waiting fail with CANCELLED."""
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    def _open(self) -> tuple[Any, asyncio.Future[None]]:
        if self._call is None or self._ready is None:
            self._closing = False
            loop = asyncio.get_running_loop()
            self._call = self._stub.Session(metadata=self._metadata)
            self._ready = loop.create_future()
            self._reader = loop.create_task(self._read(self._call, self._ready))
        return self._call, self._ready

    async def _read(self, call: Any, ready: asyncio.Future[None]) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "the session stream ended"
        try:
            if SESSION_READY_HEADER not in tuple(await call.initial_metadata() or ()):
                code, details = await call.code(), await call.details()  # refused: the status says why
                return
            ready.set_result(None)
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    break
                waiter = self._waiters.get(resp.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(resp)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.CANCELLED:
                # Not by us (that is the CancelledError below): the coordinator stopped with the stream open.
                code, details = grpc.StatusCode.UNAVAILABLE, f"the session stream was cancelled: {details}"
        except asyncio.CancelledError:
            if self._closing:
                code, details = grpc.StatusCode.CANCELLED, "the session was closed"
            else:  # an operation ran out of time mid-write and reset the stream: the others may be retried
                code, details = grpc.StatusCode.UNAVAILABLE, "the session stream was reset"
        finally:
            if self._call is call:
                self._call = self._ready = None  # the next operation opens a new stream
            if not ready.done():
                ready.set_exception(ClientError(code, details))
                ready.exception()  # retrieved here: the waiting operations raise it themselves
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(ClientError(code, details))


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status with wire number ``number`` (``KvError.code``); UNKNOWN for a number gRPC lacks."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


_STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


class Client:
    """``async with Client(["10.0.0.2:8443", ...], ca_pem=ca, token=tok) as c: await c.put(b"k", b"v")``."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_pem: bytes,
        token: str | None = None,
        deadline: float = 10.0,
        attempt_timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise TunnelMeshError("client: give at least one coordinator address (host:port)")
        self.endpoints = list(endpoints)
        self.ca_pem = ca_pem
        self.token = token
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self._channels = [open_channel(e, ca_pem=ca_pem, token=token) for e in self.endpoints]
        self._sessions = {id(ch): KvSession(ch) for ch in self._channels}
        self._next = 0

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        for ch in self._channels:
            await ch.close()

    async def _call(self, fn: Callable[[grpc.aio.Channel, float], Awaitable[T]]) -> T:
        start = time.monotonic()
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
                    try:
                        return await fn(ch, left)
                    except grpc.aio.AioRpcError as exc:
                        raise ClientError(exc.code(), exc.details() or "") from None
                except ClientError as exc:
                    if exc.code in RETRYABLE:
                        self._next += 1  # try the next coordinator
                    raise
        raise AssertionError("unreachable")

    # -- KV: on each coordinator's KvSession; a request id stays the same across retries -------------------

    def _on(self, ch: grpc.aio.Channel) -> KvSession:
        return self._sessions[id(ch)]

    async def put(self, key: bytes, value: bytes, *, request_id: str | None = None) -> kv_pb2.KvPutResponse:
        rid = request_id or uuid.uuid4().hex
        return await self._call(lambda ch, t: self._on(ch).put(key, value, request_id=rid, timeout=t))

    async def get(self, key: bytes, *, stale: bool = False) -> kv_pb2.KvGetResponse:
        return await self._call(lambda ch, t: self._on(ch).get(key, stale=stale, timeout=t))

    async def delete(self, key: bytes, *, request_id: str | None = None) -> kv_pb2.KvDeleteResponse:
        rid = request_id or uuid.uuid4().hex
        return await self._call(lambda ch, t: self._on(ch).delete(key, request_id=rid, timeout=t))

    async def compare_and_set(
        self, key: bytes, expected: bytes | None, new: bytes, *, request_id: str | None = None
    ) -> kv_pb2.KvCompareAndSetResponse:
        rid = request_id or uuid.uuid4().hex
        return await self._call(
            lambda ch, t: self._on(ch).compare_and_set(key, expected, new, request_id=rid, timeout=t)
        )

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
            async with Client(
                [leader.info.api_address], ca_pem=self.ca_pem, token=self.token, deadline=self.deadline
            ) as c:
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

    async def save_snapshot(self) -> tuple[admin_pb2.SnapshotInfo, bytes, bytes]:
        """(info, data, sha256) of an online backup taken by the coordinator serving the call (any member; it
        runs a read barrier first). A stream cut short is retried whole, within the deadline."""

        async def fn(ch: grpc.aio.Channel, t: float) -> tuple[admin_pb2.SnapshotInfo, bytes, bytes]:
            info, parts, sha = admin_pb2.SnapshotInfo(), [], b""
            async for chunk in admin_pb2_grpc.AdminServiceStub(ch).SaveSnapshot(
                admin_pb2.SaveSnapshotRequest(), timeout=t
            ):
                if chunk.HasField("info"):
                    info = chunk.info
                parts.append(chunk.data)
                sha = chunk.sha256 or sha
            return info, b"".join(parts), sha

        return await self._call(fn)

    # -- nodes and tokens (any coordinator serves them; mutations keep one request id across retries) --------

    async def list_nodes(
        self, tags: Sequence[str] = (), *, page_size: int = 0, page_token: str = ""
    ) -> admin_pb2.ListNodesResponse:
        """One page of nodes ordered by name (those carrying all ``tags``); see :meth:`all_nodes`."""
        req = admin_pb2.ListNodesRequest(tags=tags, page_size=page_size, page_token=page_token)
        r: admin_pb2.ListNodesResponse = await self._admin("ListNodes", req)
        return r

    async def all_nodes(self, tags: Sequence[str] = ()) -> list[admin_pb2.Node]:
        """Every node (carrying all ``tags``), following the pages."""
        out: list[admin_pb2.Node] = []
        token = ""
        while True:
            page = await self.list_nodes(tags, page_size=1000, page_token=token)
            out.extend(page.nodes)
            token = page.next_page_token
            if not token:
                return out

    async def get_node(self, node_id: str | None = None, *, name: str | None = None) -> admin_pb2.Node:
        """The node with ``node_id`` or ``name`` (exactly one); ClientError NOT_FOUND if there is none."""
        if (node_id is None) == (name is None):
            raise TunnelMeshError("get_node: give exactly one of node_id and name")
        req = admin_pb2.GetNodeRequest()
        if node_id is not None:
            req.node_id = node_id
        else:
            req.name = name or ""
        r: admin_pb2.GetNodeResponse = await self._admin("GetNode", req)
        return r.node

    async def rename_node(
        self, node_id: str, new_name: str, *, request_id: str | None = None
    ) -> admin_pb2.Node:
        req = admin_pb2.RenameNodeRequest(
            request_id=request_id or uuid.uuid4().hex, node_id=node_id, new_name=new_name
        )
        r: admin_pb2.RenameNodeResponse = await self._admin("RenameNode", req)
        return r.node

    async def remove_node(self, node_id: str, *, request_id: str | None = None) -> None:
        req = admin_pb2.RemoveNodeRequest(request_id=request_id or uuid.uuid4().hex, node_id=node_id)
        await self._admin("RemoveNode", req)

    async def create_join_token(
        self,
        *,
        description: str = "",
        tags: Sequence[str] = (),
        ttl: float | None = None,
        reusable: bool = False,
        max_uses: int = 0,
        request_id: str | None = None,
    ) -> admin_pb2.CreateJoinTokenResponse:
        """A new join token; ``ttl`` in seconds (None: the server default, 1 h). The response holds the secret
        (shown only now) and a ready-to-paste ``join_command``."""
        req = admin_pb2.CreateJoinTokenRequest(
            request_id=request_id or uuid.uuid4().hex,
            description=description,
            tags=tags,
            reusable=reusable,
            max_uses=max_uses,
        )
        if ttl is not None:
            req.ttl.FromNanoseconds(int(ttl * 1e9))
        r: admin_pb2.CreateJoinTokenResponse = await self._admin("CreateJoinToken", req)
        return r

    async def list_join_tokens(self, *, include_inactive: bool = False) -> list[admin_pb2.JoinToken]:
        """Every join token (newest first), following the pages; revoked, expired and used-up ones only with
        ``include_inactive``."""
        out: list[admin_pb2.JoinToken] = []
        token = ""
        while True:
            req = admin_pb2.ListJoinTokensRequest(
                include_inactive=include_inactive, page_size=1000, page_token=token
            )
            page: admin_pb2.ListJoinTokensResponse = await self._admin("ListJoinTokens", req)
            out.extend(page.tokens)
            token = page.next_page_token
            if not token:
                return out

    async def revoke_join_token(self, token_id: str, *, request_id: str | None = None) -> admin_pb2.JoinToken:
        req = admin_pb2.RevokeJoinTokenRequest(request_id=request_id or uuid.uuid4().hex, token_id=token_id)
        r: admin_pb2.RevokeJoinTokenResponse = await self._admin("RevokeJoinToken", req)
        return r.token

    async def create_api_token(
        self,
        role: int,
        *,
        description: str = "",
        ttl: float | None = None,
        request_id: str | None = None,
    ) -> admin_pb2.CreateApiTokenResponse:
        """A new API token with ``role`` (``common_pb2.ROLE_READ_ONLY/OPERATOR/ADMIN``); ``ttl`` in seconds
        (None: no expiry). The response holds the secret, shown only now."""
        req = admin_pb2.CreateApiTokenRequest(
            request_id=request_id or uuid.uuid4().hex,
            description=description,
            role=role,  # type: ignore[arg-type]
        )
        if ttl is not None:
            req.ttl.FromNanoseconds(int(ttl * 1e9))
        r: admin_pb2.CreateApiTokenResponse = await self._admin("CreateApiToken", req)
        return r

    async def list_api_tokens(self, *, include_inactive: bool = False) -> list[admin_pb2.ApiToken]:
        req = admin_pb2.ListApiTokensRequest(include_inactive=include_inactive)
        r: admin_pb2.ListApiTokensResponse = await self._admin("ListApiTokens", req)
        return list(r.tokens)

    async def revoke_api_token(self, token_id: str, *, request_id: str | None = None) -> admin_pb2.ApiToken:
        req = admin_pb2.RevokeApiTokenRequest(request_id=request_id or uuid.uuid4().hex, token_id=token_id)
        r: admin_pb2.RevokeApiTokenResponse = await self._admin("RevokeApiToken", req)
        return r.token


# ------------------------------------------------------------------------------------------------------------
# Where to connect: flags, environment, a local coordinator's data dir, or the profile file

COORD_ENV = "TUNNELMESH_COORD"
CA_ENV = "TUNNELMESH_CA"
TOKEN_ENV = "TUNNELMESH_API_TOKEN"
PROFILE_ENV = "TUNNELMESH_PROFILE"
# In a coordinator's data dir (written by the coordinator; see coord/server.py).
ADMIN_TOKEN_FILE = "admin-token"
API_ADDRESS_FILE = "api-address"
PROFILE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Profile:
    """Everything a client needs: coordinator addresses, the cluster CA (PEM) and an API token."""

    coordinators: tuple[str, ...]
    ca_pem: bytes = field(repr=False)
    token: str | None = field(default=None, repr=False)

    def client(self, **kwargs: Any) -> Client:
        return Client(self.coordinators, ca_pem=self.ca_pem, token=self.token, **kwargs)


def default_profile_path() -> Path:
    """``$TUNNELMESH_PROFILE``, else /etc/tunnelmesh/profile.json for root, else
    ~/.config/tunnelmesh/profile.json."""
    if os.environ.get(PROFILE_ENV):
        return Path(os.environ[PROFILE_ENV])
    if os.geteuid() == 0:
        return Path("/etc/tunnelmesh/profile.json")
    return Path.home() / ".config" / "tunnelmesh" / "profile.json"


def save_profile(profile: Profile, path: Path | None = None) -> Path:
    """Write ``profile`` as JSON, mode 0600 (it holds the token), atomically; returns the path."""
    path = path or default_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {
        "version": PROFILE_VERSION,
        "coordinators": list(profile.coordinators),
        "ca_pem": profile.ca_pem.decode(),
        "token": profile.token,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a leftover tmp file
    os.replace(tmp, path)
    return path


def load_profile(path: Path | None = None) -> Profile | None:
    """The profile at ``path`` (default :func:`default_profile_path`), None if there is none. A profile that
    others can read, or a malformed one, is an error that names the file."""
    path = path or default_profile_path()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TunnelMeshError(f"{path}: cannot read the client profile: {exc.strerror}") from None
    if mode & 0o077:
        raise TunnelMeshError(
            f"{path}: the profile holds an API token but is readable by others; chmod 600 it"
        )
    try:
        doc = json.loads(text)
        coords = doc["coordinators"]
        ca_pem = doc["ca_pem"].encode()
        token = doc.get("token")
        if not isinstance(coords, list) or not all(isinstance(c, str) for c in coords):
            raise TypeError("coordinators")
        if token is not None and not isinstance(token, str):
            raise TypeError("token")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TunnelMeshError(
            f"{path}: malformed client profile ({exc}); expected JSON with coordinators, ca_pem, token "
            f"(rewrite it with `tunnelmesh up`)"
        ) from None
    return Profile(tuple(coords), ca_pem, token or None)


def _split_endpoints(text: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in text.split(",") if e.strip())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TunnelMeshError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def resolve_profile(
    *,
    coordinators: str | None = None,
    ca_file: Path | None = None,
    token: str | None = None,
    data_dir: Path | None = None,
    profile_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Profile:
    """Combine the sources, field by field, first found wins: flags (``coordinators`` "host:port,...",
    ``ca_file``, ``token``), then the environment (``TUNNELMESH_COORD``, ``TUNNELMESH_CA`` (a file),
    ``TUNNELMESH_API_TOKEN``), then a local coordinator's ``data_dir`` (``ca.crt``, ``admin-token``,
    ``api-address``), then the profile file. A missing coordinator list or CA is an error saying how to give
    it; a missing token is allowed (health checks, or a server that will answer UNAUTHENTICATED)."""
    env = os.environ if env is None else env
    coords = _split_endpoints(coordinators or env.get(COORD_ENV, ""))
    ca_path = ca_file or (Path(env[CA_ENV]) if env.get(CA_ENV) else None)
    ca_pem = _read(ca_path, "CA certificate") if ca_path else None
    tok = token or env.get(TOKEN_ENV) or None
    if data_dir is not None:
        if not coords and (data_dir / API_ADDRESS_FILE).exists():
            coords = _split_endpoints(_read(data_dir / API_ADDRESS_FILE, "coordinator API address").decode())
        if ca_pem is None:
            ca_pem = _read(data_dir / pki.CA_CERT_FILE, "cluster CA certificate")
        if tok is None and (data_dir / ADMIN_TOKEN_FILE).exists():
            tok = _read(data_dir / ADMIN_TOKEN_FILE, "admin token").decode().strip()
    if not coords or ca_pem is None or tok is None:
        saved = load_profile(profile_path)
        if saved is not None:
            coords = coords or saved.coordinators
            ca_pem = ca_pem if ca_pem is not None else saved.ca_pem
            tok = tok or saved.token
    if not coords:
        raise TunnelMeshError(
            f"no coordinator address: pass --coord host:port[,host:port...], set {COORD_ENV}, pass "
            f"--data-dir of a local coordinator, or run `tunnelmesh up` to write a profile"
        )
    if ca_pem is None:
        raise TunnelMeshError(
            f"no cluster CA certificate: pass --ca FILE (ca.crt from a coordinator's data dir), set "
            f"{CA_ENV}, or pass --data-dir of a local coordinator"
        )
    return Profile(coords, ca_pem, tok)
