"""Properties of the state machine over random command sequences (hypothesis).

* Determinism: two replicas applying the same entries give the same results and byte-identical snapshots.
* Snapshots: snapshot -> restore -> snapshot is the identity, and a restored replica continues identically.
* All or nothing: a rejected command leaves the state (less applied_index) byte-identical.
* Robustness: arbitrary bytes never raise (except UnsupportedCommandError for unknown command types, which
  state.proto requires) and, when rejected, change nothing.
* IPAM and uniqueness invariants hold after every step.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnelmesh.api.v1 import common_pb2, state_pb2
from tunnelmesh.coord.state import (
    _FIRST_COMMAND_FIELD,
    NS_PER_SECOND,
    MeshState,
    UnsupportedCommandError,
    _unknown_command_fields,
    ns_to_timestamp,
)

from .builders import T0, command, init_mesh, key, sha, without_index

SECOND = NS_PER_SECOND
NODE_IDS = [f"n-{i}" for i in range(6)]
TOKENS = ["jt-0", "jt-1", "jt-2"]
API_TOKENS = ["at-0", "at-1", "at-2"]
NAMES = ["a", "b", "web"]
TAGS = ["tag:a", "tag:b"]
ENDPOINTS = [
    common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address="192.168.1.2:51820"),
    common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_REFLEXIVE, address="[2001:db8::7]:4000", priority=5),
    common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address="bad"),
]

node_index = st.integers(0, len(NODE_IDS) - 1)
tags = st.lists(st.sampled_from(TAGS), max_size=2)


def _init(prefixes: tuple[str, ...], quarantine: int) -> tuple[str, state_pb2.InitializeMesh]:
    return "initialize_mesh", init_mesh(prefixes=prefixes, quarantine=quarantine, retention=900)


def _token(tid: str, reusable: bool, max_uses: int, ttl: int, tg: list[str]) -> tuple[str, object]:
    body = state_pb2.CreateJoinToken(
        token_id=tid, secret_hash=sha(tid), tags=tg, reusable=reusable, max_uses=max_uses
    )
    body.expires_at.CopyFrom(ns_to_timestamp(T0 + ttl * SECOND))  # absolute; may be already past
    return "create_join_token", body


def _register(n: int, tid: str, name: str, tg: list[str], token_variant: int) -> tuple[str, object]:
    return "register_node", state_pb2.RegisterNode(
        node_id=NODE_IDS[n], join_token_id=tid, public_key=key(n), name=name, tags=tg,
        node_token_hash=sha(f"{n}-{token_variant}"),
    )  # fmt: skip


def _seen(entries: list[tuple[int, bool, int]]) -> tuple[str, object]:
    nodes = [
        state_pb2.NodeSeen(node_id=NODE_IDS[n], online=online, last_seen=ns_to_timestamp(T0 + dt * SECOND))
        for n, online, dt in entries
    ]
    return "record_nodes_seen", state_pb2.RecordNodesSeen(nodes=nodes)


def _api(tid: str, role: int, ttl: int | None) -> tuple[str, object]:
    body = state_pb2.CreateApiToken(token_id=tid, secret_hash=sha("api" + tid), role=role)  # type: ignore[arg-type]
    if ttl is not None:
        body.expires_at.CopyFrom(ns_to_timestamp(T0 + ttl * SECOND))
    return "create_api_token", body


def _cas(k: bytes, new: bytes, expected: bytes | None) -> tuple[str, object]:
    body = state_pb2.KvCompareAndSet(key=k, new_value=new)
    if expected is not None:
        body.expected_value = expected
    return "kv_compare_and_set", body


kv_key = st.sampled_from([b"a", b"b"])
kv_value = st.sampled_from([b"", b"1", b"2"])

any_command = st.one_of(
    st.builds(
        _init,
        st.sampled_from([("10.0.0.0/29",), ("10.0.0.0/29", "fd00::/125"), ("10.0.0.0/33",)]),
        st.sampled_from([0, 60, 600]),
    ),
    st.builds(_token, st.sampled_from(TOKENS), st.booleans(), st.integers(0, 3), st.integers(-60, 7200),
              tags),
    st.builds(
        lambda t: ("revoke_join_token", state_pb2.RevokeJoinToken(token_id=t)),
        st.sampled_from([*TOKENS, "jt-x"]),
    ),
    st.builds(_register, node_index, st.sampled_from(TOKENS), st.sampled_from([*NAMES, "Bad!"]), tags,
              st.integers(0, 1)),
    st.builds(_register, node_index, st.sampled_from(TOKENS), st.sampled_from(NAMES), tags,
              st.integers(0, 1)),
    st.builds(
        lambda n, name: ("rename_node", state_pb2.RenameNode(node_id=NODE_IDS[n], new_name=name)),
        node_index, st.sampled_from([*NAMES, "web-2"]),
    ),
    st.builds(lambda n: ("remove_node", state_pb2.RemoveNode(node_id=NODE_IDS[n])), node_index),
    st.builds(
        lambda n, eps, v: ("set_node_endpoints",
                           state_pb2.SetNodeEndpoints(node_id=NODE_IDS[n], endpoints=eps, agent_version=v)),
        node_index, st.lists(st.sampled_from(ENDPOINTS), max_size=2), st.sampled_from(["", "0.1", "0.2"]),
    ),
    st.builds(_seen, st.lists(st.tuples(node_index, st.booleans(), st.integers(-100, 100)), max_size=3)),
    st.builds(_api, st.sampled_from(API_TOKENS), st.integers(0, 3),
              st.one_of(st.none(), st.integers(-10, 3600))),
    st.builds(
        lambda t: ("revoke_api_token", state_pb2.RevokeApiToken(token_id=t)), st.sampled_from(API_TOKENS)
    ),
    st.builds(lambda k, v: ("kv_put", state_pb2.KvPut(key=k, value=v)), kv_key, kv_value),
    st.builds(lambda k: ("kv_delete", state_pb2.KvDelete(key=k)), kv_key),
    st.builds(_cas, kv_key, kv_value, st.one_of(st.none(), kv_value)),
)  # fmt: skip


def _supported(data: bytes) -> bool:
    try:
        return not _unknown_command_fields(state_pb2.Command.FromString(data))
    except DecodeError:
        return True


junk = st.binary(max_size=20).filter(_supported)


@st.composite
def entries(draw: st.DrawFn) -> list[bytes]:
    """A log: mostly an InitializeMesh first, then commands with a wobbling clock and some retried ids."""
    log: list[bytes] = []
    now = T0
    if draw(st.integers(0, 9)):
        log.append(command(*_init(("10.0.0.0/29",), 600), at=now))
    for kind, body in draw(st.lists(any_command, max_size=40)):
        now += draw(st.sampled_from([0, 1, 30, 300, 700, 3600, -5])) * SECOND
        request_id = draw(st.sampled_from(["", "", "", "r1", "r2"]))
        log.append(command(kind, body, at=now, request_id=request_id))
        if draw(st.integers(0, 19)) == 0:
            log.append(draw(junk))  # junk entries are rejected and change nothing
    return log


def check_invariants(state: MeshState) -> None:
    nodes = list(state.nodes())
    assert len({n.name for n in nodes}) == len(nodes), "names are unique"
    assert len({n.public_key for n in nodes}) == len(nodes), "public keys are unique"
    addresses = Counter(ip for n in nodes for ip in n.mesh_ips)
    assert all(count == 1 for count in addresses.values()), "no address is handed out twice"
    settings_ = state.settings
    for n in nodes:
        assert settings_ is not None and len(n.mesh_ips) == len(settings_.mesh_prefixes)
        for ip, prefix in zip(n.mesh_ips, settings_.mesh_prefixes, strict=True):
            net = ipaddress.ip_network(prefix)
            address = ipaddress.ip_address(ip)
            assert address in net and address != net.network_address
            assert net.version == 6 or address != net.broadcast_address
        assert n.modified_index <= state.applied_index
        token = state.get_join_token(n.join_token_id)
        assert token is not None
    for token in state.join_tokens():
        assert token.use_limit == 0 or token.uses <= token.use_limit, "a join token is never overused"
    snap = state_pb2.StateSnapshot.FromString(state.snapshot())
    quarantined = {q.address for q in snap.quarantined_addresses}
    assert not quarantined & set(addresses), "a quarantined address is not allocated"


def lowest_free(state: MeshState, data: bytes) -> list[str] | None:
    """For a RegisterNode of a new key: the addresses it must get (the slow, obvious way), else None."""
    try:
        cmd = state_pb2.Command.FromString(data)
    except DecodeError:
        return None
    settings_ = state.settings
    if cmd.WhichOneof("command") != "register_node" or settings_ is None:
        return None
    if state.node_by_public_key(cmd.register_node.public_key) is not None:
        return None
    now = max(state.now, cmd.proposed_at.seconds * NS_PER_SECOND + cmd.proposed_at.nanos)
    snap = state_pb2.StateSnapshot.FromString(state.snapshot())
    blocked = {ip for n in state.nodes() for ip in n.mesh_ips}
    blocked |= {
        q.address
        for q in snap.quarantined_addresses
        if q.reusable_at.seconds * NS_PER_SECOND + q.reusable_at.nanos > now
    }
    expected = []
    for prefix in settings_.mesh_prefixes:
        net = ipaddress.ip_network(prefix)
        free = [str(h) for h in net.hosts() if str(h) not in blocked and h != net.network_address]
        if not free:
            return None  # exhausted: the command must fail (checked by the caller through the result)
        expected.append(free[0])
    return expected


def apply_all(state: MeshState, log: list[bytes], start: int = 0) -> list[bytes]:
    results = []
    for i, data in enumerate(log, start=start + 1):
        results.append(state.apply(i, data).SerializeToString(deterministic=True))
    return results


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log=entries(), cut=st.integers(0, 45))
def test_replicas_agree_rejections_change_nothing_and_snapshots_round_trip(
    log: list[bytes], cut: int
) -> None:
    a, b = MeshState(), MeshState()
    for i, data in enumerate(log, start=1):
        before = a.snapshot()
        expected_ips = lowest_free(a, data)
        result = a.apply(i, data)
        if result.HasField("register_node") and expected_ips is not None:
            assert list(result.register_node.node.mesh_ips) == expected_ips, "the lowest free addresses"
        assert b.apply(i, data) == result, "replicas return identical results"
        if result.HasField("error"):
            assert result.error.code != state_pb2.COMMAND_ERROR_CODE_UNSPECIFIED and result.error.message
            assert without_index(a.snapshot()) == without_index(before), (
                f"rejected entry {i} changed the state"
            )
        check_invariants(a)
    snapshot = a.snapshot()
    assert snapshot == b.snapshot(), "equal states give equal bytes"
    assert MeshState.from_snapshot(snapshot).snapshot() == snapshot, "snapshot -> restore -> snapshot"

    # A replica restored from a snapshot taken part-way continues exactly like one that applied everything.
    cut = min(cut, len(log))
    early = MeshState()
    apply_all(early, log[:cut])
    restored = MeshState.from_snapshot(early.snapshot())
    assert apply_all(restored, log[cut:], start=cut) == apply_all(early, log[cut:], start=cut)
    assert restored.snapshot() == early.snapshot() == snapshot


valid_command_bytes = st.builds(lambda kb: command(*kb, at=T0), any_command)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_command_bytes))
    for _ in range(draw(st.integers(1, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), mutated()))
def test_arbitrary_bytes_never_raise_and_rejections_change_nothing(data: bytes) -> None:
    state = MeshState()
    state.apply(1, command(*_init(("10.0.0.0/29",), 600), at=T0))
    state.apply(2, command(*_token("jt-0", True, 0, 3600, []), at=T0))
    state.apply(3, command(*_register(0, "jt-0", "a", [], 0), at=T0))
    before = state.snapshot()
    try:
        result = state.apply(4, data)
    except UnsupportedCommandError:
        parsed = state_pb2.Command.FromString(data)
        assert parsed.WhichOneof("command") is None and _unknown_command_fields(parsed)
        assert min(_unknown_command_fields(parsed)) >= _FIRST_COMMAND_FIELD
        assert state.snapshot() == before, "an unsupported command changes nothing, not even applied_index"
        return
    assert state.applied_index == 4
    if result.HasField("error"):
        assert without_index(state.snapshot()) == without_index(before)
    check_invariants(state)
