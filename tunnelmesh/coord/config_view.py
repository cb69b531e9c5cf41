"""A node's view of the mesh (``WatchConfig``): full snapshots and deltas, computed from ``MeshState``.

Pure: no I/O, no clock. ``node_api.py`` streams what this module builds.

What a node sees (until the policy issue narrows it): every other node as a ``Peer`` (its mesh IPs as /32 or
/128 allowed IPs, its reported endpoint candidates, the mesh's default keepalive), one DNS record set per node
and address family, itself included (``<name>.<mesh_domain>``, TTL 5 s), the network settings, a packet filter
with a single ``default-allow-mesh`` rule and the coordinator list (built by the servicer from the Raft member
registry; it is not part of ``MeshState``).

Deltas come from the state's change feed (``MeshState.changes_since``): a ``ChangeSet`` names the nodes that
were added or changed, the nodes removed and the DNS names freed (renames, removals). Every watcher at the
same base version needs nearly the same delta, so ``DeltaParts`` builds the shared part once and
``for_node`` only special-cases the node itself; ``ViewCache`` keeps each node's ``Peer`` and DNS records
until its record is replaced, so a thousand snapshots do not rebuild a thousand peers each. The node-side
rule (replace messages, upsert and remove by key) is ``tunnelmesh.node.config_apply.apply_delta``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from google.protobuf import duration_pb2
from google.protobuf.message import Message

from tunnelmesh.api.raft.v1 import raft_pb2
from tunnelmesh.api.v1 import common_pb2, node_pb2
from tunnelmesh.coord.raft.transport import member_label
from tunnelmesh.coord.state import ChangeSet, MeshState, Node, Settings
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.protowire import length_delimited, varint

__all__ = [
    "DEFAULT_KEEPALIVE_SECONDS",
    "DNS_TTL_SECONDS",
    "FILTER_RULE_ID",
    "DeltaParts",
    "NodeNotFound",
    "SnapshotEncoder",
    "ViewCache",
    "coordinators_from_members",
    "delta_for",
    "normalized",
    "snapshot_for",
]

DEFAULT_KEEPALIVE_SECONDS = 25  # keeps NAT bindings open (typical UDP timeouts are 30 s and more)
DNS_TTL_SECONDS = 5  # short, so renames and removals show quickly
FILTER_RULE_ID = "default-allow-mesh"

_M = TypeVar("_M", bound=Message)
_A = node_pb2.DNS_RECORD_TYPE_A
_AAAA = node_pb2.DNS_RECORD_TYPE_AAAA


class NodeNotFound(TunnelMeshError):
    """The node whose view was asked for is not (or no longer) registered."""


def _seconds(n: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=n)


def _is_v6(address: str) -> bool:
    return ":" in address


# ------------------------------------------------------------------------------------------------------------
# Pieces of a view


def network_settings(settings: Settings) -> node_pb2.NetworkSettings:
    return node_pb2.NetworkSettings(
        mesh_prefixes=settings.mesh_prefixes,
        mtu=settings.mtu,
        preshared_key=settings.preshared_key,
        default_keepalive=_seconds(DEFAULT_KEEPALIVE_SECONDS),
    )


def dns_settings(settings: Settings) -> node_pb2.DnsSettings:
    return node_pb2.DnsSettings(mesh_domain=settings.mesh_domain, ttl=_seconds(DNS_TTL_SECONDS))


def packet_filter(settings: Settings) -> node_pb2.PacketFilter:
    # Policy is a later issue: until then every mesh node may reach every other on any port.
    rule = node_pb2.FilterRule(rule_id=FILTER_RULE_ID, source_prefixes=settings.mesh_prefixes)
    return node_pb2.PacketFilter(policy_version=0, rules=[rule])


def node_self(node: Node, settings: Settings) -> node_pb2.NodeSelf:
    lengths = [p.rpartition("/")[2] for p in settings.mesh_prefixes]
    return node_pb2.NodeSelf(
        node_id=node.node_id,
        name=node.name,
        mesh_addresses=[f"{ip}/{n}" for ip, n in zip(node.mesh_ips, lengths, strict=True)],
        tags=node.tags,
        listen_port=0,
    )


def peer_of(node: Node) -> node_pb2.Peer:
    endpoints = sorted(node.endpoints, key=lambda e: -e.priority)  # stable: equal priorities keep their order
    return node_pb2.Peer(
        node_id=node.node_id,
        name=node.name,
        public_key=node.public_key,
        mesh_ips=node.mesh_ips,
        allowed_ips=[f"{ip}/128" if _is_v6(ip) else f"{ip}/32" for ip in node.mesh_ips],
        endpoints=[e.to_proto() for e in endpoints],
        tags=node.tags,
        persistent_keepalive=_seconds(DEFAULT_KEEPALIVE_SECONDS),
        # online stays unset: liveness is not config (state.py), so a value here would go stale at once.
    )


def _fqdn(name: str, domain: str) -> str:
    return f"{name}.{domain}"


def dns_records_of(node: Node, domain: str) -> list[node_pb2.DnsRecord]:
    name = _fqdn(node.name, domain)
    return [
        node_pb2.DnsRecord(
            name=name, type=_AAAA if _is_v6(ip) else _A, values=[ip], ttl=_seconds(DNS_TTL_SECONDS)
        )
        for ip in node.mesh_ips
    ]


def _record_types(settings: Settings) -> list[node_pb2.DnsRecordType.ValueType]:
    return [_AAAA if _is_v6(p) else _A for p in settings.mesh_prefixes]


def coordinators_from_members(members: Iterable[raft_pb2.Member]) -> list[common_pb2.CoordinatorInfo]:
    """CoordinatorInfo per Raft member, sorted by id. The relay fields are copied when the Member has them
    (raft.proto gains them with the relay), so this works with either version of the message."""
    out = []
    for m in members:
        info = common_pb2.CoordinatorInfo(
            id=member_label(m.member_id), name=m.name, api_address=m.api_address
        )
        for field in ("relay_udp_address", "relay_ws_url", "relay_public_key"):
            value = getattr(m, field, None)
            if value and field in common_pb2.CoordinatorInfo.DESCRIPTOR.fields_by_name:
                setattr(info, field, value)
        out.append(info)
    return sorted(out, key=lambda c: c.id)


class ViewCache:
    """Per-node ``Peer`` and DNS records, rebuilt only when the node's config-visible fields change, that is
    when its ``modified_index`` moves (liveness replaces the record object every round but moves nothing
    here). One per servicer; the mesh domain is part of the key."""

    def __init__(self) -> None:
        self._peers: dict[str, tuple[int, node_pb2.Peer]] = {}
        self._records: dict[str, tuple[int, str, list[node_pb2.DnsRecord]]] = {}
        self._peer_bytes: dict[str, tuple[int, bytes]] = {}
        self._peer_fields: dict[str, tuple[int, bytes]] = {}
        self._record_fields: dict[str, tuple[int, str, bytes]] = {}

    def peer(self, node: Node) -> node_pb2.Peer:
        hit = self._peers.get(node.node_id)
        if hit is None or hit[0] != node.modified_index:
            hit = (node.modified_index, peer_of(node))
            self._peers[node.node_id] = hit
        return hit[1]

    def peer_bytes(self, node: Node) -> bytes:
        """The node's ``Peer``, serialized (deterministic)."""
        hit = self._peer_bytes.get(node.node_id)
        if hit is None or hit[0] != node.modified_index:
            hit = (node.modified_index, self.peer(node).SerializeToString(deterministic=True))
            self._peer_bytes[node.node_id] = hit
        return hit[1]

    def peer_field(self, node: Node) -> bytes:
        """The node's ``Peer`` encoded as a ConfigSnapshot.peers element (tag, length, bytes)."""
        hit = self._peer_fields.get(node.node_id)
        if hit is None or hit[0] != node.modified_index:
            hit = (node.modified_index, length_delimited(_PEERS_FIELD, self.peer_bytes(node)))
            self._peer_fields[node.node_id] = hit
        return hit[1]

    def record_fields(self, node: Node, domain: str) -> bytes:
        """The node's DNS records, sorted by type, encoded as DnsConfig.records elements."""
        hit = self._record_fields.get(node.node_id)
        if hit is None or hit[0] != node.modified_index or hit[1] != domain:
            records = sorted(self.records(node, domain), key=lambda r: r.type)
            hit = (
                node.modified_index,
                domain,
                b"".join(length_delimited(_RECORDS_FIELD, r) for r in records),
            )
            self._record_fields[node.node_id] = hit
        return hit[2]

    def records(self, node: Node, domain: str) -> list[node_pb2.DnsRecord]:
        hit = self._records.get(node.node_id)
        if hit is None or hit[0] != node.modified_index or hit[1] != domain:
            hit = (node.modified_index, domain, dns_records_of(node, domain))
            self._records[node.node_id] = hit
        return hit[2]

    def forget(self, node_ids: Iterable[str]) -> None:
        for node_id in node_ids:
            self._peers.pop(node_id, None)
            self._peer_bytes.pop(node_id, None)
            self._records.pop(node_id, None)
            self._peer_fields.pop(node_id, None)
            self._record_fields.pop(node_id, None)


