"""API-token checks (coord/auth.py) against a real replicated state: each refusal, its gRPC code and reason.

The proto option ``required_role`` is the single source of truth: every method of AdminService and
KvService must carry one (a method without it would be refused to every token). The same checks through
real coordinator processes are in tests/integration/test_api_auth.py."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.unit.coord.builders import HOUR, T0, command
from tunnelmesh import tokens
from tunnelmesh.api.v1 import admin_pb2, common_pb2, kv_pb2, state_pb2
from tunnelmesh.coord.auth import ApiTokenAuthenticator, AuthFailure, required_roles
from tunnelmesh.coord.state import MeshState, ns_to_timestamp

ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
KV = kv_pb2.DESCRIPTOR.services_by_name["KvService"]
PUT = "/tunnelmesh.v1.KvService/Put"


def _state(*tokens_: tuple[tokens.ApiToken, int, int | None]) -> MeshState:
    st = MeshState()
    for i, (tok, role, expires_at) in enumerate(tokens_, start=1):
        body = state_pb2.CreateApiToken(token_id=tok.token_id, secret_hash=tok.secret_hash, role=role)  # type: ignore[arg-type]
        if expires_at is not None:
            body.expires_at.CopyFrom(ns_to_timestamp(expires_at))
        result = st.apply(i, command("create_api_token", body))
        assert not result.HasField("error"), result
    return st


def _md(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("authorization", f"Bearer {token}")]


def _check(auth: ApiTokenAuthenticator, token: str | None, method: str = PUT, role: int = 2) -> Any:
    return asyncio.run(auth.authenticate(_md(token), method, role))


def _failure(auth: ApiTokenAuthenticator, token: str | None, **kw: Any) -> AuthFailure:
    with pytest.raises(AuthFailure) as err:
        _check(auth, token, **kw)
    return err.value


def test_every_admin_and_kv_method_declares_its_least_role() -> None:
    roles = required_roles([ADMIN, KV])
    assert len(roles) == len(ADMIN.methods) + len(KV.methods)
    missing = [m for m, r in roles.items() if r == common_pb2.ROLE_UNSPECIFIED]
    assert missing == []
    assert roles[PUT] == common_pb2.ROLE_OPERATOR
    assert roles["/tunnelmesh.v1.KvService/Get"] == common_pb2.ROLE_READ_ONLY
    assert roles["/tunnelmesh.v1.AdminService/RemoveMember"] == common_pb2.ROLE_ADMIN
    assert roles["/tunnelmesh.v1.AdminService/SaveSnapshot"] == common_pb2.ROLE_ADMIN


def test_roles_are_cumulative() -> None:
    ro, op, admin = tokens.ApiToken.new(), tokens.ApiToken.new(), tokens.ApiToken.new()
    st = _state((ro, 1, None), (op, 2, None), (admin, 3, None))
    auth = ApiTokenAuthenticator(lambda: st, clock=lambda: T0)
    assert _check(auth, str(admin), role=3).role == 3
    assert _check(auth, str(op), role=2).token_id == op.token_id
    assert _check(auth, str(ro), role=1).token_id == ro.token_id
    denied = _failure(auth, str(ro), role=2)
    assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "role")
    assert f"API token {ro.token_id} has role read-only; {PUT} needs operator or higher" == denied.message
    assert _failure(auth, str(op), role=3).reason == "role"


def test_each_bad_credential_is_unauthenticated_with_its_reason() -> None:
    good, revoked, expiring = tokens.ApiToken.new(), tokens.ApiToken.new(), tokens.ApiToken.new()
    st = _state((good, 3, None), (revoked, 3, None), (expiring, 3, T0 + HOUR))
    st.apply(4, command("revoke_api_token", state_pb2.RevokeApiToken(token_id=revoked.token_id), at=T0 + 1))
    now = [T0 + 2]
    auth = ApiTokenAuthenticator(lambda: st, clock=lambda: now[0])
    cases = {
        None: "missing",
        "tma_short": "malformed",
        str(tokens.ApiToken.new()): "unknown",
        f"tma_{good.token_id}_{'0' * 40}": "bad_secret",
        str(revoked): "revoked",
    }
    for token, reason in cases.items():
        f = _failure(auth, token)
        assert (f.code, f.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), token
    basic = [("authorization", "Basic dXNlcjpwdw==")]  # another scheme carries no API token
    with pytest.raises(AuthFailure, match="needs an API token") as err:
        asyncio.run(auth.authenticate(basic, PUT, 2))
    assert err.value.reason == "missing"
    # The wrong secret of a known id reads like an unknown id: nothing tells the caller the id exists.
    assert (
        _failure(auth, f"tma_{good.token_id}_{'0' * 40}").message
        == _failure(auth, str(tokens.ApiToken.new())).message
    )
    assert _check(auth, str(expiring)).token_id == expiring.token_id
    now[0] = T0 + HOUR
    assert _failure(auth, str(expiring)).reason == "expired"


def test_a_method_without_a_role_is_refused_even_to_admin() -> None:
    admin = tokens.ApiToken.new()
    st = _state((admin, 3, None))
    auth = ApiTokenAuthenticator(lambda: st, clock=lambda: T0)
    f = _failure(auth, str(admin), method="/tunnelmesh.v1.AdminService/New", role=common_pb2.ROLE_UNSPECIFIED)
    assert (f.code, f.reason) == (grpc.StatusCode.PERMISSION_DENIED, "no_role_option")


def test_an_unknown_id_is_looked_up_again_after_one_read_barrier() -> None:
    # A token created a moment ago on another coordinator: not applied here until the barrier.
    tok = tokens.ApiToken.new()
    st = MeshState()
    barriers: list[float] = []

    async def barrier(budget: float) -> int:
        barriers.append(budget)
        body = state_pb2.CreateApiToken(
            token_id=tok.token_id, secret_hash=tok.secret_hash, role=common_pb2.ROLE_OPERATOR
        )
        st.apply(1, command("create_api_token", body))
        return 1

    auth = ApiTokenAuthenticator(lambda: st, read_barrier=barrier, clock=lambda: T0)
    assert _check(auth, str(tok)).token_id == tok.token_id
    assert len(barriers) == 1
    assert _check(auth, str(tok)).token_id == tok.token_id  # known now: no barrier
    assert len(barriers) == 1


def test_a_failing_barrier_leaves_the_token_unknown() -> None:
    async def barrier(budget: float) -> int:
        raise RuntimeError("no leader")

    auth = ApiTokenAuthenticator(MeshState, read_barrier=barrier, clock=lambda: T0)
    assert _failure(auth, str(tokens.ApiToken.new())).reason == "unknown"
