"""The state machine's rules, one case per rule, as a table (like etcd's raft_paper_test.go).

Every case builds a mesh with the ``given`` commands (which must succeed), applies ``when`` and checks the
error code (None: success) and optionally a ``then`` predicate on the state and result. A rejected command
must change nothing: every failing case also checks that the snapshot (less ``applied_index``, which always
advances) is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tunnelmesh.api.v1 import common_pb2, state_pb2
from tunnelmesh.coord.state import (
    _HANDLERS,
    NS_PER_SECOND,
    ApiToken,
    JoinToken,
    MeshState,
    Node,
    SnapshotError,
    StateError,
    UnsupportedCommandError,
    encode_command,
    ns_to_timestamp,
)

from .builders import (
    HOUR,
    T0,
    Driver,
    api_token,
    command,
    init_mesh,
    join_token,
    key,
    register,
    sha,
    without_index,
)

E = state_pb2.CommandErrorCode
NOT_FOUND = E.COMMAND_ERROR_CODE_NOT_FOUND
ALREADY_EXISTS = E.COMMAND_ERROR_CODE_ALREADY_EXISTS
FAILED_PRECONDITION = E.COMMAND_ERROR_CODE_FAILED_PRECONDITION
INVALID_ARGUMENT = E.COMMAND_ERROR_CODE_INVALID_ARGUMENT
RESOURCE_EXHAUSTED = E.COMMAND_ERROR_CODE_RESOURCE_EXHAUSTED
UNAUTHENTICATED = E.COMMAND_ERROR_CODE_UNAUTHENTICATED
PERMISSION_DENIED = E.COMMAND_ERROR_CODE_PERMISSION_DENIED

Step = tuple[str, Any, dict[str, Any]]


def step(kind: str, body: Any, **kw: Any) -> Step:
    return (kind, body, kw)


MESH = [step("initialize_mesh", init_mesh())]
TOKEN = [*MESH, step("create_join_token", join_token())]
REUSABLE = [*MESH, step("create_join_token", join_token(reusable=True, expires_at=T0 + 5 * HOUR))]
ONE_NODE = [*TOKEN, step("register_node", register(1))]
TWO_NODES = [*REUSABLE, step("register_node", register(1)), step("register_node", register(2))]


def node(state: MeshState, n: int) -> Node:
    found = state.node_by_public_key(key(n))
    assert found is not None
    return found


def jt(state: MeshState, token_id: str) -> JoinToken:
    token = state.get_join_token(token_id)
    assert token is not None
    return token


def at(state: MeshState, token_id: str) -> ApiToken:
    token = state.get_api_token(token_id)
    assert token is not None
    return token


def kv(state: MeshState, k: bytes) -> bytes:
    entry = state.kv_get(k)
    assert entry is not None
    return entry.value


def ips(result: state_pb2.CommandResult) -> list[str]:
    return list(result.register_node.node.mesh_ips)


def registered(result: state_pb2.CommandResult) -> state_pb2.NodeRecord:
    return result.register_node.node


def _fields(message: Any) -> dict[str, Any]:
    return {f.name: v for f, v in message.ListFields()}


@dataclass
class Case:
    id: str
    rule: str
    given: list[Step]
    when: Step
    code: int | None = None
    then: Callable[[MeshState, state_pb2.CommandResult], object] = field(default=lambda s, r: True)


# fmt: off
CASES = [
    # ---- InitializeMesh ------------------------------------------------------------------------------------
    Case("init-ok", "InitializeMesh sets the settings; mtu 0 means the default 1420", [],
         step("initialize_mesh", init_mesh(mtu=0)),
         then=lambda s, r: s.settings is not None and s.settings.mtu == 1420 and s.config_version == 1),
    Case("init-twice", "InitializeMesh is rejected if already applied", MESH,
         step("initialize_mesh", init_mesh(mesh_id="m-2")), FAILED_PRECONDITION),
    Case("init-no-settings", "InitializeMesh needs settings", [],
         step("initialize_mesh", state_pb2.InitializeMesh()), INVALID_ARGUMENT),
    Case("init-host-bits", "mesh prefixes are CIDR prefixes with zero host bits", [],
         step("initialize_mesh", init_mesh(prefixes=("100.64.0.1/10",))), INVALID_ARGUMENT),
    Case("init-two-v4", "at most one IPv4 and one IPv6 prefix", [],
         step("initialize_mesh", init_mesh(prefixes=("100.64.0.0/10", "10.0.0.0/8"))), INVALID_ARGUMENT),
    Case("init-no-prefix", "at least one mesh prefix", [],
         step("initialize_mesh", init_mesh(prefixes=())), INVALID_ARGUMENT),
    Case("init-psk", "the mesh PSK is 32 bytes", [],
         step("initialize_mesh", init_mesh(preshared_key=b"short")), INVALID_ARGUMENT),
    Case("init-v6-mtu", "a mesh with an IPv6 prefix needs an MTU of at least 1280", [],
         step("initialize_mesh", init_mesh(prefixes=("100.64.0.0/10", "fd7a:115c:a1e0::/48"), mtu=1200)),
         INVALID_ARGUMENT),
    Case("init-domain", "the mesh domain is a lowercase DNS name", [],
         step("initialize_mesh", init_mesh(mesh_domain="Mesh..example")), INVALID_ARGUMENT),
    # ---- RegisterNode: join token validation ---------------------------------------------------------------
    Case("reg-uninitialized", "RegisterNode needs an initialized mesh", [],
         step("register_node", register(1)), FAILED_PRECONDITION),
    Case("reg-unknown-token", "join token must exist", MESH,
         step("register_node", register(1, token_id="jt-9")), UNAUTHENTICATED),
    Case("reg-expired", "join token must not be expired at proposed_at (expiry instant included)", TOKEN,
         step("register_node", register(1), at=T0 + HOUR), UNAUTHENTICATED),
    Case("reg-just-before-expiry", "join token valid until its expiry", TOKEN,
         step("register_node", register(1), at=T0 + HOUR - 1)),
    Case("reg-revoked", "join token must not be revoked", [*TOKEN, step("revoke_join_token",
         state_pb2.RevokeJoinToken(token_id="jt-1"))], step("register_node", register(1)), UNAUTHENTICATED),
    Case("reg-single-use", "a single-use token registers one node", ONE_NODE,
         step("register_node", register(2)), UNAUTHENTICATED),
    Case("reg-max-uses", "a reusable token registers at most max_uses nodes",
         [*MESH, step("create_join_token", join_token(reusable=True, max_uses=2)),
          step("register_node", register(1)), step("register_node", register(2))],
         step("register_node", register(3)), UNAUTHENTICATED),
    Case("reg-unlimited", "a reusable token with max_uses 0 is unlimited until expiry",
         [*REUSABLE, *[step("register_node", register(i)) for i in range(1, 20)]],
         step("register_node", register(20)),
         then=lambda s, r: jt(s, "jt-1").uses == 20),
    Case("reg-consumes-use", "a registration consumes one use of the token", TOKEN,
         step("register_node", register(1)),
         then=lambda s, r: jt(s, "jt-1").uses == 1),
    # ---- RegisterNode: idempotent per public key -----------------------------------------------------------
    Case("reg-retry-used-up", "a retry (same key, same token) is accepted although the token is used up",
         ONE_NODE, step("register_node", register(1, node_id="n-other", token_hash="fresh")),
         then=lambda s, r: registered(r).node_id == "n-000000000001"
         and jt(s, "jt-1").uses == 1
         and s.node_count == 1 and node(s, 1).node_token_hash == sha("fresh")),
    Case("reg-retry-revoked", "a retry with a revoked token is refused (only 'used up' is excused)",
         [*ONE_NODE, step("revoke_join_token", state_pb2.RevokeJoinToken(token_id="jt-1"))],
         step("register_node", register(1)), UNAUTHENTICATED),
    Case("reg-retry-expired", "a retry with an expired token is refused", ONE_NODE,
         step("register_node", register(1), at=T0 + 2 * HOUR), UNAUTHENTICATED),
    Case("reg-known-key-other-token", "a known key with another valid token cannot take the node over",
         [*ONE_NODE, step("create_join_token", join_token("jt-2"))],
         step("register_node", register(1, token_id="jt-2", token_hash="again")), ALREADY_EXISTS),
    Case("reg-known-key-used-other-token", "a known key with another used-up token is refused",
         [*ONE_NODE, step("create_join_token", join_token("jt-2")),
          step("register_node", register(2, token_id="jt-2"))],
         step("register_node", register(1, token_id="jt-2")), ALREADY_EXISTS),
    # ---- RegisterNode: validation --------------------------------------------------------------------------
    Case("reg-key-length", "the public key is 32 bytes", TOKEN,
         step("register_node", state_pb2.RegisterNode(**{**_fields(register(1)), "public_key": b"x" * 31})),
         INVALID_ARGUMENT),
    Case("reg-bad-name", "the name is a DNS label", TOKEN,
         step("register_node", register(1, name="Bad_Name")), INVALID_ARGUMENT),
    Case("reg-tags-not-granted", "requested tags must be granted by the token",
         [*MESH, step("create_join_token", join_token(tags=("tag:ci",)))],
         step("register_node", register(1, tags=("tag:prod",))), PERMISSION_DENIED),
    Case("reg-tags-default", "no requested tags means all of the token's tags",
         [*MESH, step("create_join_token", join_token(tags=("tag:ci", "tag:eu")))],
         step("register_node", register(1)), then=lambda s, r: node(s, 1).tags == ("tag:ci", "tag:eu")),
    Case("reg-tags-subset", "requested tags, a subset of the token's, are what the node gets",
         [*MESH, step("create_join_token", join_token(tags=("tag:ci", "tag:eu")))],
         step("register_node", register(1, tags=("tag:eu",))),
         then=lambda s, r: node(s, 1).tags == ("tag:eu",)),
    Case("reg-node-id-taken", "node ids are unique", [*REUSABLE, step("register_node", register(1))],
         step("register_node", register(2, node_id="n-000000000001")), ALREADY_EXISTS),
    # ---- RegisterNode: names -------------------------------------------------------------------------------
    Case("reg-name-suffix", "a taken name gets -2, -3, ...",
         [*REUSABLE, step("register_node", register(1, name="web")),
          step("register_node", register(2, name="web"))],
         step("register_node", register(3, name="web")), then=lambda s, r: registered(r).name == "web-3"),
    Case("reg-name-suffix-reuses-gap", "the first free suffix is used",
         [*REUSABLE, step("register_node", register(1, name="web")),
          step("register_node", register(2, name="web")), step("register_node", register(3, name="web")),
          step("remove_node", state_pb2.RemoveNode(node_id="n-000000000002"))],
         step("register_node", register(4, name="web")), then=lambda s, r: registered(r).name == "web-2"),
    Case("reg-name-suffix-63", "a suffixed name still fits in 63 characters",
         [*REUSABLE, step("register_node", register(1, name="a" * 63))],
         step("register_node", register(2, name="a" * 63)),
         then=lambda s, r: registered(r).name == "a" * 61 + "-2"),
    # ---- RegisterNode: IPAM --------------------------------------------------------------------------------
    Case("ipam-lowest", "the first address is the lowest after the network address", TOKEN,
         step("register_node", register(1)), then=lambda s, r: ips(r) == ["100.64.0.1"]),
    Case("ipam-dual-stack", "one address from each mesh prefix",
         [step("initialize_mesh", init_mesh(prefixes=("100.64.0.0/10", "fd7a:115c:a1e0::/48"))),
          step("create_join_token", join_token())],
         step("register_node", register(1)),
         then=lambda s, r: ips(r) == ["100.64.0.1", "fd7a:115c:a1e0::1"]),
    Case("ipam-exhausted", "no free address: RESOURCE_EXHAUSTED (a /30 has two; broadcast is never used)",
         [step("initialize_mesh", init_mesh(prefixes=("10.9.0.0/30",))),
          step("create_join_token", join_token(reusable=True)),
          step("register_node", register(1)), step("register_node", register(2))],
         step("register_node", register(3)), RESOURCE_EXHAUSTED),
    Case("ipam-quarantine", "a freed address is not reused before the quarantine is over",
         [*TWO_NODES, step("remove_node", state_pb2.RemoveNode(node_id="n-000000000001"), at=T0 + 1)],
         step("register_node", register(3), at=T0 + 1 + 3600 * NS_PER_SECOND - 1),
         then=lambda s, r: ips(r) == ["100.64.0.3"]),
    Case("ipam-quarantine-over", "a freed address is reused (lowest first) once the quarantine is over",
         [*MESH, step("create_join_token", join_token(reusable=True, expires_at=T0 + 5 * HOUR)),
          step("register_node", register(1)), step("register_node", register(2)),
          step("remove_node", state_pb2.RemoveNode(node_id="n-000000000001"), at=T0 + 1)],
         step("register_node", register(3), at=T0 + 1 + HOUR),
         then=lambda s, r: ips(r) == ["100.64.0.1"]),
    Case("ipam-no-quarantine", "with address_quarantine_seconds 0 a freed address is free at once",
         [step("initialize_mesh", init_mesh(quarantine=0)),
          step("create_join_token", join_token(reusable=True)),
          step("register_node", register(1)), step("register_node", register(2)),
          step("remove_node", state_pb2.RemoveNode(node_id="n-000000000001"))],
         step("register_node", register(3)), then=lambda s, r: ips(r) == ["100.64.0.1"]),
    # ---- RenameNode ----------------------------------------------------------------------------------------
    Case("rename-ok", "RenameNode changes the name, frees the old one and bumps modified_index", ONE_NODE,
         step("rename_node", state_pb2.RenameNode(node_id="n-000000000001", new_name="db")),
         then=lambda s, r: node(s, 1).name == "db" and s.node_by_name("host1") is None
         and node(s, 1).modified_index == s.applied_index),
    Case("rename-missing", "RenameNode of an unknown node: NOT_FOUND", ONE_NODE,
         step("rename_node", state_pb2.RenameNode(node_id="n-x", new_name="db")), NOT_FOUND),
    Case("rename-taken", "RenameNode to another node's name: ALREADY_EXISTS", TWO_NODES,
         step("rename_node", state_pb2.RenameNode(node_id="n-000000000001", new_name="host2")),
         ALREADY_EXISTS),
    Case("rename-invalid", "RenameNode needs a DNS label", ONE_NODE,
         step("rename_node", state_pb2.RenameNode(node_id="n-000000000001", new_name="-x")),
         INVALID_ARGUMENT),
    Case("rename-same", "RenameNode to the current name succeeds and changes nothing", ONE_NODE,
         step("rename_node", state_pb2.RenameNode(node_id="n-000000000001", new_name="host1")),
         then=lambda s, r: node(s, 1).modified_index == 3),
    # ---- RemoveNode ----------------------------------------------------------------------------------------
    Case("remove-ok", "RemoveNode frees key, name and addresses (quarantined)", ONE_NODE,
         step("remove_node", state_pb2.RemoveNode(node_id="n-000000000001")),
         then=lambda s, r: s.node_count == 0 and s.node_by_name("host1") is None
         and s.node_by_public_key(key(1)) is None),
    Case("remove-missing", "RemoveNode of an unknown node: NOT_FOUND", ONE_NODE,
         step("remove_node", state_pb2.RemoveNode(node_id="n-x")), NOT_FOUND),
    Case("remove-then-rejoin", "a removed key registers again as a new node",
         [*TWO_NODES, step("remove_node", state_pb2.RemoveNode(node_id="n-000000000001"))],
         step("register_node", register(1, node_id="n-new")),
         then=lambda s, r: registered(r).node_id == "n-new" and registered(r).name == "host1"),
    # ---- SetNodeEndpoints ----------------------------------------------------------------------------------
    Case("endpoints-ok", "SetNodeEndpoints replaces the candidates", ONE_NODE,
         step("set_node_endpoints", state_pb2.SetNodeEndpoints(node_id="n-000000000001", endpoints=[
             common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address="192.168.1.5:51820"),
             common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_REFLEXIVE, address="[2001:db8::1]:4000")])),
         then=lambda s, r: [e.address for e in node(s, 1).endpoints]
         == ["192.168.1.5:51820", "[2001:db8::1]:4000"]
         and node(s, 1).modified_index == s.applied_index),
    Case("endpoints-missing", "SetNodeEndpoints of an unknown node: NOT_FOUND", ONE_NODE,
         step("set_node_endpoints", state_pb2.SetNodeEndpoints(node_id="n-x")), NOT_FOUND),
    Case("endpoints-bad-address", "endpoints are ip:port", ONE_NODE,
         step("set_node_endpoints", state_pb2.SetNodeEndpoints(node_id="n-000000000001", endpoints=[
             common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address="example.com:80")])),
         INVALID_ARGUMENT),
    Case("endpoints-v6-unbracketed", "IPv6 endpoints are bracketed", ONE_NODE,
         step("set_node_endpoints", state_pb2.SetNodeEndpoints(node_id="n-000000000001", endpoints=[
             common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address="2001:db8::1:80")])),
         INVALID_ARGUMENT),
    Case("endpoints-canonical", "endpoint addresses are canonical text (replicas must agree on validity)",
         ONE_NODE, step("set_node_endpoints", state_pb2.SetNodeEndpoints(node_id="n-000000000001", endpoints=[
             common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address="192.168.001.5:51820")])),
         INVALID_ARGUMENT),
    Case("endpoints-canonical-v6", "IPv6 endpoints are lowercase and compressed", ONE_NODE,
         step("set_node_endpoints", state_pb2.SetNodeEndpoints(node_id="n-000000000001", endpoints=[
             common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address="[2001:DB8:0:0::1]:80")])),
         INVALID_ARGUMENT),
    Case("endpoints-unspecified-type", "a candidate needs a known type", ONE_NODE,
         step("set_node_endpoints", state_pb2.SetNodeEndpoints(node_id="n-000000000001", endpoints=[
             common_pb2.Candidate(address="1.2.3.4:5")])), INVALID_ARGUMENT),
    Case("endpoints-agent-only", "an agent version change alone is not config-visible", ONE_NODE,
         step("set_node_endpoints",
              state_pb2.SetNodeEndpoints(node_id="n-000000000001", agent_version="0.2")),
         then=lambda s, r: node(s, 1).agent_version == "0.2" and node(s, 1).modified_index == 3
         and s.config_version == 3),
    # ---- RecordNodesSeen -----------------------------------------------------------------------------------
    Case("seen-online", "an online flip is display-only (liveness is not config: modified_index stays)",
         ONE_NODE,
         step("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[
             state_pb2.NodeSeen(node_id="n-000000000001", online=True, last_seen=ns_to_timestamp(T0 + 5))])),
         then=lambda s, r: node(s, 1).online and node(s, 1).last_seen == T0 + 5
         and node(s, 1).modified_index == 3 and s.config_version == 3),
    Case("seen-unknown-skipped", "unknown node ids in a liveness batch are skipped, not an error", ONE_NODE,
         step("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[state_pb2.NodeSeen(node_id="n-gone")]))),
    Case("seen-last-seen-only", "a last_seen update alone does not bump modified_index",
         [*ONE_NODE, step("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[
             state_pb2.NodeSeen(node_id="n-000000000001", last_seen=ns_to_timestamp(T0 + 5))]))],
         step("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[
             state_pb2.NodeSeen(node_id="n-000000000001", last_seen=ns_to_timestamp(T0 + 9))])),
         then=lambda s, r: node(s, 1).last_seen == T0 + 9 and node(s, 1).modified_index == 3),
    Case("seen-never-backwards", "last_seen never goes backwards",
         [*ONE_NODE, step("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[
             state_pb2.NodeSeen(node_id="n-000000000001", last_seen=ns_to_timestamp(T0 + 9))]))],
         step("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[
             state_pb2.NodeSeen(node_id="n-000000000001", last_seen=ns_to_timestamp(T0 + 5))])),
         then=lambda s, r: node(s, 1).last_seen == T0 + 9),
    # ---- Join tokens ---------------------------------------------------------------------------------------
    Case("jt-ok", "CreateJoinToken records creator and time", MESH, step("create_join_token", join_token(),
         actor="api-token:at-1"), then=lambda s, r: jt(s, "jt-1").created_by == "api-token:at-1"
         and s.join_token_by_secret_hash(sha("secret-jt-1")) is not None),
    Case("jt-duplicate-id", "join token ids are unique", TOKEN,
         step("create_join_token", join_token(secret="other")), ALREADY_EXISTS),
    Case("jt-duplicate-secret", "join token secret hashes are unique", TOKEN,
         step("create_join_token", join_token("jt-2", secret="secret-jt-1")), ALREADY_EXISTS),
    Case("jt-past", "a join token must expire after now", MESH,
         step("create_join_token", join_token(expires_at=T0)), INVALID_ARGUMENT),
    Case("jt-too-long", "a join token is valid for at most 365 days", MESH,
         step("create_join_token", join_token(expires_at=T0 + 366 * 24 * HOUR)), INVALID_ARGUMENT),
    Case("jt-single-max-uses", "max_uses needs a reusable token", MESH,
         step("create_join_token", join_token(max_uses=5)), INVALID_ARGUMENT),
    Case("jt-bad-tag", "tags are well-formed", MESH,
         step("create_join_token", join_token(tags=("tag with space",))), INVALID_ARGUMENT),
    Case("jt-no-expiry", "a join token has an expiry", MESH,
         step("create_join_token", state_pb2.CreateJoinToken(token_id="jt-1", secret_hash=sha("s"))),
         INVALID_ARGUMENT),
    Case("jt-revoke-missing", "RevokeJoinToken of an unknown token: NOT_FOUND", MESH,
         step("revoke_join_token", state_pb2.RevokeJoinToken(token_id="jt-9")), NOT_FOUND),
    Case("jt-revoke-twice", "revoking twice keeps the first revocation time",
         [*TOKEN, step("revoke_join_token", state_pb2.RevokeJoinToken(token_id="jt-1"), at=T0 + 1)],
         step("revoke_join_token", state_pb2.RevokeJoinToken(token_id="jt-1"), at=T0 + 2),
         then=lambda s, r: jt(s, "jt-1").revoked_at == T0 + 1),
    # ---- API tokens ----------------------------------------------------------------------------------------
    Case("at-ok", "CreateApiToken works before the mesh is initialized (bootstrap)", [],
         step("create_api_token", api_token()),
         then=lambda s, r: s.api_token_by_secret_hash(sha("api-at-1")) is not None),
    Case("at-role", "an API token has a role", [],
         step("create_api_token", api_token(role=common_pb2.ROLE_UNSPECIFIED)), INVALID_ARGUMENT),
    Case("at-duplicate", "API token ids are unique", [step("create_api_token", api_token())],
         step("create_api_token", api_token()), ALREADY_EXISTS),
    Case("at-expired", "an API token must expire after now", [],
         step("create_api_token", api_token(expires_at=T0 - 1)), INVALID_ARGUMENT),
    Case("at-revoke-last-admin", "the last active admin token cannot be revoked",
         [step("create_api_token", api_token()),
          step("create_api_token", api_token("at-2", common_pb2.ROLE_OPERATOR))],
         step("revoke_api_token", state_pb2.RevokeApiToken(token_id="at-1")), FAILED_PRECONDITION),
    Case("at-revoke-last-admin-others-expired", "an expired admin token does not count as another admin",
         [step("create_api_token", api_token()),
          step("create_api_token", api_token("at-2", expires_at=T0 + 10))],
         step("revoke_api_token", state_pb2.RevokeApiToken(token_id="at-1"), at=T0 + 10),
         FAILED_PRECONDITION),
    Case("at-revoke-admin", "an admin token can be revoked while another admin token is active",
         [step("create_api_token", api_token()), step("create_api_token", api_token("at-2"))],
         step("revoke_api_token", state_pb2.RevokeApiToken(token_id="at-1"), at=T0 + 3),
         then=lambda s, r: at(s, "at-1").revoked_at == T0 + 3
         and not at(s, "at-1").is_active(T0 + 3)),
    Case("at-revoke-missing", "RevokeApiToken of an unknown token: NOT_FOUND", [],
         step("revoke_api_token", state_pb2.RevokeApiToken(token_id="at-9")), NOT_FOUND),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule(case: Case) -> None:
    d = Driver()
    for kind, body, kw in case.given:
        d.ok(kind, body, **kw)
    kind, body, kw = case.when
    before = without_index(d.state.snapshot())
    result = d.do(kind, body, **kw)
    if case.code is None:
        assert not result.HasField("error"), f"{case.rule}: {result.error}"
    else:
        assert result.error.code == case.code, f"{case.rule}: got {result}"
        assert result.error.message, "a rejection explains itself"
        assert without_index(d.state.snapshot()) == before, (
            f"{case.rule}: a rejected command changed the state"
        )
    assert case.then(d.state, result), case.rule


# ---- Envelope rules ----------------------------------------------------------------------------------------


def test_dispatch_table_covers_the_command_oneof_exactly() -> None:
    oneof = state_pb2.Command.DESCRIPTOR.oneofs_by_name["command"]
    assert set(_HANDLERS) == {f.name for f in oneof.fields}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xff\xff", "unparseable bytes"),
        (state_pb2.Command(request_id="r").SerializeToString(), "no command set"),
        (command("kv_put", state_pb2.KvPut(key=b"k"), request_id="x" * 129), "request id too long"),
    ],
)
def test_malformed_entries_are_rejected_and_change_nothing(data: bytes, why: str) -> None:
    d = Driver()
    d.ok("initialize_mesh", init_mesh())
    before = without_index(d.state.snapshot())
    result = d.raw(data)
    assert result.error.code == INVALID_ARGUMENT, why
    assert without_index(d.state.snapshot()) == before
    assert d.state.applied_index == d.index


def test_proposed_at_is_required_and_valid() -> None:
    d = Driver()
    no_time = state_pb2.Command(kv_put=state_pb2.KvPut(key=b"k"))
    assert d.raw(no_time.SerializeToString()).error.code == INVALID_ARGUMENT
    bad = state_pb2.Command(kv_put=state_pb2.KvPut(key=b"k"))
    bad.proposed_at.seconds, bad.proposed_at.nanos = 1, 2_000_000_000
    assert d.raw(bad.SerializeToString()).error.code == INVALID_ARGUMENT


def test_empty_entry_is_a_raft_noop() -> None:
    d = Driver()
    result = d.raw(b"")
    assert result == state_pb2.CommandResult()
    assert d.state.applied_index == 1


def test_unknown_command_type_stops_the_replica() -> None:
    """state.proto: a coordinator meeting a command type it does not know stops applying, never skips it."""
    d = Driver()
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"v"))
    newer = command("kv_put", state_pb2.KvPut(key=b"k"))
    newer = state_pb2.Command.FromString(newer)
    newer.ClearField("kv_put")
    data = newer.SerializeToString() + bytes([0xA0, 0x0C, 0x01])  # field 196 (unallocated range), varint 1
    before = d.state.snapshot()
    with pytest.raises(UnsupportedCommandError, match="upgrade"):
        d.state.apply(2, data)
    assert d.state.snapshot() == before  # not even applied_index moved
    # An unknown *envelope* field (below 10) is a compatible addition and is ignored.
    envelope = command("kv_put", state_pb2.KvPut(key=b"k", value=b"w")) + bytes([0x20, 0x01])  # field 4
    assert not d.state.apply(2, envelope).HasField("error")


def test_indexes_must_increase() -> None:
    d = Driver()
    d.ok("kv_put", state_pb2.KvPut(key=b"k"))
    with pytest.raises(StateError):
        d.state.apply(1, command("kv_put", state_pb2.KvPut(key=b"k")))


def test_now_never_goes_backwards() -> None:
    d = Driver()
    d.ok("kv_put", state_pb2.KvPut(key=b"a"), at=T0 + 100)
    d.ok("create_api_token", api_token(), at=T0)  # a proposer with a slow clock
    assert d.state.now == T0 + 100
    assert at(d.state, "at-1").created_at == T0 + 100


# ---- Idempotent requests -----------------------------------------------------------------------------------


def test_retry_with_same_request_id_applies_once_and_returns_the_same_result() -> None:
    d = Driver()
    first = d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"1"), request_id="req-1")
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"2"))
    retry = d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"1"), request_id="req-1")
    assert retry == first and retry.request_id == "req-1"
    assert kv(d.state, b"k") == b"2"  # the retry did not write again


def test_retry_of_a_create_returns_success_not_already_exists() -> None:
    d = Driver()
    d.ok("initialize_mesh", init_mesh())
    first = d.ok("create_join_token", join_token(), request_id="req-jt")
    assert d.ok("create_join_token", join_token(), request_id="req-jt") == first
    assert d.do("create_join_token", join_token()).error.code == ALREADY_EXISTS  # no id: no de-duplication


def test_retry_of_a_register_returns_the_same_node() -> None:
    d = Driver()
    d.ok("initialize_mesh", init_mesh())
    d.ok("create_join_token", join_token(reusable=True))
    first = d.ok("register_node", register(1), request_id="reg-1")
    again = d.ok("register_node", register(1), request_id="reg-1")
    assert again == first and jt(d.state, "jt-1").uses == 1


def test_rejections_are_not_recorded_so_a_retry_is_evaluated_again() -> None:
    d = Driver()
    assert d.do("register_node", register(1), request_id="r").error.code == FAILED_PRECONDITION
    d.ok("initialize_mesh", init_mesh())
    d.ok("create_join_token", join_token())
    assert registered(d.ok("register_node", register(1), request_id="r")).node_id == "n-000000000001"


def test_request_ids_are_forgotten_after_the_retention_period() -> None:
    d = Driver()
    d.ok("initialize_mesh", init_mesh(retention=60))
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"1"), request_id="r", at=T0)
    d.ok("kv_put", state_pb2.KvPut(key=b"other"), at=T0 + 59 * NS_PER_SECOND)
    assert d.state.applied_request("r") is not None
    d.ok("kv_put", state_pb2.KvPut(key=b"other"), at=T0 + 60 * NS_PER_SECOND)  # prunes "r"
    assert d.state.applied_request("r") is None
    result = d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"1"), request_id="r", at=T0 + 61 * NS_PER_SECOND)
    assert result.kv.revision == d.index  # applied again: a new revision


def test_request_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunnelmesh.coord.state as state_module

    monkeypatch.setattr(state_module, "MAX_APPLIED_REQUESTS", 3)
    d = Driver()
    for i in range(5):
        d.ok("kv_put", state_pb2.KvPut(key=b"k"), request_id=f"r{i}")
    kept = [d.state.applied_request(f"r{i}") is not None for i in range(5)]
    assert kept == [False, False, True, True, True]


def test_dedup_results_are_copies() -> None:
    d = Driver()
    d.ok("kv_put", state_pb2.KvPut(key=b"k"), request_id="r")
    retry = d.ok("kv_put", state_pb2.KvPut(key=b"k"), request_id="r")
    retry.kv.revision = 99
    assert d.ok("kv_put", state_pb2.KvPut(key=b"k"), request_id="r").kv.revision == 1


# ---- Snapshot format ---------------------------------------------------------------------------------------


def test_restore_rejects_other_format_versions_and_garbage_without_changing_state() -> None:
    d = Driver()
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"v"))
    before = d.state.snapshot()
    future = state_pb2.StateSnapshot.FromString(before)
    future.format_version = 2
    with pytest.raises(SnapshotError, match="format version 2"):
        d.state.restore(future.SerializeToString())
    with pytest.raises(SnapshotError):
        d.state.restore(b"\xff\xff")
    assert d.state.snapshot() == before


def test_restore_rejects_an_inconsistent_snapshot() -> None:
    d = Driver()
    d.ok("initialize_mesh", init_mesh())
    d.ok("create_join_token", join_token(reusable=True))
    d.ok("register_node", register(1))
    d.ok("register_node", register(2))
    snap = state_pb2.StateSnapshot.FromString(d.state.snapshot())
    snap.nodes[1].mesh_ips[0] = snap.nodes[0].mesh_ips[0]  # one address handed out twice
    with pytest.raises(SnapshotError, match="twice"):
        MeshState.from_snapshot(snap.SerializeToString())


def test_snapshot_round_trip_keeps_every_read() -> None:
    d = Driver()
    d.ok("initialize_mesh", init_mesh(prefixes=("100.64.0.0/10", "fd7a:115c:a1e0::/48")))
    d.ok("create_join_token", join_token(reusable=True, tags=("tag:ci",)))
    d.ok("create_api_token", api_token())
    for i in range(1, 5):
        d.ok("register_node", register(i), request_id=f"r{i}")
    d.ok("remove_node", state_pb2.RemoveNode(node_id="n-000000000002"))
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"v"))
    restored = MeshState.from_snapshot(d.state.snapshot())
    assert restored.snapshot() == d.state.snapshot()
    assert restored.list_nodes() == d.state.list_nodes()
    assert restored.applied_request("r3") == d.state.applied_request("r3")
    # Both continue identically: the quarantined address is skipped by both.
    d2 = Driver(restored)
    a = d.ok("register_node", register(9), at=T0 + 5)
    b = d2.ok("register_node", register(9), at=T0 + 5)
    assert a == b and list(a.register_node.node.mesh_ips) == ["100.64.0.5", "fd7a:115c:a1e0::5"]


# ---- Reads for the services --------------------------------------------------------------------------------


def test_list_nodes_orders_by_name_filters_tags_and_pages() -> None:
    d = Driver()
    d.ok("initialize_mesh", init_mesh())
    d.ok("create_join_token", join_token(reusable=True, tags=("tag:a", "tag:b")))
    for i, (name, tags) in enumerate([("c", ("tag:a",)), ("a", ("tag:a", "tag:b")), ("b", ("tag:b",))]):
        d.ok("register_node", register(i, name=name, tags=tags))
    assert [n.name for n in d.state.list_nodes()] == ["a", "b", "c"]
    assert [n.name for n in d.state.list_nodes(tags=["tag:a"])] == ["a", "c"]
    assert [n.name for n in d.state.list_nodes(after_name="a", limit=1)] == ["b"]
    node = d.state.node_by_name("b")
    assert node is not None and node.to_proto().name == "b" and d.state.get_node(node.node_id) == node


def test_snapshot_bytes_are_protobufs_own_deterministic_encoding() -> None:
    """snapshot() frames cached encodings itself; the bytes must still be exactly protobuf's."""
    d = Driver()
    d.ok("initialize_mesh", init_mesh(prefixes=("100.64.0.0/10", "fd7a:115c:a1e0::/48")))
    d.ok("create_join_token", join_token(reusable=True, expires_at=T0 + 5 * HOUR))
    d.ok("create_api_token", api_token())
    for i in range(1, 4):
        d.ok("register_node", register(i), request_id=f"r{i}")
    d.ok("remove_node", state_pb2.RemoveNode(node_id="n-000000000002"))
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b""), request_id="kv")
    first = d.state.snapshot()
    assert first == state_pb2.StateSnapshot.FromString(first).SerializeToString(deterministic=True)
    d.ok("rename_node", state_pb2.RenameNode(node_id="n-000000000001", new_name="db"))
    second = d.state.snapshot()  # one cached node encoding is stale now
    assert second == state_pb2.StateSnapshot.FromString(second).SerializeToString(deterministic=True)
    assert MeshState.from_snapshot(second).get_node("n-000000000001").name == "db"  # type: ignore[union-attr]


def test_restored_state_keeps_the_request_retention_setting() -> None:
    d = Driver()
    d.ok("initialize_mesh", init_mesh(retention=60))
    d.ok("kv_put", state_pb2.KvPut(key=b"k"), request_id="r", at=T0)
    restored = Driver(MeshState.from_snapshot(d.state.snapshot()))
    for driver in (d, restored):
        driver.ok("kv_put", state_pb2.KvPut(key=b"x"), at=T0 + 61 * NS_PER_SECOND)
    assert d.state.applied_request("r") is None and restored.state.applied_request("r") is None
    assert restored.state.snapshot() == d.state.snapshot()


def test_encode_command_wraps_any_command_member_and_refuses_other_messages() -> None:
    data = encode_command(state_pb2.KvPut(key=b"k"), proposed_at=T0 + 7, request_id="r", actor="cli:local")
    cmd = state_pb2.Command.FromString(data)
    assert cmd.WhichOneof("command") == "kv_put" and cmd.request_id == "r"
    assert cmd.proposed_at.seconds * NS_PER_SECOND + cmd.proposed_at.nanos == T0 + 7
    with pytest.raises(StateError):
        encode_command(state_pb2.NodeRecord(), proposed_at=T0)
