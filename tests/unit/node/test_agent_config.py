"""The node agent's pure parts: merging WatchConfig updates (docs/api.md "WatchConfig streaming semantics"),
turning a config into data-plane peer steps, the state directory and the reconnect backoff.

The agent shell around them (TUN, gRPC, failover) is tested for real in tests/integration/test_agent.py."""

from __future__ import annotations

import asyncio
import os
import random
import stat
from pathlib import Path

import pytest

from tunnelmesh.api.v1 import common_pb2, node_pb2
from tunnelmesh.identity import generate, save_private_key
from tunnelmesh.node.agent import Agent, AgentOptions, backoff_delay
from tunnelmesh.node.config_apply import OutOfSync, desired_peers, merge, plan
from tunnelmesh.node.dataplane import PeerConfig
from tunnelmesh.node.errors import DataplaneError
from tunnelmesh.node.state_dir import NodeState, StateDir, StateDirError

OWN = bytes([9]) * 32


def peer(n: int, *, ip: str | None = None, endpoint: str = "") -> node_pb2.Peer:
    p = node_pb2.Peer(
        node_id=f"n-{n}",
        name=f"node{n}",
        public_key=bytes([n]) * 32,
        mesh_ips=[ip or f"100.64.0.{n}"],
        allowed_ips=[f"{ip or f'100.64.0.{n}'}/32"],
    )
    if endpoint:
        p.endpoints.add(type=common_pb2.CANDIDATE_TYPE_HOST, address=endpoint, priority=10)
    return p


def snapshot(version: int, *peers: node_pb2.Peer) -> node_pb2.WatchConfigResponse:
    snap = node_pb2.ConfigSnapshot(version=version, peers=list(peers))
    snap.self.node_id = "n-9"
    snap.network.preshared_key = b"k" * 32
    snap.network.mtu = 1420
    snap.dns.records.add(name="node1.mesh.internal", type=node_pb2.DNS_RECORD_TYPE_A, values=["100.64.0.1"])
    return node_pb2.WatchConfigResponse(snapshot=snap)


def delta(base: int, version: int, **fields: object) -> node_pb2.WatchConfigResponse:
    return node_pb2.WatchConfigResponse(
        delta=node_pb2.ConfigDelta(base_version=base, version=version, **fields)
    )


def test_a_snapshot_replaces_everything() -> None:
    current = merge(None, snapshot(5, peer(1), peer(2)))
    new = merge(current, snapshot(9, peer(3)))
    assert new is not None and new.version == 9
    assert [p.node_id for p in new.peers] == ["n-3"]


def test_a_delta_upserts_and_removes_peers_and_leaves_the_rest() -> None:
    current = merge(None, snapshot(5, peer(1), peer(2)))
    changed = peer(2, ip="100.64.0.22")
    new = merge(current, delta(5, 7, upserted_peers=[changed, peer(3)], removed_peer_ids=["n-1"]))
    assert new is not None and new.version == 7
    by_id = {p.node_id: p for p in new.peers}
    assert sorted(by_id) == ["n-2", "n-3"]
    assert list(by_id["n-2"].mesh_ips) == ["100.64.0.22"]
    assert new.network.preshared_key == b"k" * 32  # unset message fields mean "unchanged"
    assert current is not None and len(current.peers) == 2  # the old config is not modified


def test_a_delta_replaces_set_messages_whole_and_merges_dns_records() -> None:
    current = merge(None, snapshot(5))
    net = node_pb2.NetworkSettings(mtu=1280)
    coords = node_pb2.CoordinatorList(
        coordinators=[common_pb2.CoordinatorInfo(id="c1", api_address="10.0.0.2:8443")]
    )
    rec = node_pb2.DnsRecord(
        name="node2.mesh.internal", type=node_pb2.DNS_RECORD_TYPE_A, values=["100.64.0.2"]
    )
    gone = node_pb2.DnsRecordKey(name="node1.mesh.internal", type=node_pb2.DNS_RECORD_TYPE_A)
    new = merge(
        current,
        delta(5, 6, network=net, coordinators=coords, upserted_dns_records=[rec], removed_dns_records=[gone]),
    )
    assert new is not None
    assert new.network.mtu == 1280 and new.network.preshared_key == b""  # replaced, not merged
    assert [c.api_address for c in new.coordinators] == ["10.0.0.2:8443"]
    assert [r.name for r in new.dns.records] == ["node2.mesh.internal"]


@pytest.mark.parametrize(
    ("current_version", "base", "version"),
    [(5, 4, 7), (5, 6, 7), (None, 0, 3), (5, 5, 5)],
    ids=["base-behind", "base-ahead", "no-config", "not-forward"],
)
def test_a_delta_on_the_wrong_base_is_refused(current_version: int | None, base: int, version: int) -> None:
    current = merge(None, snapshot(current_version)) if current_version is not None else None
    with pytest.raises(OutOfSync):
        merge(current, delta(base, version, removed_peer_ids=["n-1"]))


