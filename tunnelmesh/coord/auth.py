"""API-token authentication and role authorization on the coordinators' public gRPC port.

Theory of operation. The proto files are the single source of truth: every method of a protected service
carries ``option (tunnelmesh.v1.required_role) = ROLE_...`` (common.proto). At start the interceptor reads the
options of every service registered on the port into a table ``/pkg.Service/Method -> least role``. For each
call of a protected service it then

1. reads ``authorization: Bearer tma_<id>_<secret>`` from the call metadata (missing -> UNAUTHENTICATED,
   not ``tma_...`` -> UNAUTHENTICATED);
2. finds the token record by id in this coordinator's applied replicated state (``MeshState.get_api_token``);
   an id it does not know yet is looked up once more after a read barrier, so a token created a moment ago
   on another coordinator works at once (unknown after that -> UNAUTHENTICATED);
3. compares the SHA-256 of the secret with the stored hash in constant time (wrong -> UNAUTHENTICATED, with
   the same message as an unknown id, so a caller learns nothing about which ids exist);
4. checks that it is neither revoked nor expired (``ApiToken.is_active``, wall clock) -> else UNAUTHENTICATED;
5. compares the token's role with the method's least role (roles are cumulative) -> else PERMISSION_DENIED.

``KvService.Session`` carries many operations on one call: opening it takes a read-only token, and each
operation goes through the same five steps again with the method of its unary twin (a put needs what ``Put``
needs), so a token revoked or expiring while a session is open stops working at its next operation.

A method of a protected service without the option is refused to every token (fail closed), and so is every
method of a service this module does not know to be open. Open services (no API token): NodeService
(Register carries a join token, WatchConfig/ReportStatus a node token, checked by the servicer itself),
ClusterJoinService (the bundle is encrypted with the join secret), gRPC health and server reflection.

Every refusal is counted in ``tunnelmesh_api_auth_failures_total{reason}`` and logged
(``event=api_auth_failed``) with the token id, never the secret. A revocation is effective on a coordinator
as soon as it has applied it (followers apply within a heartbeat or so of the leader).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import Counter

from tunnelmesh import tokens
from tunnelmesh.api.v1 import common_pb2
from tunnelmesh.coord.state import ApiToken, MeshState

log = logging.getLogger(__name__)
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

# Services whose methods need no API token (see the module docstring for why each is safe).
OPEN_SERVICES: Final = frozenset(
    {
        "tunnelmesh.v1.NodeService",
        "tunnelmesh.v1.ClusterJoinService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

ROLE_NAMES: Final[dict[int, str]] = {
    common_pb2.ROLE_UNSPECIFIED: "none",
    common_pb2.ROLE_READ_ONLY: "read-only",
    common_pb2.ROLE_OPERATOR: "operator",
    common_pb2.ROLE_ADMIN: "admin",
}

REASONS: Final = (
    "missing",  # no authorization: Bearer metadata
    "malformed",  # not tma_<12 hex>_<40 hex>
    "unknown",  # no token with that id
    "bad_secret",  # the id exists, the secret does not match
    "revoked",
    "expired",
    "role",  # authenticated, but the role is below the method's
    "no_role_option",  # the method declares no required_role: refused to everyone
)

AUTH_FAILURES = Counter(
    "tunnelmesh_api_auth_failures",
    "Public API calls refused by the API-token check, by reason.",
    ["reason"],
)
for _reason in REASONS:
    AUTH_FAILURES.labels(_reason)  # export every series at 0, so a rate() works before the first failure

BARRIER_TIMEOUT = 2.0  # seconds at most spent confirming an unknown token id with the leader


class AuthFailure(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str, token_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.token_id = token_id


def required_roles(services: Iterable[ServiceDescriptor]) -> dict[str, int]:
    """``{"/pkg.Service/Method": least role}`` from the ``required_role`` options (unset: 0, refused)."""
    table: dict[str, int] = {}
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            role = options.Extensions[common_pb2.required_role]
            table[f"/{service.full_name}/{method.name}"] = int(role)
    return table


class ApiTokenAuthenticator:
    """The checks of the module docstring, without gRPC plumbing (unit-testable with a plain MeshState)."""

    def __init__(
        self,
        state: Callable[[], MeshState],
        *,
        read_barrier: Callable[[float], Awaitable[Any]] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._state = state
        self._read_barrier = read_barrier
        self._clock = clock
        self._barrier_lock = asyncio.Lock()
        self._barrier_generation = 0

    async def authenticate(self, metadata: Any, method: str, least_role: int) -> ApiToken:
        """The caller's token record if it may call ``method``; else raises AuthFailure."""
        if least_role == common_pb2.ROLE_UNSPECIFIED:
            raise AuthFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                "no_role_option",
                f"{method} declares no required_role: refused to every API token",
            )
        text = tokens.bearer(metadata)
        if text is None:
            raise AuthFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing",
                f"{method} needs an API token: send metadata 'authorization: Bearer tma_...' "
                "(tunnelmesh CLI: --token, TUNNELMESH_API_TOKEN or a profile)",
            )
        try:
            presented = tokens.ApiToken.parse(text)
        except tokens.TokenError as exc:
            raise AuthFailure(grpc.StatusCode.UNAUTHENTICATED, "malformed", str(exc)) from None
        record = await self._lookup(presented.token_id)
        unknown = "unknown API token (never created here, or deleted); ask an admin for a token"
        if record is None:
            raise AuthFailure(grpc.StatusCode.UNAUTHENTICATED, "unknown", unknown, presented.token_id)
        if not tokens.matches(presented.secret, record.secret_hash):
            raise AuthFailure(grpc.StatusCode.UNAUTHENTICATED, "bad_secret", unknown, presented.token_id)
        if record.revoked_at is not None:
            raise AuthFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                "revoked",
                f"API token {record.token_id} was revoked",
                record.token_id,
            )
        if not record.is_active(self._clock()):
            raise AuthFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                "expired",
                f"API token {record.token_id} has expired; ask an admin for a new one",
                record.token_id,
            )
        if record.role < least_role:
            raise AuthFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                "role",
                f"API token {record.token_id} has role {ROLE_NAMES.get(record.role, record.role)}; {method} "
                f"needs {ROLE_NAMES[least_role]} or higher",
                record.token_id,
            )
        return record

    async def _lookup(self, token_id: str) -> ApiToken | None:
        record = self._state().get_api_token(token_id)
        if record is not None or self._read_barrier is None:
            return record
        # Not applied here (yet): confirm with the leader once. Callers with unknown ids share one barrier at
        # a time, so a flood of bogus tokens costs one ReadIndex round per round, not one per call.
        generation = self._barrier_generation
        try:
            async with asyncio.timeout(BARRIER_TIMEOUT):
                async with self._barrier_lock:
                    if self._barrier_generation == generation:
                        await self._read_barrier(BARRIER_TIMEOUT)
                        self._barrier_generation += 1
        except Exception as exc:  # no leader, timeout: the answer stays "unknown"
            log.info("event=api_auth_barrier_failed token_id=%s error=%r", token_id, str(exc))
        return self._state().get_api_token(token_id)


class ApiTokenInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio server interceptor: API tokens and roles for every service not in OPEN_SERVICES."""

    def __init__(
        self,
        authenticator: ApiTokenAuthenticator,
        services: Iterable[ServiceDescriptor],
        open_services: Iterable[str] = OPEN_SERVICES,
    ) -> None:
        self.authenticator = authenticator
        self.roles = required_roles(services)
        self.open_services = frozenset(open_services)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        method: str = handler_call_details.method
        service = method[1:].partition("/")[0]
        handler = await continuation(handler_call_details)
        if service in self.open_services or handler is None:
            return handler  # None: unknown method, gRPC answers UNIMPLEMENTED
        try:
            await self.authorize(handler_call_details.invocation_metadata, method)
        except AuthFailure as exc:
            refusal: grpc.RpcMethodHandler[_Req, _Resp] = _refusal(handler, exc.code, exc.message)
            return refusal
        return handler

    async def authorize(self, metadata: Any, method: str) -> None:
        """Raise AuthFailure (counted and logged) unless the caller's token may call ``method`` now. Also for
        each operation of a ``KvService.Session``, with the method of that operation's unary call."""
        least = self.roles.get(method, common_pb2.ROLE_UNSPECIFIED)
        try:
            await self.authenticator.authenticate(metadata, method, least)
        except AuthFailure as exc:
            AUTH_FAILURES.labels(exc.reason).inc()
            log.info(
                "event=api_auth_failed method=%s reason=%s code=%s token_id=%s",
                method,
                exc.reason,
                exc.code.name,
                exc.token_id or "-",
            )
            raise


def _refusal(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same shape as ``handler`` that only aborts with ``code``."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    async def abort(request: Any, context: Any) -> Any:
        await context.abort(code, message)

    if handler.response_streaming:

        async def abort_stream(request: Any, context: Any) -> Any:
            await context.abort(code, message)
            yield  # pragma: no cover - abort raises; this makes the function an async generator

        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return make(abort_stream, **codec)
    make = (
        grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(abort, **codec)