# ------------------------------------------------------------------------------------------------------------
# Snapshots


def snapshot_for(
    state: MeshState,
    node_id: str,
    coordinators: Sequence[common_pb2.CoordinatorInfo],
    *,
    version: int | None = None,
    cache: ViewCache | None = None,
) -> node_pb2.ConfigSnapshot:
    """The whole view of ``node_id`` at ``version`` (default: the state's config version). Peers sorted by
    node id, DNS records by (name, type). Raises ``NodeNotFound``."""
    node = state.get_node(node_id)
    settings = state.settings
    if node is None or settings is None:
        raise NodeNotFound(f"node {node_id!r} is not registered in this mesh")
    cache = cache or ViewCache()
    domain = settings.mesh_domain
    nodes = sorted(state.nodes(), key=lambda n: n.node_id)
    records = [r for n in nodes for r in cache.records(n, domain)]
    records.sort(key=lambda r: (r.name, r.type))
    return node_pb2.ConfigSnapshot(
        version=state.config_version if version is None else version,
        self=node_self(node, settings),
        peers=[cache.peer(n) for n in nodes if n.node_id != node_id],
        dns=node_pb2.DnsConfig(settings=dns_settings(settings), records=records),
        filter=packet_filter(settings),
        network=network_settings(settings),
        coordinators=coordinators,
    )


