"""Command builders for the state machine tests: one small function per command, sensible defaults."""

from __future__ import annotations

import hashlib
from typing import Any

from tunnelmesh.api.v1 import common_pb2, state_pb2
from tunnelmesh.coord.state import NS_PER_SECOND, MeshState, encode_command, ns_to_timestamp

T0 = 1_767_225_600 * NS_PER_SECOND  # 2026-01-01T00:00:00Z
HOUR = 3600 * NS_PER_SECOND
PSK = bytes(range(32))


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def key(n: int) -> bytes:
    """A distinct 32-byte public key per n."""
    return hashlib.sha256(b"key-%d" % n).digest()


def command(kind: str, body: Any, *, at: int = T0, request_id: str = "", actor: str = "cli:local") -> bytes:
    data = encode_command(body, proposed_at=at, request_id=request_id, actor=actor)
    assert state_pb2.Command.FromString(data).WhichOneof("command") == kind
    return data


def init_mesh(
    prefixes: tuple[str, ...] = ("100.64.0.0/10",), quarantine: int = 3600, **kw: Any
) -> state_pb2.InitializeMesh:
    settings = state_pb2.MeshSettings(
        mesh_id=kw.pop("mesh_id", "m-1"),
        mesh_domain=kw.pop("mesh_domain", "mesh.example"),
        mesh_prefixes=prefixes,
        preshared_key=kw.pop("preshared_key", PSK),
        mtu=kw.pop("mtu", 1420),
        address_quarantine_seconds=quarantine,
        request_retention_seconds=kw.pop("retention", 3600),
    )
    assert not kw, kw
    return state_pb2.InitializeMesh(settings=settings)


def join_token(
    token_id: str = "jt-1",
    *,
    expires_at: int = T0 + HOUR,
    reusable: bool = False,
    max_uses: int = 0,
    tags: tuple[str, ...] = (),
    secret: str | None = None,
) -> state_pb2.CreateJoinToken:
    return state_pb2.CreateJoinToken(
        token_id=token_id,
        secret_hash=sha(secret or f"secret-{token_id}"),
        tags=tags,
        expires_at=ns_to_timestamp(expires_at),
        reusable=reusable,
        max_uses=max_uses,
    )


def register(
    n: int,
    *,
    token_id: str = "jt-1",
    name: str | None = None,
    node_id: str | None = None,
    tags: tuple[str, ...] = (),
    token_hash: str = "",
) -> state_pb2.RegisterNode:
    return state_pb2.RegisterNode(
        node_id=node_id or f"n-{n:012x}",
        join_token_id=token_id,
        public_key=key(n),
        name=name or f"host{n}",
        hostname=f"host{n}.lan",
        tags=tags,
        node_token_hash=sha(token_hash or f"node-token-{n}"),
        agent_version="0.1.0",
        platform="linux/amd64",
    )


def api_token(
    token_id: str = "at-1", role: int = common_pb2.ROLE_ADMIN, **kw: Any
) -> state_pb2.CreateApiToken:
    body = state_pb2.CreateApiToken(token_id=token_id, secret_hash=sha(f"api-{token_id}"), role=role)  # type: ignore[arg-type]
    if "expires_at" in kw:
        body.expires_at.CopyFrom(ns_to_timestamp(kw.pop("expires_at")))
    assert not kw, kw
    return body


class Driver:
    """Feeds a MeshState consecutive Raft indexes, like the Raft driver does."""

    def __init__(self, state: MeshState | None = None) -> None:
        self.state = state or MeshState()
        self.index = self.state.applied_index

    def raw(self, data: bytes) -> state_pb2.CommandResult:
        self.index += 1
        return self.state.apply(self.index, data)

    def do(self, kind: str, body: Any, **kw: Any) -> state_pb2.CommandResult:
        return self.raw(command(kind, body, **kw))

    def ok(self, kind: str, body: Any, **kw: Any) -> state_pb2.CommandResult:
        result = self.do(kind, body, **kw)
        assert not result.HasField("error"), result.error
        return result


def mesh_with_token(**token_kw: Any) -> Driver:
    d = Driver()
    d.ok("initialize_mesh", init_mesh())
    d.ok("create_join_token", join_token(**token_kw))
    return d


def without_index(snapshot: bytes) -> bytes:
    """A snapshot with applied_index cleared: what 'changes nothing' compares (the index always advances)."""
    snap = state_pb2.StateSnapshot.FromString(snapshot)
    snap.applied_index = 0
    return snap.SerializeToString(deterministic=True)
