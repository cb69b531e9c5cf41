"""The node's config as a value: merging WatchConfig updates, and turning a config into data-plane peers.

Pure functions, no I/O (the agent in ``agent.py`` is the shell). The node always holds one full
``ConfigSnapshot``: a snapshot replaces it, a delta is merged into a copy (``merge``), so what the agent
persists in ``config.pb`` is a complete config it can start from with every coordinator down. The rules are
docs/api.md "WatchConfig streaming semantics": a delta applies only on top of its ``base_version``; set
message fields replace whole; upserts replace by key; removals delete.

``desired_peers`` validates each peer independently: a malformed peer (bad key length, bad prefix, the node's
own key) is skipped with a reason, and the others still apply. ``plan`` compares what the data plane has with
what the config wants and returns the minimal add/update/remove steps, so one peer's change never disturbs
another's session.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tunnelmesh.api.v1 import common_pb2, node_pb2
from tunnelmesh.config import split_host_port

Endpoint = tuple[str, int]

_DIRECT_TYPES = (common_pb2.CANDIDATE_TYPE_HOST, common_pb2.CANDIDATE_TYPE_REFLEXIVE)


class OutOfSync(ValueError):
    """A delta does not apply to the node's current version: reconnect with ``resume_from_version``."""


def merge(
    current: node_pb2.ConfigSnapshot | None, update: node_pb2.WatchConfigResponse
) -> node_pb2.ConfigSnapshot | None:
    """The config after ``update``, or None if the update changes nothing (heartbeat, unknown kind)."""
    kind = update.WhichOneof("update")
    if kind == "snapshot":
        out = node_pb2.ConfigSnapshot()
        out.CopyFrom(update.snapshot)
        return out
    if kind != "delta":
        return None
    if current is None:
        raise OutOfSync(
            f"delta {update.delta.base_version}->{update.delta.version} does not apply to version none"
        )
    return apply_delta(current, update.delta)


def apply_delta(snapshot: node_pb2.ConfigSnapshot, delta: node_pb2.ConfigDelta) -> node_pb2.ConfigSnapshot:
    """A new snapshot: ``snapshot`` with ``delta`` applied (docs/api.md, "WatchConfig streaming semantics"):
    messages replaced, peers and DNS records upserted and removed by key. The one implementation of the
    node-side rule: the agent uses it, and the tests check the coordinator's deltas against it."""
    if delta.base_version != snapshot.version:
        raise OutOfSync(
            f"delta {delta.base_version}->{delta.version} does not apply to version {snapshot.version}"
        )
    if delta.version <= delta.base_version:
        raise OutOfSync(f"delta goes backwards: {delta.base_version}->{delta.version}")
    out = node_pb2.ConfigSnapshot()
    out.CopyFrom(snapshot)
    out.version = delta.version
    if delta.HasField("self"):
        out.self.CopyFrom(delta.self)
    if delta.upserted_peers or delta.removed_peer_ids:
        peers = {p.node_id: p for p in out.peers}
        for p in delta.upserted_peers:
            peers[p.node_id] = p
        for node_id in delta.removed_peer_ids:
            peers.pop(node_id, None)
        kept = [node_pb2.Peer.FromString(p.SerializeToString()) for p in peers.values()]
        del out.peers[:]
        out.peers.extend(kept)
    if delta.HasField("dns_settings"):
        out.dns.settings.CopyFrom(delta.dns_settings)
    if delta.upserted_dns_records or delta.removed_dns_records:
        records = {(r.name, r.type): r for r in out.dns.records}
        for r in delta.upserted_dns_records:
            records[(r.name, r.type)] = r
        for k in delta.removed_dns_records:
            records.pop((k.name, k.type), None)
        kept_records = [node_pb2.DnsRecord.FromString(r.SerializeToString()) for r in records.values()]
        del out.dns.records[:]
        out.dns.records.extend(kept_records)
    if delta.HasField("filter"):
        out.filter.CopyFrom(delta.filter)
    if delta.HasField("network"):
        out.network.CopyFrom(delta.network)
    if delta.HasField("coordinators"):
        del out.coordinators[:]
        out.coordinators.extend(delta.coordinators.coordinators)
    return out