_PEERS_FIELD = node_pb2.ConfigSnapshot.PEERS_FIELD_NUMBER
_RECORDS_FIELD = node_pb2.DnsConfig.RECORDS_FIELD_NUMBER
_DNS_SETTINGS_FIELD = node_pb2.DnsConfig.SETTINGS_FIELD_NUMBER


class SnapshotEncoder:
    """Serialized snapshots for every node at one state: ``encode(node_id)`` gives exactly the bytes of
    ``snapshot_for(...).SerializeToString(deterministic=True)``, but everything except ``self`` is encoded
    once, and a node's peer list is the shared encoding with its own entry cut out (two slices). Building a
    thousand 1000-peer snapshots as messages costs seconds; this costs a memory copy each.
    """

    def __init__(
        self,
        state: MeshState,
        coordinators: Sequence[common_pb2.CoordinatorInfo],
        *,
        cache: ViewCache | None = None,
    ) -> None:
        settings = state.settings
        if settings is None:
            raise NodeNotFound("the mesh is not initialized: no node has a view yet")
        cache = cache or ViewCache()
        self._state = state
        self._settings = settings
        nodes = sorted(state.nodes(), key=lambda n: n.node_id)
        self._slot = {n.node_id: i for i, n in enumerate(nodes)}
        fields = [cache.peer_field(n) for n in nodes]
        self._offsets = [0]
        for f in fields:
            self._offsets.append(self._offsets[-1] + len(f))
        self._peers = b"".join(fields)
        domain = settings.mesh_domain
        # Records sorted by (name, type), as snapshot_for has them: nodes by name, each node's by type.
        by_name = sorted(nodes, key=lambda n: _fqdn(n.name, domain))
        dns = length_delimited(_DNS_SETTINGS_FIELD, dns_settings(settings)) + b"".join(
            cache.record_fields(n, domain) for n in by_name
        )
        self._tail = b"".join(
            [
                length_delimited(node_pb2.ConfigSnapshot.DNS_FIELD_NUMBER, dns),
                length_delimited(node_pb2.ConfigSnapshot.FILTER_FIELD_NUMBER, packet_filter(settings)),
                length_delimited(node_pb2.ConfigSnapshot.NETWORK_FIELD_NUMBER, network_settings(settings)),
                *(
                    length_delimited(node_pb2.ConfigSnapshot.COORDINATORS_FIELD_NUMBER, c)
                    for c in coordinators
                ),
            ]
        )

    def encode(self, node_id: str, version: int) -> bytes:
        """The serialized ConfigSnapshot of ``node_id`` at ``version``; raises ``NodeNotFound``."""
        slot = self._slot.get(node_id)
        node = self._state.get_node(node_id)
        if slot is None or node is None:
            raise NodeNotFound(f"node {node_id!r} is not registered in this mesh")
        head = varint(node_pb2.ConfigSnapshot.VERSION_FIELD_NUMBER << 3) + varint(version) if version else b""
        me = length_delimited(node_pb2.ConfigSnapshot.SELF_FIELD_NUMBER, node_self(node, self._settings))
        peers = self._peers
        return b"".join(
            (head, me, peers[: self._offsets[slot]], peers[self._offsets[slot + 1] :], self._tail)
        )


