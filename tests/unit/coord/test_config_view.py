"""A node's view (config_view.py): what a snapshot holds, and deltas that equal the snapshot difference."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.api.raft.v1 import raft_pb2
from tunnelmesh.api.v1 import common_pb2, node_pb2, state_pb2
from tunnelmesh.coord import config_view
from tunnelmesh.coord.config_view import (
    DeltaParts,
    NodeNotFound,
    SnapshotEncoder,
    coordinators_from_members,
    delta_for,
    normalized,
    snapshot_for,
)
from tunnelmesh.coord.state import ChangeSet, ns_to_timestamp
from tunnelmesh.node.config_apply import apply_delta

from .builders import HOUR, PSK, T0, Driver, init_mesh, join_token, key, register

DUAL = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")
COORDS = [common_pb2.CoordinatorInfo(id="00000000000000aa", name="c1", api_address="10.0.0.1:8443")]
HOST = common_pb2.CANDIDATE_TYPE_HOST
REFLEXIVE = common_pb2.CANDIDATE_TYPE_REFLEXIVE


def nid(n: int) -> str:
    return f"n-{n:012x}"


def mesh(nodes: int, prefixes: tuple[str, ...] = DUAL) -> Driver:
    d = Driver()
    d.ok("initialize_mesh", init_mesh(prefixes))
    d.ok("create_join_token", join_token(reusable=True, expires_at=T0 + 5 * HOUR, tags=("tag:ci",)))
    for i in range(nodes):
        d.ok("register_node", register(i))
    return d


def endpoints(node: int, *cands: tuple[int, str, int]) -> state_pb2.SetNodeEndpoints:
    return state_pb2.SetNodeEndpoints(
        node_id=nid(node),
        endpoints=[common_pb2.Candidate(type=t, address=a, priority=p) for t, a, p in cands],  # type: ignore[arg-type]
    )


def test_snapshot_holds_self_every_other_node_dns_for_all_settings_and_the_coordinators() -> None:
    d = mesh(3)
    d.ok(
        "set_node_endpoints",
        endpoints(1, (HOST, "192.168.1.5:51820", 10), (REFLEXIVE, "203.0.113.7:4000", 20)),
    )
    snap = snapshot_for(d.state, nid(0), COORDS)

    assert snap.version == d.state.config_version == d.index
    assert snap.self.node_id == nid(0) and snap.self.name == "host0"
    assert list(snap.self.mesh_addresses) == ["100.64.0.1/10", "fd7a:115c:a1e0::1/48"]
    assert list(snap.self.tags) == ["tag:ci"]
    assert [p.node_id for p in snap.peers] == [nid(1), nid(2)], "every other node, never itself"
    peer = snap.peers[0]
    assert peer.public_key == key(1) and peer.name == "host1"
    assert list(peer.mesh_ips) == ["100.64.0.2", "fd7a:115c:a1e0::2"]
    assert list(peer.allowed_ips) == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
    assert [e.address for e in peer.endpoints] == ["203.0.113.7:4000", "192.168.1.5:51820"], "priority first"
    assert peer.persistent_keepalive.seconds == config_view.DEFAULT_KEEPALIVE_SECONDS == 25
    records = {(r.name, r.type): list(r.values) for r in snap.dns.records}
    assert records == {
        (f"host{i}.mesh.example", t): [ip]
        for i in range(3)
        for t, ip in (
            (node_pb2.DNS_RECORD_TYPE_A, f"100.64.0.{i + 1}"),
            (node_pb2.DNS_RECORD_TYPE_AAAA, f"fd7a:115c:a1e0::{i + 1}"),
        )
    }, "one A and one AAAA per node, itself included"
    assert all(r.ttl.seconds == 5 for r in snap.dns.records)
    assert snap.dns.settings.mesh_domain == "mesh.example" and snap.dns.settings.ttl.seconds == 5
    assert list(snap.network.mesh_prefixes) == list(DUAL)
    assert snap.network.mtu == 1420 and snap.network.preshared_key == PSK
    assert snap.network.default_keepalive.seconds == 25
    assert [r.rule_id for r in snap.filter.rules] == ["default-allow-mesh"]
    assert list(snap.filter.rules[0].source_prefixes) == list(DUAL)
    assert list(snap.coordinators) == COORDS


def test_unknown_node_has_no_view() -> None:
    d = mesh(1)
    with pytest.raises(NodeNotFound, match="n-00000000000f"):
        snapshot_for(d.state, nid(15), COORDS)


def test_delta_for_a_new_node_upserts_the_peer_and_its_records_only() -> None:
    d = mesh(1, ("100.64.0.0/10",))
    v = d.state.config_version
    d.ok("register_node", register(1))
    changes = d.state.changes_since(v)
    assert changes is not None
    delta = delta_for(d.state, nid(0), changes, v, None)
    assert delta is not None
    assert (delta.base_version, delta.version) == (v, d.index)
    assert [p.node_id for p in delta.upserted_peers] == [nid(1)]
    assert [r.name for r in delta.upserted_dns_records] == ["host1.mesh.example"]
    assert not delta.HasField("self") and not delta.HasField("network") and not delta.HasField("coordinators")
    own = delta_for(d.state, nid(1), changes, v, None)
    assert own is not None and own.self.node_id == nid(1) and not own.upserted_peers, "itself, not a peer"


def test_rename_deletes_the_old_name_and_removal_deletes_peer_and_records() -> None:
    d = mesh(3, ("100.64.0.0/10",))
    v = d.state.config_version
    d.ok("rename_node", state_pb2.RenameNode(node_id=nid(1), new_name="db"))
    d.ok("remove_node", state_pb2.RemoveNode(node_id=nid(2)))
    changes = d.state.changes_since(v)
    assert changes is not None
    delta = delta_for(d.state, nid(0), changes, v, None)
    assert delta is not None
    assert list(delta.removed_peer_ids) == [nid(2)]
    assert [p.name for p in delta.upserted_peers] == ["db"]
    assert {(k.name, k.type) for k in delta.removed_dns_records} == {
        ("host1.mesh.example", node_pb2.DNS_RECORD_TYPE_A),
        ("host2.mesh.example", node_pb2.DNS_RECORD_TYPE_A),
    }
    with pytest.raises(NodeNotFound, match="removed"):
        delta_for(d.state, nid(2), changes, v, None)


def test_a_freed_name_taken_again_is_upserted_not_deleted() -> None:
    d = mesh(2, ("100.64.0.0/10",))
    v = d.state.config_version
    d.ok("rename_node", state_pb2.RenameNode(node_id=nid(0), new_name="web"))
    d.ok("rename_node", state_pb2.RenameNode(node_id=nid(1), new_name="host0"))
    changes = d.state.changes_since(v)
    assert changes is not None
    delta = delta_for(d.state, nid(0), changes, v, None)
    assert delta is not None
    assert "host0.mesh.example" not in {k.name for k in delta.removed_dns_records}
    assert "host1.mesh.example" in {k.name for k in delta.removed_dns_records}
    assert {r.name: list(r.values) for r in delta.upserted_dns_records}["host0.mesh.example"] == [
        "100.64.0.2"
    ]


def test_nothing_visible_changed_gives_none_and_coordinators_alone_give_a_delta() -> None:
    d = mesh(2)
    v = d.state.config_version
    d.ok("kv_put", state_pb2.KvPut(key=b"k"))
    changes = d.state.changes_since(v)
    assert changes is not None and changes.empty
    assert delta_for(d.state, nid(0), changes, v, None) is None
    delta = delta_for(d.state, nid(0), changes, v, COORDS, version=d.index)
    assert delta is not None and list(delta.coordinators.coordinators) == COORDS and delta.version == d.index


def test_watchers_outside_the_change_share_one_delta_object() -> None:
    d = mesh(4)
    v = d.state.config_version
    d.ok("register_node", register(9))
    changes = d.state.changes_since(v)
    assert changes is not None
    parts = DeltaParts(d.state, changes, v, None)
    assert parts.for_node(nid(0)) is parts.for_node(nid(1)) is parts.for_node(nid(2))
    assert parts.for_node(nid(9)) is not parts.for_node(nid(0))


def test_coordinators_from_members_copies_relay_fields_when_the_member_has_them() -> None:
    a = raft_pb2.Member(member_id=0xB, name="b", api_address="10.0.0.2:8443")
    b = raft_pb2.Member(member_id=0xA, name="a", api_address="10.0.0.1:8443")
    relay = {"relay_udp_address": "10.0.0.1:8443", "relay_ws_url": "ws://10.0.0.1:8080/relay"}
    for field, value in relay.items():
        if field in raft_pb2.Member.DESCRIPTOR.fields_by_name:
            setattr(b, field, value)
    infos = coordinators_from_members([a, b])
    assert [(c.id, c.name, c.api_address) for c in infos] == [
        ("000000000000000a", "a", "10.0.0.1:8443"),
        ("000000000000000b", "b", "10.0.0.2:8443"),
    ]
    for field, value in relay.items():
        if field in raft_pb2.Member.DESCRIPTOR.fields_by_name:
            assert getattr(infos[0], field) == value


def test_apply_delta_refuses_a_delta_for_another_version() -> None:
    d = mesh(1)
    snap = snapshot_for(d.state, nid(0), COORDS)
    with pytest.raises(ValueError, match="does not apply"):
        apply_delta(snap, node_pb2.ConfigDelta(base_version=snap.version + 1, version=snap.version + 2))


# -- Property: deltas equal the difference of snapshots ------------------------------------------------------

NODES = 6
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.integers(0, NODES - 1)),
        st.tuples(
            st.just("rename"), st.integers(0, NODES - 1), st.sampled_from(["a", "b", "host1", "host2"])
        ),
        st.tuples(st.just("remove"), st.integers(0, NODES - 1)),
        st.tuples(st.just("endpoints"), st.integers(0, NODES - 1), st.integers(1, 3)),
        st.tuples(st.just("seen"), st.integers(0, NODES - 1), st.booleans()),
        st.tuples(
            st.just("kv"),
        ),
        st.tuples(
            st.just("checkpoint"),
        ),
    ),
    max_size=30,
)


def _do(d: Driver, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "register":
        d.do("register_node", register(op[1]))
    elif kind == "rename":
        d.do("rename_node", state_pb2.RenameNode(node_id=nid(op[1]), new_name=op[2]))
    elif kind == "remove":
        d.do("remove_node", state_pb2.RemoveNode(node_id=nid(op[1])))
    elif kind == "endpoints":
        d.do("set_node_endpoints", endpoints(op[1], (HOST, f"192.0.2.{op[2]}:51820", op[2])))
    elif kind == "seen":
        seen = state_pb2.NodeSeen(node_id=nid(op[1]), online=op[2], last_seen=ns_to_timestamp(T0 + d.index))
        d.do("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=[seen]))
    elif kind == "kv":
        d.do("kv_put", state_pb2.KvPut(key=b"k", value=b"%d" % d.index))


@settings(max_examples=60, deadline=None)
@given(ops=OPS, prefixes=st.sampled_from([("100.64.0.0/10",), DUAL]))
def test_applying_deltas_to_an_old_snapshot_gives_the_new_snapshot(
    ops: list[tuple[Any, ...]], prefixes: tuple[str, ...]
) -> None:
    d = mesh(2, prefixes)
    held: dict[str, node_pb2.ConfigSnapshot] = {}  # a watcher per node, applying every step's delta
    checkpoints: list[tuple[int, dict[str, node_pb2.ConfigSnapshot]]] = []

    def observe() -> None:
        for node in list(d.state.nodes()):
            old = held.get(node.node_id)
            if old is None:
                held[node.node_id] = snapshot_for(d.state, node.node_id, COORDS)
                continue
            changes = d.state.changes_since(old.version)
            assert changes is not None
            delta = delta_for(d.state, node.node_id, changes, old.version, None)
            if delta is not None:
                held[node.node_id] = apply_delta(old, delta)
        for gone in set(held) - {n.node_id for n in d.state.nodes()}:
            del held[gone]

    observe()
    for op in ops:
        if op[0] == "checkpoint":
            checkpoints.append((d.state.config_version, dict(held)))
            continue
        _do(d, op)
        observe()
    for node in d.state.nodes():
        want = normalized(snapshot_for(d.state, node.node_id, COORDS))
        assert normalized(held[node.node_id]) == want, "step by step"
        for version, snaps in checkpoints:
            old = snaps.get(node.node_id)
            if old is None:
                continue
            changes = d.state.changes_since(version)
            assert changes is not None
            delta = delta_for(d.state, node.node_id, changes, version, None)
            merged = old if delta is None else apply_delta(old, delta)
            assert normalized(merged) == want, f"one merged delta from version {version}"


@pytest.mark.parametrize("prefixes", [("100.64.0.0/10",), DUAL])
def test_snapshot_encoder_gives_the_bytes_of_the_snapshot_message(prefixes: tuple[str, ...]) -> None:
    d = mesh(4, prefixes)
    d.ok("set_node_endpoints", endpoints(2, (HOST, "192.168.1.5:51820", 10)))
    # "host1-a.mesh.example" sorts before "host1.mesh.example" although "host1" < "host1-a".
    d.ok("rename_node", state_pb2.RenameNode(node_id=nid(3), new_name="host1-a"))
    encoder = SnapshotEncoder(d.state, COORDS)
    for n in range(4):
        want = snapshot_for(d.state, nid(n), COORDS, version=d.index + n)
        assert encoder.encode(nid(n), d.index + n) == want.SerializeToString(deterministic=True), nid(n)
    with pytest.raises(NodeNotFound):
        encoder.encode(nid(7), d.index)


def test_encoded_deltas_are_deterministic_serializations_shared_outside_the_change_set() -> None:
    d = mesh(5)
    v = d.state.config_version
    d.ok("register_node", register(9))
    d.ok(
        "set_node_endpoints",
        endpoints(3, (HOST, "192.168.1.5:51820", 10), (REFLEXIVE, "203.0.113.7:4000", 20)),
    )
    d.ok("rename_node", state_pb2.RenameNode(node_id=nid(2), new_name="web"))
    d.ok("remove_node", state_pb2.RemoveNode(node_id=nid(1)))
    changes = d.state.changes_since(v)
    assert changes is not None
    parts = DeltaParts(d.state, changes, v, COORDS)
    encoded = {n: parts.encoded_for(nid(n)) for n in (0, 2, 3, 4, 9)}
    for n, data in encoded.items():
        assert data is not None
        message = node_pb2.ConfigDelta.FromString(data)
        assert message.SerializeToString(deterministic=True) == data, f"field order of {nid(n)}"
        assert message.HasField("self") == (n in (2, 3, 9)), "a node in the change set sees itself"
        assert nid(n) not in [p.node_id for p in message.upserted_peers]
        assert (
            list(message.removed_peer_ids) == [nid(1)] and list(message.coordinators.coordinators) == COORDS
        )
    assert encoded[0] is encoded[4] is parts.shared, "one bytes object for every node outside the change set"
    assert encoded[0] is not None
    peers = [p.node_id for p in node_pb2.ConfigDelta.FromString(encoded[0]).upserted_peers]
    assert peers == [nid(2), nid(3), nid(9)]
    with pytest.raises(NodeNotFound):
        parts.encoded_for(nid(1))


def test_liveness_changes_no_view() -> None:
    d = mesh(3)
    v = d.state.config_version
    before = SnapshotEncoder(d.state, COORDS).encode(nid(0), v)
    seen = [
        state_pb2.NodeSeen(node_id=nid(n), online=True, last_seen=ns_to_timestamp(T0 + 7)) for n in range(3)
    ]
    d.ok("record_nodes_seen", state_pb2.RecordNodesSeen(nodes=seen))
    node = d.state.get_node(nid(1))
    assert node is not None and node.online, "the state records it (tunnelmesh nodes list)"
    assert d.state.config_version == v and d.state.changes_since(v) == ChangeSet(v, v)
    assert SnapshotEncoder(d.state, COORDS).encode(nid(0), v) == before
    assert not any(p.online for p in snapshot_for(d.state, nid(0), COORDS).peers), "online is not in the view"