@dataclass(frozen=True, slots=True)
class DesiredPeer:
    """One peer as the data plane should have it (everything but the endpoint, which paths decide)."""

    node_id: str
    name: str
    public_key: bytes
    mesh_ips: tuple[str, ...]
    allowed_ips: tuple[str, ...]
    candidates: tuple[tuple[int, str, int, str], ...]  # (type, address, priority, relay coordinator id)
    persistent_keepalive: float

    def candidate_protos(self) -> list[common_pb2.Candidate]:
        return [
            common_pb2.Candidate(type=t, address=a, priority=p, relay_coordinator_id=r)  # type: ignore[arg-type]
            for t, a, p, r in self.candidates
        ]

    def direct_endpoint(self) -> Endpoint | None:
        """The first host or reflexive candidate (the list is highest priority first), if any parses."""
        for t, address, _, _ in self.candidates:
            if t in _DIRECT_TYPES:
                ep = parse_endpoint(address)
                if ep is not None:
                    return ep
        return None

    def sessions_equal(self, other: DesiredPeer) -> bool:
        """Whether the data-plane settings (not the display fields) are the same."""
        return (self.allowed_ips, self.persistent_keepalive) == (
            other.allowed_ips,
            other.persistent_keepalive,
        )


def parse_endpoint(address: str) -> Endpoint | None:
    try:
        host, port = split_host_port(address)
    except ValueError:
        return None
    if port == 0:
        return None
    return host, port


def _seconds(d: object) -> float:
    return float(getattr(d, "seconds", 0)) + float(getattr(d, "nanos", 0)) / 1e9


def desired_peers(
    snapshot: node_pb2.ConfigSnapshot, own_public_key: bytes
) -> tuple[dict[bytes, DesiredPeer], list[tuple[str, str]]]:
    """Peers by public key, and (peer id, reason) for each peer skipped as malformed."""
    out: dict[bytes, DesiredPeer] = {}
    rejected: list[tuple[str, str]] = []
    default_keepalive = _seconds(snapshot.network.default_keepalive)
    for p in snapshot.peers:
        key = bytes(p.public_key)
        if len(key) != 32:
            rejected.append((p.node_id, f"public key is {len(key)} bytes, expected 32"))
            continue
        if key == own_public_key:
            rejected.append((p.node_id, "peer has this node's own public key"))
            continue
        if key in out:
            rejected.append((p.node_id, f"public key already used by peer {out[key].node_id}"))
            continue
        allowed: list[str] = []
        bad = ""
        for net in list(p.allowed_ips) or [f"{ip}/{32 if ':' not in ip else 128}" for ip in p.mesh_ips]:
            try:
                allowed.append(str(ipaddress.ip_network(net, strict=False)))
            except ValueError:
                bad = net
                break
        if bad:
            rejected.append((p.node_id, f"bad allowed IP {bad!r}"))
            continue
        keepalive = _seconds(p.persistent_keepalive) if p.HasField("persistent_keepalive") else 0.0
        keepalive = keepalive or default_keepalive
        if not 0 <= keepalive <= 65535:
            rejected.append((p.node_id, f"persistent keepalive {keepalive} s out of range"))
            continue
        out[key] = DesiredPeer(
            node_id=p.node_id,
            name=p.name,
            public_key=key,
            mesh_ips=tuple(p.mesh_ips),
            allowed_ips=tuple(allowed),
            candidates=tuple((c.type, c.address, c.priority, c.relay_coordinator_id) for c in p.endpoints),
            persistent_keepalive=keepalive,
        )
    return out, rejected


@dataclass(frozen=True, slots=True)
class PeerPlan:
    """Steps that take the data plane from ``applied`` to ``desired``."""

    add: tuple[DesiredPeer, ...]
    update: tuple[DesiredPeer, ...]  # same key, changed allowed IPs or keepalive
    remove: tuple[bytes, ...]
    retarget: tuple[DesiredPeer, ...]  # same settings, but the candidates changed (maybe a new endpoint)

    @property
    def empty(self) -> bool:
        return not (self.add or self.update or self.remove or self.retarget)


def plan(applied: dict[bytes, DesiredPeer], desired: dict[bytes, DesiredPeer]) -> PeerPlan:
    add = tuple(p for k, p in desired.items() if k not in applied)
    remove = tuple(k for k in applied if k not in desired)
    update = tuple(p for k, p in desired.items() if k in applied and not applied[k].sessions_equal(p))
    retarget = tuple(
        p
        for k, p in desired.items()
        if k in applied and applied[k].sessions_equal(p) and applied[k].candidates != p.candidates
    )
    return PeerPlan(add, update, remove, retarget)