# ------------------------------------------------------------------------------------------------------------
# Deltas


_DELTA = node_pb2.ConfigDelta
_UPSERTED_PEERS_FIELD = _DELTA.UPSERTED_PEERS_FIELD_NUMBER


def _uint_field(number: int, value: int) -> bytes:
    """A varint field; proto3 leaves a zero out."""
    return varint(number << 3) + varint(value) if value else b""


class DeltaParts:
    """The delta of one ``ChangeSet`` for every node: built once, specialized per node.

    ``encoded_for`` gives the serialized ``ConfigDelta`` (what the servicer sends): every node outside the
    change set gets the same bytes object, and a node inside it (it sees itself in ``self``, not among the
    peers) gets the shared peer encoding with its own entry cut out, as ``SnapshotEncoder`` does. So a delta
    that upserts k peers costs k peer encodings once, not once per watcher (k watchers inside the change set
    would otherwise make it k * k). ``for_node`` parses the same bytes into a message, memoized for the
    shared case; callers must treat that message as read-only.
    """

    def __init__(
        self,
        state: MeshState,
        changeset: ChangeSet,
        base_version: int,
        coordinators: Sequence[common_pb2.CoordinatorInfo] | None,
        *,
        version: int | None = None,
        cache: ViewCache | None = None,
    ) -> None:
        settings = state.settings
        if settings is None:
            raise NodeNotFound("the mesh is not initialized: no node has a view yet")
        self._state = state
        self._settings = settings
        self.base_version = base_version
        self.version = changeset.version if version is None else version
        self._changeset = changeset
        cache = cache or ViewCache()
        domain = settings.mesh_domain
        upserted = changeset.upserted_node_ids
        if changeset.settings_changed:  # every peer and record may look different now
            upserted = frozenset(n.node_id for n in state.nodes())
        slots: dict[str, tuple[int, int]] = {}
        peers: list[bytes] = []
        records: list[bytes] = []
        offset = 0
        for node_id in sorted(upserted):
            node = state.get_node(node_id)
            if node is None:  # removed again since (the feed merge normally drops these)
                continue
            field = length_delimited(_UPSERTED_PEERS_FIELD, cache.peer_bytes(node))
            slots[node_id] = (offset, offset + len(field))
            offset += len(field)
            peers.append(field)
            records += (
                length_delimited(_DELTA.UPSERTED_DNS_RECORDS_FIELD_NUMBER, r)
                for r in cache.records(node, domain)
            )
        # A freed name is deleted unless some node holds it now (then its record is among the upserts).
        types = _record_types(settings)
        removed_records = [
            node_pb2.DnsRecordKey(name=_fqdn(name, domain), type=t)
            for name in sorted(changeset.removed_names)
            if state.node_by_name(name) is None
            for t in types
        ]
        removed_ids = sorted(changeset.removed_node_ids)
        self._slots = slots
        self._peers = b"".join(peers)
        self._head = _uint_field(_DELTA.BASE_VERSION_FIELD_NUMBER, base_version) + _uint_field(
            _DELTA.VERSION_FIELD_NUMBER, self.version
        )
        # Fields after upserted_peers, in field-number order (as a deterministic serialization has them).
        tail = [length_delimited(_DELTA.REMOVED_PEER_IDS_FIELD_NUMBER, n.encode()) for n in removed_ids]
        if changeset.settings_changed:
            tail.append(length_delimited(_DELTA.DNS_SETTINGS_FIELD_NUMBER, dns_settings(settings)))
        tail += records
        tail += (length_delimited(_DELTA.REMOVED_DNS_RECORDS_FIELD_NUMBER, k) for k in removed_records)
        if changeset.settings_changed:
            tail.append(length_delimited(_DELTA.FILTER_FIELD_NUMBER, packet_filter(settings)))
            tail.append(length_delimited(_DELTA.NETWORK_FIELD_NUMBER, network_settings(settings)))
        if coordinators is not None:
            listed = node_pb2.CoordinatorList(coordinators=coordinators)
            tail.append(length_delimited(_DELTA.COORDINATORS_FIELD_NUMBER, listed))
        self._tail = b"".join(tail)
        # Something every node sees changed (the nodes inside the change set always get a delta).
        self._changed = bool(self._peers or self._tail or changeset.settings_changed)
        self._generic: bytes | None = self._head + self._peers + self._tail if self._changed else None
        self._generic_message: node_pb2.ConfigDelta | None = None

    @property
    def shared(self) -> bytes | None:
        """The bytes ``encoded_for`` gives every node outside the change set (None: nothing they see
        changed)."""
        return self._generic

    def _check(self, node_id: str) -> None:
        if node_id in self._changeset.removed_node_ids or self._state.get_node(node_id) is None:
            raise NodeNotFound(f"node {node_id!r} was removed from the mesh")

    def encoded_for(self, node_id: str) -> bytes | None:
        """The serialized delta for ``node_id``, or None if nothing it sees changed. Raises ``NodeNotFound``
        if the node was removed (its stream ends). The same bytes object for every node outside the change
        set."""
        self._check(node_id)
        slot = self._slots.get(node_id)
        if slot is None:
            return self._generic
        node = self._state.get_node(node_id)
        assert node is not None
        me = length_delimited(_DELTA.SELF_FIELD_NUMBER, node_self(node, self._settings))
        peers = self._peers
        return b"".join((self._head, me, peers[: slot[0]], peers[slot[1] :], self._tail))

    def for_node(self, node_id: str) -> node_pb2.ConfigDelta | None:
        """``encoded_for`` as a message; the same object for every node outside the change set."""
        data = self.encoded_for(node_id)
        if data is None:
            return None
        if data is self._generic:
            if self._generic_message is None:
                self._generic_message = node_pb2.ConfigDelta.FromString(data)
            return self._generic_message
        return node_pb2.ConfigDelta.FromString(data)