def test_heartbeats_and_unknown_updates_change_nothing() -> None:
    current = merge(None, snapshot(5))
    beat = node_pb2.WatchConfigResponse(heartbeat=node_pb2.Heartbeat(version=5))
    assert merge(current, beat) is None
    assert merge(current, node_pb2.WatchConfigResponse()) is None


def test_malformed_peers_are_skipped_with_a_reason_and_the_others_apply() -> None:
    bad_key = peer(4)
    bad_key.public_key = b"short"
    bad_ip = peer(5)
    bad_ip.allowed_ips[:] = ["not-a-prefix"]
    me = peer(9)
    dup = peer(1)
    dup.node_id = "n-dup"
    snap = merge(None, snapshot(1, peer(1), bad_key, bad_ip, me, dup, peer(2)))
    assert snap is not None
    want, rejected = desired_peers(snap, OWN)
    assert sorted(p.node_id for p in want.values()) == ["n-1", "n-2"]
    reasons = dict(rejected)
    assert "32" in reasons["n-4"] and "not-a-prefix" in reasons["n-5"]
    assert "own public key" in reasons["n-9"] and "already used" in reasons["n-dup"]


def test_allowed_ips_default_to_the_mesh_ips_and_endpoints_take_the_first_direct_candidate() -> None:
    p = peer(1)
    del p.allowed_ips[:]
    p.endpoints.add(type=common_pb2.CANDIDATE_TYPE_RELAY, address="198.18.0.2:8443")
    p.endpoints.add(type=common_pb2.CANDIDATE_TYPE_REFLEXIVE, address="bad")
    p.endpoints.add(type=common_pb2.CANDIDATE_TYPE_HOST, address="10.0.0.5:51820")
    snap = merge(None, snapshot(1, p))
    assert snap is not None
    want, _ = desired_peers(snap, OWN)
    (only,) = want.values()
    assert only.allowed_ips == ("100.64.0.1/32",)
    assert only.direct_endpoint() == ("10.0.0.5", 51820)


def test_plan_touches_only_what_changed() -> None:
    s1 = merge(None, snapshot(1, peer(1, endpoint="10.0.0.1:1"), peer(2), peer(3)))
    assert s1 is not None
    before, _ = desired_peers(s1, OWN)
    s2 = merge(
        s1,
        delta(
            1,
            2,
            upserted_peers=[peer(1, endpoint="10.0.0.1:2"), peer(2, ip="100.64.0.42"), peer(4)],
            removed_peer_ids=["n-3"],
        ),
    )
    assert s2 is not None
    after, _ = desired_peers(s2, OWN)
    steps = plan(before, after)
    assert [p.node_id for p in steps.add] == ["n-4"]
    assert steps.remove == (bytes([3]) * 32,)
    assert [p.node_id for p in steps.update] == ["n-2"]
    assert [p.node_id for p in steps.retarget] == ["n-1"]
    assert plan(after, after).empty