def delta_for(
    state: MeshState,
    node_id: str,
    changeset: ChangeSet,
    base_version: int,
    coordinators: Sequence[common_pb2.CoordinatorInfo] | None,
    *,
    version: int | None = None,
) -> node_pb2.ConfigDelta | None:
    """The delta that takes ``node_id``'s view from ``base_version`` to ``changeset.version`` (or
    ``version``); ``coordinators`` None means the coordinator list did not change. None: nothing this node
    sees changed. Raises ``NodeNotFound`` if the node was removed."""
    return DeltaParts(state, changeset, base_version, coordinators, version=version).for_node(node_id)


# ------------------------------------------------------------------------------------------------------------
# The node-side rule


def _copies(messages: Iterable[_M]) -> list[_M]:
    out = []
    for m in messages:
        copy = type(m)()
        copy.CopyFrom(m)
        out.append(copy)
    return out


def normalized(snapshot: node_pb2.ConfigSnapshot) -> node_pb2.ConfigSnapshot:
    """``snapshot`` with peers sorted by node id and DNS records by (name, type), for comparisons."""
    out = node_pb2.ConfigSnapshot()
    out.CopyFrom(snapshot)
    peers = _copies(sorted(out.peers, key=lambda p: p.node_id))
    records = _copies(sorted(out.dns.records, key=lambda r: (r.name, r.type)))
    del out.peers[:]
    out.peers.extend(peers)
    del out.dns.records[:]
    out.dns.records.extend(records)
    return out