def test_state_dir_round_trips_and_keeps_secrets_private(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "node")
    state = NodeState(
        node_id="n-1",
        name="a",
        mesh_id="m1",
        mesh_addresses=("100.64.0.1/10",),
        mesh_domain="mesh.internal",
        coordinators=("10.0.0.2:8443",),
        node_token="tmn_n-1_" + "0" * 40,
        interface="tm7",
        listen_port=0,
    )
    d.write_state(state)
    assert d.read_state() == state
    assert "tmn_" not in repr(state)
    assert stat.S_IMODE(os.stat(d.state_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o700
    snap = merge(None, snapshot(3, peer(1)))
    assert snap is not None
    d.write_config(snap)
    assert d.read_config() == snap
    assert stat.S_IMODE(os.stat(d.config_path).st_mode) == 0o600
    assert not list(d.path.glob(".*.tmp"))


def test_state_dir_refuses_bad_files_with_the_fix(tmp_path: Path) -> None:
    d = StateDir(tmp_path)
    with pytest.raises(StateDirError, match="tunnelmesh join"):
        d.read_state()
    d.state_path.write_text("{nope")
    d.state_path.chmod(0o600)
    with pytest.raises(StateDirError, match="not valid JSON"):
        d.read_state()
    d.state_path.write_text('{"node_id": "n-1"}')
    with pytest.raises(StateDirError, match="'name'"):
        d.read_state()
    d.state_path.chmod(0o644)
    with pytest.raises(StateDirError, match="chmod 600"):
        d.read_state()
    d.config_path.write_bytes(b"\xff\xff\xff")
    d.config_path.chmod(0o600)
    with pytest.raises(StateDirError, match="not a ConfigSnapshot"):
        d.read_config()


def test_backoff_is_capped_exponential_with_equal_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(40):
        d = min(10.0, 0.25 * 2**attempt)
        for _ in range(20):
            assert d / 2 <= backoff_delay(attempt, base=0.25, cap=10.0, rng=rng) <= d


# -- the agent applying updates. Its data plane is a recorder here; tests/integration/test_agent.py
# runs the same path with a real data plane, coordinator and TUN devices.


class RecordingPlane:
    """Records the data-plane calls the agent makes, and fails the way DataPlane does for unknown peers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, dict[str, object]]] = []
        self.keys: set[bytes] = set()
        self.config = type("Cfg", (), {"mtu": 1420})()
        self.name = "tm-test"
        self.listen_port = 51820

    def add_peer(self, peer: PeerConfig) -> None:
        self.calls.append(("add", peer.public_key, {"endpoint": peer.endpoint, "psk": peer.preshared_key}))
        self.keys.add(peer.public_key)

    def update_peer(self, public_key: bytes, **changes: object) -> None:
        if public_key not in self.keys:
            raise DataplaneError("no such peer")
        self.calls.append(("update", public_key, changes))

    def remove_peer(self, public_key: bytes) -> None:
        self.keys.discard(public_key)
        self.calls.append(("remove", public_key, {}))

    def peers(self) -> list[object]:
        return []


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    d = StateDir(tmp_path / "node")
    d.ensure()
    identity = generate()
    save_private_key(identity, d.key_path)
    d.write_state(
        NodeState(
            node_id="n-9",
            name="me",
            mesh_id="m1",
            mesh_addresses=("100.64.0.9/10",),
            mesh_domain="mesh.internal",
            coordinators=("10.0.0.2:8443",),
            node_token="tmn_n-9_" + "0" * 40,
        )
    )
    d.write_ca(b"-----BEGIN CERTIFICATE-----\n")
    a = Agent(d, AgentOptions(metrics_listen="", dns=False, nat=False, relay=False))
    a.plane = RecordingPlane()  # type: ignore[assignment]
    return a


def test_agent_applies_peers_live_skips_bad_ones_counts_them_and_persists(agent: Agent) -> None:
    plane = agent.plane
    assert isinstance(plane, RecordingPlane)
    bad = peer(4)
    bad.public_key = b"short"
    asyncio.run(agent._on_update(snapshot(5, peer(1, endpoint="10.0.0.1:51820"), peer(2), bad), "c1"))
    assert sorted(k for op, k, _ in plane.calls if op == "add") == [bytes([1]) * 32, bytes([2]) * 32]
    added = {k: c for op, k, c in plane.calls if op == "add"}
    assert added[bytes([1]) * 32] == {"endpoint": ("10.0.0.1", 51820), "psk": b"k" * 32}
    assert agent.counters.rejected == {"bad_peer": 1}
    assert agent.dir.read_config() == agent.config and agent.config is not None and agent.config.version == 5

    plane.calls.clear()
    asyncio.run(agent._on_update(delta(5, 8, removed_peer_ids=["n-2"], upserted_peers=[peer(3)]), "c1"))
    assert [(op, k[0]) for op, k, _ in plane.calls] == [("remove", 2), ("add", 3)]  # peer 1 untouched
    assert agent.dir.read_config() == agent.config and agent.config.version == 8


def test_agent_refuses_an_out_of_sync_delta_and_changes_nothing(agent: Agent) -> None:
    plane = agent.plane
    assert isinstance(plane, RecordingPlane)
    asyncio.run(agent._on_update(snapshot(5, peer(1)), "c1"))
    before, calls = agent.dir.read_config(), list(plane.calls)
    with pytest.raises(OutOfSync):
        asyncio.run(agent._on_update(delta(4, 9, removed_peer_ids=["n-1"]), "c1"))
    assert plane.calls == calls and agent.dir.read_config() == before and agent.config == before


def test_a_heartbeat_advances_the_version_a_delta_builds_on(agent: Agent) -> None:
    asyncio.run(agent._on_update(snapshot(5, peer(1)), "c1"))
    beat = node_pb2.WatchConfigResponse(heartbeat=node_pb2.Heartbeat(version=7, coordinator_id="c1id"))
    asyncio.run(agent._on_update(beat, "10.0.0.2:8443"))
    assert agent.config is not None and agent.config.version == 7
    persisted = agent.dir.read_config()
    assert persisted is not None and persisted.version == 7  # a restart resumes from 7, not 5
    asyncio.run(agent._on_update(delta(7, 9, upserted_peers=[peer(2)]), "c1"))
    assert agent.config.version == 9 and len(agent.config.peers) == 2
