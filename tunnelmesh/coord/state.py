"""The replicated mesh state machine: commands in, state out; snapshot/restore.

Theory of operation
===================

Every coordinator holds one ``MeshState``. The Raft driver feeds it the committed log in order: ``apply(index,
data)`` for each normal entry, where ``data`` is a serialized ``tunnelmesh.v1.Command``
(``proto/tunnelmesh/v1/state.proto``), and ``restore(snapshot)`` when it installs a snapshot. Because every
replica applies the same entries in the same order, and applying depends only on the state and the entry, all
replicas hold the same state at the same index. So applying is pure: no clock (a command carries
``proposed_at``, the proposer's clock; the state's "now" is the latest one applied), no randomness (ids and
secret hashes come in the command), no I/O, and no iteration over anything whose order could differ between
processes.

Three rules hold for every command:

1. **Never raise on a bad command.** Unparseable bytes, a missing command, failed validation, a missing or
   duplicate object, a broken precondition: each produces a ``CommandResult`` whose ``error`` says what and
   why, with the ``CommandErrorCode`` the proposer maps to a gRPC status. Exceptions are for programming
   errors only (``StateError``), and for one deliberate stop: a command *type* this coordinator does not know
   (``UnsupportedCommandError``). state.proto requires a replica to stop applying rather than skip it, since
   newer replicas do apply it and skipping would silently diverge.
2. **All or nothing.** A handler first validates everything (raising the internal ``_Rejected``), then
   mutates. Nothing is mutated before the last check, so a rejected command changes nothing but
   ``applied_index``.
3. **At most once per request id.** A successful result is recorded under ``Command.request_id``; a retry
   finds it and gets the same result back without applying again. Rejections are not recorded: they changed
   nothing, so re-evaluating a retry cannot apply anything twice, and a transient rejection ("no free
   address") must not stick to the id for an hour. Entries are pruned ``request_retention_seconds`` after they
   were applied (by ``proposed_at``), and beyond ``MAX_APPLIED_REQUESTS`` (bounded memory under sustained
   write load).

Dispatch is a table (``_HANDLERS``) from the ``Command.command`` oneof member to a handler; a test checks that
the table covers the oneof exactly. State lives in plain dicts of frozen records (``Node``, ``JoinToken``,
``ApiToken``, ``KvEntry``), converted to protobuf only at the edges (results, snapshots, the services' reads).
Records are replaced, never mutated, so a service may keep a record it read without it changing underneath.
Address allocation lives in ``tunnelmesh.coord.ipam``.

Config versions (for WatchConfig): a node's config version is the Raft index of the last applied entry that
changed what nodes see (``Peer``/``NodeSelf`` fields, the set of nodes, the mesh settings).
``Node.modified_index`` is the last index that changed one of the node's config-visible fields; display-only
updates (``last_seen``, ``online``, host name, agent version, node token) do not move it, so the liveness
batches (every 30 s per coordinator) never make every watcher resend the peers they name. Each config-visible
change is recorded in a bounded feed; ``changes_since(v)`` merges the feed after ``v`` into one ``ChangeSet``
(a bisect plus the changes, memoized per ``v`` so a thousand watchers at the same version cost one merge), or
returns None when ``v`` is older than the feed (send a full snapshot). The config version itself is part of
the snapshot (``StateSnapshot.config_version``), so a restored state keeps it exactly, even when the last
config change before the snapshot was a removal.

Time: a command's "now" is ``max(state.now, proposed_at)`` and only a successful command advances
``state.now``; token expiry, quarantine and request retention are all measured against it.

Snapshots are ``StateSnapshot`` messages with every list sorted by key, so equal states give equal bytes; the
encoding of each unchanged record is cached between snapshots (the bytes are still exactly protobuf's).
"""

from __future__ import annotations

import bisect
import datetime
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import timestamp_pb2, unknown_fields
from google.protobuf.message import DecodeError, Message

from tunnelmesh.api.v1 import common_pb2, state_pb2
from tunnelmesh.coord.ipam import AddressPool, IpamError, canonical_address_version, parse_prefix
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.protowire import length_delimited, varint

__all__ = [
    "FORMAT_VERSION",
    "NS_PER_SECOND",
    "ApiToken",
    "ChangeSet",
    "ConfigChange",
    "Endpoint",
    "JoinToken",
    "KvEntry",
    "MeshState",
    "Node",
    "Settings",
    "SnapshotError",
    "StateError",
    "UnsupportedCommandError",
    "candidate_error",
    "encode_command",
    "format_time",
    "is_label",
    "ns_to_timestamp",
    "timestamp_to_ns",
]

# StateSnapshot.format_version this code writes and reads.
FORMAT_VERSION = 1

NS_PER_SECOND = 1_000_000_000
DEFAULT_MTU = 1420
MIN_MTU = 576  # the IPv4 minimum; a mesh with an IPv6 prefix needs 1280
MIN_MTU_IPV6 = 1280
MAX_MTU = 65535
DEFAULT_REQUEST_RETENTION_SECONDS = 3600
# Bounds the de-duplication table under sustained load (2k writes/s would keep 7M ids for an hour).
MAX_APPLIED_REQUESTS = 100_000
# Config-visible changes kept for WatchConfig deltas; an older resume version gets a full snapshot.
CHANGE_FEED_CAPACITY = 4096
MAX_JOIN_TOKEN_TTL_SECONDS = 365 * 24 * 3600

MAX_ID_LENGTH = 64
MAX_REQUEST_ID_LENGTH = 128
MAX_ACTOR_LENGTH = 256
MAX_TEXT_LENGTH = 256  # host name, agent version, platform
MAX_DESCRIPTION_LENGTH = 1024
MAX_TAGS = 64
MAX_ENDPOINTS = 64
MAX_KV_KEY = 256
MAX_KV_VALUE = 64 * 1024
KEY_LENGTH = 32  # X25519 public keys, SHA-256 hashes, the mesh PSK

# Timestamp range that RFC 3339 can express (0001-01-01 .. 9999-12-31), as protobuf's Timestamp requires.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799

_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._/@-]{0,127}")
_ROLES = frozenset({common_pb2.ROLE_READ_ONLY, common_pb2.ROLE_OPERATOR, common_pb2.ROLE_ADMIN})
_CANDIDATE_TYPES = frozenset(
    {common_pb2.CANDIDATE_TYPE_HOST, common_pb2.CANDIDATE_TYPE_REFLEXIVE, common_pb2.CANDIDATE_TYPE_RELAY}
)
# Command fields below this number are envelope fields (request_id, proposed_at, actor); at and above it the
# `command` oneof's ranges start. An unknown field there is a command type from a newer coordinator.
_FIRST_COMMAND_FIELD = 10
_KNOWN_COMMAND_FIELDS = frozenset(f.number for f in state_pb2.Command.DESCRIPTOR.fields)

_NOT_FOUND = state_pb2.COMMAND_ERROR_CODE_NOT_FOUND
_ALREADY_EXISTS = state_pb2.COMMAND_ERROR_CODE_ALREADY_EXISTS
_FAILED_PRECONDITION = state_pb2.COMMAND_ERROR_CODE_FAILED_PRECONDITION
_INVALID_ARGUMENT = state_pb2.COMMAND_ERROR_CODE_INVALID_ARGUMENT
_RESOURCE_EXHAUSTED = state_pb2.COMMAND_ERROR_CODE_RESOURCE_EXHAUSTED
_UNAUTHENTICATED = state_pb2.COMMAND_ERROR_CODE_UNAUTHENTICATED
_PERMISSION_DENIED = state_pb2.COMMAND_ERROR_CODE_PERMISSION_DENIED


# ------------------------------------------------------------------------------------------------------------
# Errors


class StateError(TunnelMeshError):
    """Misuse of the state machine by its caller (a programming error), never a rejected command."""


class UnsupportedCommandError(StateError):
    """A log entry holds a command type this coordinator does not know: stop applying and upgrade it."""


class SnapshotError(StateError):
    """A snapshot cannot be restored (corrupt, inconsistent, or of an unsupported format version)."""


class _Rejected(Exception):  # internal control flow, never escapes apply()
    """Raised by a handler's validation phase; apply() turns it into a CommandResult.error."""

    def __init__(self, code: state_pb2.CommandErrorCode.ValueType, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------------------------------------------------
# Time: integer nanoseconds since the epoch inside, Timestamp at the edges.


def timestamp_to_ns(ts: timestamp_pb2.Timestamp) -> int:
    """Nanoseconds since the Unix epoch."""
    return ts.seconds * NS_PER_SECOND + ts.nanos


def ns_to_timestamp(ns: int) -> timestamp_pb2.Timestamp:
    """The Timestamp for ``ns`` nanoseconds since the Unix epoch."""
    seconds, nanos = divmod(ns, NS_PER_SECOND)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def format_time(ns: int) -> str:
    """RFC 3339 in UTC, for messages ("2026-01-01T00:00:00Z")."""
    seconds, nanos = divmod(ns, NS_PER_SECOND)
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=seconds)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{nanos:09d}".rstrip("0").rstrip(".") + "Z"


def _checked_ns(ts: timestamp_pb2.Timestamp, what: str) -> int:
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos < NS_PER_SECOND):
        raise _Rejected(_INVALID_ARGUMENT, f"{what} is not a valid timestamp ({ts.seconds}s {ts.nanos}ns)")
    return timestamp_to_ns(ts)


def _opt_ts(ns: int | None) -> timestamp_pb2.Timestamp | None:
    return None if ns is None else ns_to_timestamp(ns)


# ------------------------------------------------------------------------------------------------------------
# Records. Frozen: a change replaces the record.


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A node's endpoint candidate (``common.Candidate``)."""

    type: int
    address: str
    priority: int = 0
    relay_coordinator_id: str = ""

    def to_proto(self) -> common_pb2.Candidate:
        return common_pb2.Candidate(
            type=self.type,  # type: ignore[arg-type]
            address=self.address,
            priority=self.priority,
            relay_coordinator_id=self.relay_coordinator_id,
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Mesh-wide settings (``MeshSettings``), with defaults filled in."""

    mesh_id: str
    mesh_domain: str
    mesh_prefixes: tuple[str, ...]
    preshared_key: bytes
    mtu: int
    address_quarantine_seconds: int
    request_retention_seconds: int

    def to_proto(self) -> state_pb2.MeshSettings:
        return state_pb2.MeshSettings(
            mesh_id=self.mesh_id,
            mesh_domain=self.mesh_domain,
            mesh_prefixes=self.mesh_prefixes,
            preshared_key=self.preshared_key,
            mtu=self.mtu,
            address_quarantine_seconds=self.address_quarantine_seconds,
            request_retention_seconds=self.request_retention_seconds,
        )


@dataclass(frozen=True, slots=True)
class Node:
    """A registered node (``NodeRecord``). Times are ns since the epoch; ``last_seen`` None: never."""

    node_id: str
    name: str
    hostname: str
    public_key: bytes
    mesh_ips: tuple[str, ...]
    tags: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]
    node_token_hash: bytes
    agent_version: str
    platform: str
    join_token_id: str
    created_at: int
    last_seen: int | None
    online: bool
    modified_index: int

    def to_proto(self) -> state_pb2.NodeRecord:
        return state_pb2.NodeRecord(
            node_id=self.node_id,
            name=self.name,
            hostname=self.hostname,
            public_key=self.public_key,
            mesh_ips=self.mesh_ips,
            tags=self.tags,
            endpoints=[e.to_proto() for e in self.endpoints],
            node_token_hash=self.node_token_hash,
            agent_version=self.agent_version,
            platform=self.platform,
            join_token_id=self.join_token_id,
            created_at=ns_to_timestamp(self.created_at),
            last_seen=_opt_ts(self.last_seen),
            online=self.online,
            modified_index=self.modified_index,
        )

    @classmethod
    def from_proto(cls, r: state_pb2.NodeRecord) -> Node:
        return cls(
            node_id=r.node_id,
            name=r.name,
            hostname=r.hostname,
            public_key=r.public_key,
            mesh_ips=tuple(r.mesh_ips),
            tags=tuple(r.tags),
            endpoints=tuple(_endpoint_of(c) for c in r.endpoints),
            node_token_hash=r.node_token_hash,
            agent_version=r.agent_version,
            platform=r.platform,
            join_token_id=r.join_token_id,
            created_at=timestamp_to_ns(r.created_at),
            last_seen=timestamp_to_ns(r.last_seen) if r.HasField("last_seen") else None,
            online=r.online,
            modified_index=r.modified_index,
        )


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A join token (``JoinTokenRecord``) without its secret."""

    token_id: str
    secret_hash: bytes
    description: str
    tags: tuple[str, ...]
    expires_at: int
    reusable: bool
    max_uses: int
    uses: int
    created_at: int
    created_by: str
    revoked_at: int | None

    def rejection(self, now: int) -> str | None:
        """Why the token cannot register a node at ``now`` (None: it can). Also for the services' checks."""
        if self.revoked_at is not None:
            return f"join token {self.token_id} was revoked at {format_time(self.revoked_at)}"
        if self.expires_at <= now:
            return f"join token {self.token_id} expired at {format_time(self.expires_at)}"
        if self.used_up:
            return f"join token {self.token_id} is used up ({self.uses} of {self.use_limit} uses)"
        return None

    @property
    def use_limit(self) -> int:
        """Maximum number of registrations; 0 means unlimited."""
        return self.max_uses if self.reusable else 1

    @property
    def used_up(self) -> bool:
        return self.use_limit != 0 and self.uses >= self.use_limit

    def to_proto(self) -> state_pb2.JoinTokenRecord:
        return state_pb2.JoinTokenRecord(
            token_id=self.token_id,
            secret_hash=self.secret_hash,
            description=self.description,
            tags=self.tags,
            expires_at=ns_to_timestamp(self.expires_at),
            reusable=self.reusable,
            max_uses=self.max_uses,
            uses=self.uses,
            created_at=ns_to_timestamp(self.created_at),
            created_by=self.created_by,
            revoked_at=_opt_ts(self.revoked_at),
        )

    @classmethod
    def from_proto(cls, r: state_pb2.JoinTokenRecord) -> JoinToken:
        return cls(
            token_id=r.token_id,
            secret_hash=r.secret_hash,
            description=r.description,
            tags=tuple(r.tags),
            expires_at=timestamp_to_ns(r.expires_at),
            reusable=r.reusable,
            max_uses=r.max_uses,
            uses=r.uses,
            created_at=timestamp_to_ns(r.created_at),
            created_by=r.created_by,
            revoked_at=timestamp_to_ns(r.revoked_at) if r.HasField("revoked_at") else None,
        )


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API token (``ApiTokenRecord``) without its secret. ``expires_at`` None: never."""

    token_id: str
    secret_hash: bytes
    description: str
    role: int
    expires_at: int | None
    created_at: int
    created_by: str
    revoked_at: int | None

    def is_active(self, now: int) -> bool:
        """Whether the token is accepted at ``now`` (not revoked, not expired)."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def to_proto(self) -> state_pb2.ApiTokenRecord:
        return state_pb2.ApiTokenRecord(
            token_id=self.token_id,
            secret_hash=self.secret_hash,
            description=self.description,
            role=self.role,  # type: ignore[arg-type]
            expires_at=_opt_ts(self.expires_at),
            created_at=ns_to_timestamp(self.created_at),
            created_by=self.created_by,
            revoked_at=_opt_ts(self.revoked_at),
        )

    @classmethod
    def from_proto(cls, r: state_pb2.ApiTokenRecord) -> ApiToken:
        return cls(
            token_id=r.token_id,
            secret_hash=r.secret_hash,
            description=r.description,
            role=r.role,
            expires_at=timestamp_to_ns(r.expires_at) if r.HasField("expires_at") else None,
            created_at=timestamp_to_ns(r.created_at),
            created_by=r.created_by,
            revoked_at=timestamp_to_ns(r.revoked_at) if r.HasField("revoked_at") else None,
        )


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One key of the test register map; ``revision`` is the Raft index of its last change."""

    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """The config-visible effect of one applied entry, as kept in the change feed."""

    index: int
    upserted: frozenset[str] = frozenset()  # node ids added or changed
    removed: frozenset[str] = frozenset()  # node ids removed
    settings: bool = False  # mesh settings changed
    freed_names: frozenset[str] = frozenset()  # node names given up (rename, removal): DNS records to delete


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """What changed in the nodes' view between ``base_version`` (exclusive) and ``version`` (inclusive)."""

    base_version: int
    version: int
    upserted_node_ids: frozenset[str] = frozenset()
    removed_node_ids: frozenset[str] = frozenset()
    settings_changed: bool = False
    # Node names given up in the range; some may be held again by now (by a node in upserted_node_ids).
    removed_names: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.upserted_node_ids or self.removed_node_ids or self.settings_changed)


class _Ctx:
    """What a handler knows about the command being applied, and the config-visible changes it made."""

    __slots__ = ("actor", "freed_names", "index", "now", "removed", "settings_changed", "upserted")

    def __init__(self, index: int, now: int, actor: str) -> None:
        self.index = index
        self.now = now
        self.actor = actor
        self.upserted: set[str] = set()
        self.removed: set[str] = set()
        self.freed_names: set[str] = set()
        self.settings_changed = False


class _Applied:
    """An entry of the de-duplication table; ``encoded`` caches its snapshot form (entries never change)."""

    __slots__ = ("applied_at", "encoded", "index", "result")

    def __init__(self, index: int, applied_at: int, result: state_pb2.CommandResult) -> None:
        self.index = index
        self.applied_at = applied_at
        self.result = result
        self.encoded: bytes | None = None


# ------------------------------------------------------------------------------------------------------------
# Validation helpers: raise _Rejected with a message naming the field.


def _check_id(value: str, what: str) -> None:
    if not value or len(value) > MAX_ID_LENGTH or not _ID_RE.fullmatch(value):
        raise _Rejected(
            _INVALID_ARGUMENT,
            f"{what} {value!r} is not a valid id "
            f"(1-{MAX_ID_LENGTH} lowercase letters, digits, '.', '_', '-')",
        )


def _check_label(value: str, what: str) -> None:
    if not _LABEL_RE.fullmatch(value):
        raise _Rejected(
            _INVALID_ARGUMENT,
            f"{what} {value!r} is not a DNS label "
            "(1-63 lowercase letters, digits and '-', not at either end)",
        )


def _check_text(value: str, what: str, limit: int = MAX_TEXT_LENGTH) -> None:
    if len(value) > limit:
        raise _Rejected(_INVALID_ARGUMENT, f"{what} is {len(value)} characters long; the limit is {limit}")


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != KEY_LENGTH:
        raise _Rejected(_INVALID_ARGUMENT, f"{what} must be {KEY_LENGTH} bytes, got {len(value)}")


def _checked_tags(tags: Iterable[str], what: str) -> tuple[str, ...]:
    result = tuple(sorted(set(tags)))
    if len(result) > MAX_TAGS:
        raise _Rejected(_INVALID_ARGUMENT, f"{what}: {len(result)} tags; the limit is {MAX_TAGS}")
    for tag in result:
        if not _TAG_RE.fullmatch(tag):
            raise _Rejected(_INVALID_ARGUMENT, f"{what}: {tag!r} is not a valid tag (e.g. 'tag:ci')")
    return result


def _endpoint_of(c: common_pb2.Candidate) -> Endpoint:
    return Endpoint(int(c.type), c.address, c.priority, c.relay_coordinator_id)


def _check_socket_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    ok = (
        bool(sep) and port.isascii() and port.isdigit() and port == str(int(port)) and 1 <= int(port) <= 65535
    )
    if ok:
        bracketed = host.startswith("[") and host.endswith("]")
        version = canonical_address_version(host[1:-1] if bracketed else host)
        ok = version is not None and bracketed == (version == 6)
    if not ok:
        raise _Rejected(
            _INVALID_ARGUMENT,
            f"endpoint {address!r} is not 'ip:port' (canonical IP, IPv6 in brackets, port 1-65535)",
        )


def is_label(value: str) -> bool:
    """Whether ``value`` is a valid node name (a lowercase DNS label), for the services' checks."""
    return _LABEL_RE.fullmatch(value) is not None


def candidate_error(candidate: common_pb2.Candidate) -> str | None:
    """Why SetNodeEndpoints would reject ``candidate`` (None: it is fine), for the services' checks."""
    if candidate.type not in _CANDIDATE_TYPES:
        return f"endpoint {candidate.address!r} has no known candidate type"
    try:
        _check_socket_address(candidate.address)
        _check_text(candidate.relay_coordinator_id, "relay_coordinator_id", MAX_ID_LENGTH)
    except _Rejected as rejected:
        return rejected.message
    return None


def _suffixed(base: str, n: int) -> str:
    """``base`` with "-n" appended, shortening base so the label stays within 63 characters."""
    suffix = f"-{n}"
    return base[: 63 - len(suffix)].rstrip("-") + suffix


# ------------------------------------------------------------------------------------------------------------
# The state machine


Handler = Callable[["MeshState", Any, _Ctx], "state_pb2.CommandResult | None"]


class MeshState:
    """The replicated mesh state. See the module docstring for the rules; the public methods are:

    * Raft driver: ``apply``, ``snapshot``, ``restore`` / ``from_snapshot``, ``applied_index``; proposers
      build entries with ``encode_command``.
    * Config streaming: ``config_version``, ``changes_since``.
    * Services (reads): ``settings``, ``now``, ``get_node``, ``node_by_public_key``, ``node_by_name``,
      ``list_nodes``, ``nodes``, ``node_count``, ``get_join_token``, ``join_token_by_secret_hash``,
      ``join_tokens``, ``get_api_token``, ``api_token_by_secret_hash``, ``api_tokens``, ``kv_get``,
      ``kv_items``, ``applied_request``.

    Reads return frozen records (``Node``, ``JoinToken``, ...; ``to_proto()`` converts). Not thread-safe:
    call it from the one task that applies entries, or under its lock.
    """

    def __init__(self) -> None:
        self._applied_index = 0
        self._now = 0
        self._settings: Settings | None = None
        self._pools: list[AddressPool] = []
        self._nodes: dict[str, Node] = {}
        self._node_by_key: dict[bytes, str] = {}
        self._node_by_name: dict[str, str] = {}
        self._names_sorted: list[str] | None = None  # cache for list_nodes
        self._join_tokens: dict[str, JoinToken] = {}
        self._join_by_hash: dict[bytes, str] = {}
        self._api_tokens: dict[str, ApiToken] = {}
        self._api_by_hash: dict[bytes, str] = {}
        self._kv: dict[bytes, KvEntry] = {}
        # request_id -> _Applied, in apply order (so applied_at is non-decreasing and pruning pops the front).
        # An OrderedDict: finding the oldest entry of a plain dict after many deletions at its front is O(n).
        self._requests: OrderedDict[str, _Applied] = OrderedDict()
        self._retention_ns = DEFAULT_REQUEST_RETENTION_SECONDS * NS_PER_SECOND
        # Snapshot encodings of unchanged records, keyed by id, valid while the record object is the same.
        self._encoded: dict[str, dict[Any, tuple[object, bytes]]] = {}
        self._changes_cache: dict[int, ChangeSet] = {}  # changes_since memo for the current config_version
        self._config_version = 0
        self._feed: list[ConfigChange] = []
        self._feed_index: list[int] = []  # _feed[i].index, for bisect
        # Versions >= _feed_horizon can be answered from the feed.
        self._feed_horizon = 0

    # -- Raft driver -----------------------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        """Raft index of the last entry applied (including rejected commands)."""
        return self._applied_index

    def apply(self, index: int, data: bytes) -> state_pb2.CommandResult:
        """Applies the committed normal entry ``index``; returns the result for the proposer.

        Empty ``data`` (Raft's no-op entry of a new leader) only advances ``applied_index``. Raises only
        ``StateError``: for an ``index`` that does not follow ``applied_index`` (a driver bug), and
        ``UnsupportedCommandError`` for a command type this coordinator does not know (``applied_index`` is
        not advanced; the driver must stop applying until the coordinator is upgraded).
        """
        if index <= self._applied_index:
            raise StateError(
                f"apply({index}) after applied index {self._applied_index}: entries must increase"
            )
        if not data:
            self._applied_index = index
            return state_pb2.CommandResult()
        try:
            cmd = state_pb2.Command.FromString(data)
        except DecodeError as exc:
            self._applied_index = index
            return _error("", _INVALID_ARGUMENT, f"log entry {index} is not a valid Command ({exc})")
        kind = cmd.WhichOneof("command")
        handler = _HANDLERS.get(kind) if kind is not None else None
        if handler is None:
            unknown = _unknown_command_fields(cmd)
            if kind is not None or unknown:
                what = f"'{kind}'" if kind is not None else f"with field number(s) {unknown}"
                raise UnsupportedCommandError(
                    f"log entry {index} holds a command {what} that this coordinator cannot apply; it is "
                    "older than the coordinator that proposed it: stop applying and upgrade it"
                )
            self._applied_index = index
            return _error(
                cmd.request_id, _INVALID_ARGUMENT, f"log entry {index}: the Command has no command set"
            )
        self._applied_index = index
        request_id = cmd.request_id
        if request_id:
            previous = self._requests.get(request_id)
            if previous is not None:
                # A retry: return the first result, apply nothing. A copy, so callers cannot edit the table.
                copy = state_pb2.CommandResult()
                copy.CopyFrom(previous.result)
                return copy
        try:
            if len(request_id) > MAX_REQUEST_ID_LENGTH:
                raise _Rejected(
                    _INVALID_ARGUMENT, f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters"
                )
            _check_text(cmd.actor, "actor", MAX_ACTOR_LENGTH)
            if not cmd.HasField("proposed_at"):
                raise _Rejected(_INVALID_ARGUMENT, "the command has no proposed_at (the proposer's clock)")
            now = max(self._now, _checked_ns(cmd.proposed_at, "proposed_at"))
            ctx = _Ctx(index=index, now=now, actor=cmd.actor)
            result = handler(self, getattr(cmd, kind), ctx)  # type: ignore[arg-type]
        except _Rejected as rejected:
            return _error(request_id, rejected.code, rejected.message)
        if result is None:
            result = state_pb2.CommandResult()
        result.request_id = request_id
        self._commit(ctx, request_id, result)
        return result

    def _commit(self, ctx: _Ctx, request_id: str, result: state_pb2.CommandResult) -> None:
        """Bookkeeping after a successful command: time, request table, quarantine, change feed."""
        now = ctx.now
        self._now = now
        requests = self._requests
        if request_id:
            # A copy: the caller owns `result`, and an edit to the table's copy would diverge the replicas.
            kept = state_pb2.CommandResult()
            kept.CopyFrom(result)
            requests[request_id] = _Applied(ctx.index, now, kept)
        if requests:
            horizon = now - self._retention_ns
            limit = MAX_APPLIED_REQUESTS
            while requests and (len(requests) > limit or next(iter(requests.values())).applied_at <= horizon):
                requests.popitem(last=False)
        for pool in self._pools:
            pool.expire(now)
        if ctx.upserted or ctx.removed or ctx.settings_changed:
            self._record_change(
                ConfigChange(
                    ctx.index,
                    frozenset(ctx.upserted),
                    frozenset(ctx.removed),
                    ctx.settings_changed,
                    frozenset(ctx.freed_names),
                )
            )

    def _record_change(self, change: ConfigChange) -> None:
        self._config_version = change.index
        self._changes_cache.clear()
        self._feed.append(change)
        self._feed_index.append(change.index)
        if len(self._feed) > 2 * CHANGE_FEED_CAPACITY:  # trim in chunks: amortized O(1)
            cut = len(self._feed) - CHANGE_FEED_CAPACITY
            self._feed_horizon = self._feed_index[cut - 1]
            del self._feed[:cut]
            del self._feed_index[:cut]

    # -- Config streaming ------------------------------------------------------------------------------------

    @property
    def config_version(self) -> int:
        """Raft index of the last applied entry that changed what nodes see (0: nothing yet).

        Every node sees the whole mesh for now; when policy arrives, a node's own version is the last change
        among the entries that touch its view (filter ``changes_since`` by what the node may see).
        """
        return self._config_version

    def changes_since(self, version: int) -> ChangeSet | None:
        """The merged config-visible changes after ``version``, or None if ``version`` is too old to answer
        (compacted from the feed, or before the snapshot this state was restored from): send a full snapshot.

        ``version >= config_version`` gives an empty ChangeSet; a ``version`` above ``config_version`` means
        this coordinator is behind the one the node used, which the caller handles (wait, then UNAVAILABLE).
        """
        current = self._config_version
        if version >= current:
            return ChangeSet(version, current)
        if version < self._feed_horizon:
            return None
        cached = self._changes_cache.get(version)
        if cached is not None:  # watchers mostly sit at the same few versions: compute once per version
            return cached
        upserted: set[str] = set()
        removed: set[str] = set()
        names: set[str] = set()
        settings = False
        for change in self._feed[bisect.bisect_right(self._feed_index, version) :]:
            upserted -= change.removed
            removed -= change.upserted
            upserted |= change.upserted
            removed |= change.removed
            names |= change.freed_names
            settings = settings or change.settings
        result = ChangeSet(
            version, current, frozenset(upserted), frozenset(removed), settings, frozenset(names)
        )
        if len(self._changes_cache) < 1024:
            self._changes_cache[version] = result
        return result

    # -- Reads for the services ------------------------------------------------------------------------------

    @property
    def now(self) -> int:
        """The latest ``proposed_at`` applied, ns since the epoch (0: nothing applied yet)."""
        return self._now

    @property
    def settings(self) -> Settings | None:
        """Mesh settings; None until InitializeMesh is applied."""
        return self._settings

    def get_node(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def node_by_public_key(self, public_key: bytes) -> Node | None:
        node_id = self._node_by_key.get(public_key)
        return None if node_id is None else self._nodes[node_id]

    def node_by_name(self, name: str) -> Node | None:
        node_id = self._node_by_name.get(name)
        return None if node_id is None else self._nodes[node_id]

    def nodes(self) -> Iterator[Node]:
        """Every node, in no particular order (for building configs)."""
        return iter(self._nodes.values())

    @property
    def node_count(self) -> int:
        return len(self._nodes)

    def list_nodes(
        self, *, tags: Iterable[str] = (), after_name: str = "", limit: int | None = None
    ) -> list[Node]:
        """Nodes ordered by name, starting after ``after_name`` (a page token), carrying all of ``tags``."""
        if self._names_sorted is None:
            self._names_sorted = sorted(self._node_by_name)
        names = self._names_sorted
        wanted = frozenset(tags)
        result: list[Node] = []
        for name in names[bisect.bisect_right(names, after_name) if after_name else 0 :]:
            node = self._nodes[self._node_by_name[name]]
            if wanted.issubset(node.tags):
                result.append(node)
                if limit is not None and len(result) >= limit:
                    break
        return result

    def get_join_token(self, token_id: str) -> JoinToken | None:
        return self._join_tokens.get(token_id)

    def join_token_by_secret_hash(self, secret_hash: bytes) -> JoinToken | None:
        token_id = self._join_by_hash.get(secret_hash)
        return None if token_id is None else self._join_tokens[token_id]

    def join_tokens(self) -> list[JoinToken]:
        """Every join token, newest first (then by id)."""
        return sorted(self._join_tokens.values(), key=lambda t: (-t.created_at, t.token_id))

    def get_api_token(self, token_id: str) -> ApiToken | None:
        return self._api_tokens.get(token_id)

    def api_token_by_secret_hash(self, secret_hash: bytes) -> ApiToken | None:
        token_id = self._api_by_hash.get(secret_hash)
        return None if token_id is None else self._api_tokens[token_id]

    def api_tokens(self) -> list[ApiToken]:
        """Every API token, newest first (then by id)."""
        return sorted(self._api_tokens.values(), key=lambda t: (-t.created_at, t.token_id))

    def kv_get(self, key: bytes) -> KvEntry | None:
        return self._kv.get(key)

    def kv_items(self) -> list[tuple[bytes, KvEntry]]:
        return sorted(self._kv.items())

    def applied_request(self, request_id: str) -> state_pb2.CommandResult | None:
        """The recorded result of ``request_id`` if it is still in the de-duplication table (a copy)."""
        applied = self._requests.get(request_id)
        if applied is None:
            return None
        copy = state_pb2.CommandResult()
        copy.CopyFrom(applied.result)
        return copy

    # -- Command handlers: validate everything (raise _Rejected), then mutate. -------------------------------

    def _initialize_mesh(self, cmd: state_pb2.InitializeMesh, ctx: _Ctx) -> None:
        if self._settings is not None:
            raise _Rejected(
                _FAILED_PRECONDITION, f"the mesh is already initialized (mesh id {self._settings.mesh_id})"
            )
        if not cmd.HasField("settings"):
            raise _Rejected(_INVALID_ARGUMENT, "InitializeMesh has no settings")
        s = cmd.settings
        _check_id(s.mesh_id, "mesh_id")
        domain = s.mesh_domain
        if len(domain) > 253 or not all(_LABEL_RE.fullmatch(label) for label in domain.split(".")):
            raise _Rejected(
                _INVALID_ARGUMENT, f"mesh_domain {domain!r} is not a lowercase DNS name (e.g. 'mesh.example')"
            )
        if not s.mesh_prefixes:
            raise _Rejected(
                _INVALID_ARGUMENT, "mesh_prefixes is empty: give an IPv4 prefix such as 100.64.0.0/10"
            )
        pools: list[AddressPool] = []
        for text in s.mesh_prefixes:
            try:
                network = parse_prefix(text)
            except ValueError as exc:
                raise _Rejected(_INVALID_ARGUMENT, f"mesh_prefixes: {exc}") from None
            if any(p.version == network.version for p in pools):
                raise _Rejected(
                    _INVALID_ARGUMENT, f"mesh_prefixes: more than one IPv{network.version} prefix"
                )
            pools.append(AddressPool(network))
        _check_hash(s.preshared_key, "preshared_key")
        mtu = s.mtu or DEFAULT_MTU
        least = MIN_MTU_IPV6 if any(p.version == 6 for p in pools) else MIN_MTU
        if not least <= mtu <= MAX_MTU:
            raise _Rejected(_INVALID_ARGUMENT, f"mtu {mtu} is outside {least}-{MAX_MTU}")
        # -- commit
        self._settings = Settings(
            mesh_id=s.mesh_id,
            mesh_domain=domain,
            mesh_prefixes=tuple(f"{p.str_of(p.base)}/{p.network.prefixlen}" for p in pools),
            preshared_key=s.preshared_key,
            mtu=mtu,
            address_quarantine_seconds=s.address_quarantine_seconds,
            request_retention_seconds=s.request_retention_seconds or DEFAULT_REQUEST_RETENTION_SECONDS,
        )
        self._pools = pools
        self._retention_ns = self._settings.request_retention_seconds * NS_PER_SECOND
        ctx.settings_changed = True

    def _register_node(self, cmd: state_pb2.RegisterNode, ctx: _Ctx) -> state_pb2.CommandResult:
        if self._settings is None:
            raise _Rejected(_FAILED_PRECONDITION, "the mesh is not initialized yet")
        if len(cmd.public_key) != KEY_LENGTH:
            raise _Rejected(
                _INVALID_ARGUMENT, f"public_key must be {KEY_LENGTH} bytes, got {len(cmd.public_key)}"
            )
        _check_id(cmd.node_id, "node_id")
        _check_label(cmd.name, "name")
        _check_text(cmd.hostname, "hostname")
        _check_text(cmd.agent_version, "agent_version")
        _check_text(cmd.platform, "platform")
        _check_hash(cmd.node_token_hash, "node_token_hash")
        requested_tags = _checked_tags(cmd.tags, "tags")
        token = self._join_tokens.get(cmd.join_token_id)
        if token is None:
            raise _Rejected(_UNAUTHENTICATED, f"join token {cmd.join_token_id!r} does not exist")
        now = ctx.now

        existing = self.node_by_public_key(cmd.public_key)
        if existing is not None:
            # Idempotent per key: a retry with the same token is fine even if that token is now used up. A
            # public key is public, so another token must not take over the node (and its node token): a node
            # that lost its registration is removed by an admin and joins again.
            if token.token_id != existing.join_token_id:
                raise _Rejected(
                    _ALREADY_EXISTS,
                    f"this public key is already registered as node {existing.node_id} ({existing.name}) "
                    "with another join token; remove that node first to register the key again",
                )
            if token.revoked_at is not None or token.expires_at <= now:
                raise _Rejected(_UNAUTHENTICATED, token.rejection(now) or "join token is no longer valid")
            # -- commit: the node token changes.
            if existing.node_token_hash != cmd.node_token_hash:
                existing = replace(existing, node_token_hash=cmd.node_token_hash)
                self._nodes[existing.node_id] = existing
            return state_pb2.CommandResult(
                register_node=state_pb2.RegisterNodeResult(node=existing.to_proto())
            )

        reason = token.rejection(now)
        if reason is not None:
            raise _Rejected(_UNAUTHENTICATED, reason)
        if requested_tags:
            missing = set(requested_tags).difference(token.tags)
            if missing:
                raise _Rejected(
                    _PERMISSION_DENIED,
                    f"tags {sorted(missing)} are not granted by join token {token.token_id} "
                    f"(it grants {list(token.tags)})",
                )
            tags = requested_tags
        else:
            tags = token.tags
        if cmd.node_id in self._nodes:
            raise _Rejected(_ALREADY_EXISTS, f"node id {cmd.node_id} is already taken")
        addresses: list[int] = []
        for pool in self._pools:
            address = pool.find_free(now)
            if address is None:
                raise _Rejected(_RESOURCE_EXHAUSTED, f"no free address left in mesh prefix {pool.network}")
            addresses.append(address)
        name = self._free_name(cmd.name)
        # -- commit
        for pool, address in zip(self._pools, addresses, strict=True):
            pool.take(address, now)
        self._put_join_token(replace(token, uses=token.uses + 1))
        node = Node(
            node_id=cmd.node_id,
            name=name,
            hostname=cmd.hostname,
            public_key=cmd.public_key,
            mesh_ips=tuple(p.str_of(a) for p, a in zip(self._pools, addresses, strict=True)),
            tags=tags,
            endpoints=(),
            node_token_hash=cmd.node_token_hash,
            agent_version=cmd.agent_version,
            platform=cmd.platform,
            join_token_id=token.token_id,
            created_at=now,
            last_seen=None,
            online=False,
            modified_index=ctx.index,
        )
        self._nodes[node.node_id] = node
        self._node_by_key[node.public_key] = node.node_id
        self._node_by_name[name] = node.node_id
        self._names_sorted = None
        ctx.upserted.add(node.node_id)
        return state_pb2.CommandResult(register_node=state_pb2.RegisterNodeResult(node=node.to_proto()))

    def _free_name(self, base: str) -> str:
        """``base`` if free, else the first free of base-2, base-3, ..."""
        if base not in self._node_by_name:
            return base
        n = 2
        while (candidate := _suffixed(base, n)) in self._node_by_name:
            n += 1
        return candidate

    def _rename_node(self, cmd: state_pb2.RenameNode, ctx: _Ctx) -> None:
        node = self._existing_node(cmd.node_id)
        _check_label(cmd.new_name, "new_name")
        holder = self._node_by_name.get(cmd.new_name)
        if holder == node.node_id:
            return  # already so named: nothing changes
        if holder is not None:
            raise _Rejected(_ALREADY_EXISTS, f"name {cmd.new_name!r} is taken by node {holder}")
        # -- commit
        del self._node_by_name[node.name]
        self._node_by_name[cmd.new_name] = node.node_id
        self._names_sorted = None
        ctx.freed_names.add(node.name)
        self._update_node(node, ctx, name=cmd.new_name)

    def _remove_node(self, cmd: state_pb2.RemoveNode, ctx: _Ctx) -> None:
        node = self._existing_node(cmd.node_id)
        assert self._settings is not None  # a node exists only in an initialized mesh
        reusable_at = ctx.now + self._settings.address_quarantine_seconds * NS_PER_SECOND
        addresses = [pool.int_of(text) for pool, text in zip(self._pools, node.mesh_ips, strict=True)]
        if None in addresses:
            raise StateError(f"node {node.node_id} holds addresses {node.mesh_ips} outside the mesh prefixes")
        # -- commit
        for pool, address in zip(self._pools, addresses, strict=True):
            assert address is not None
            pool.release(address, reusable_at, ctx.now)
        del self._nodes[node.node_id]
        del self._node_by_key[node.public_key]
        del self._node_by_name[node.name]
        self._names_sorted = None
        ctx.upserted.discard(node.node_id)
        ctx.removed.add(node.node_id)
        ctx.freed_names.add(node.name)

    def _set_node_endpoints(self, cmd: state_pb2.SetNodeEndpoints, ctx: _Ctx) -> None:
        node = self._existing_node(cmd.node_id)
        if len(cmd.endpoints) > MAX_ENDPOINTS:
            raise _Rejected(
                _INVALID_ARGUMENT, f"{len(cmd.endpoints)} endpoints; the limit is {MAX_ENDPOINTS}"
            )
        endpoints = []
        for candidate in cmd.endpoints:
            if candidate.type not in _CANDIDATE_TYPES:
                raise _Rejected(
                    _INVALID_ARGUMENT, f"endpoint {candidate.address!r} has no known candidate type"
                )
            _check_socket_address(candidate.address)
            _check_text(candidate.relay_coordinator_id, "relay_coordinator_id", MAX_ID_LENGTH)
            endpoints.append(_endpoint_of(candidate))
        _check_text(cmd.agent_version, "agent_version")
        agent_version = cmd.agent_version or node.agent_version  # empty: not reported, keep the old one
        # -- commit
        if tuple(endpoints) != node.endpoints:
            self._update_node(node, ctx, endpoints=tuple(endpoints), agent_version=agent_version)
        elif agent_version != node.agent_version:
            self._nodes[node.node_id] = replace(node, agent_version=agent_version)

    def _record_nodes_seen(self, cmd: state_pb2.RecordNodesSeen, ctx: _Ctx) -> None:
        updates: dict[str, tuple[int | None, bool]] = {}
        for seen in cmd.nodes:
            last_seen = _checked_ns(seen.last_seen, "last_seen") if seen.HasField("last_seen") else None
            updates[seen.node_id] = (last_seen, seen.online)  # a repeated id: the later entry wins
        # -- commit. Unknown ids are skipped: the node may have been removed after it was seen.
        for node_id, (last_seen, online) in updates.items():
            node = self._nodes.get(node_id)
            if node is None:
                continue
            if last_seen is None or (node.last_seen is not None and last_seen < node.last_seen):
                last_seen = node.last_seen  # not reported, or older: liveness never goes backwards
            # Display-only, online included: as config, one liveness round marking a third of a 1,000-node
            # mesh online resent those peers to every watcher (the storm bench/control saw).
            if online != node.online or last_seen != node.last_seen:
                self._nodes[node_id] = replace(node, last_seen=last_seen, online=online)

    def _create_join_token(self, cmd: state_pb2.CreateJoinToken, ctx: _Ctx) -> None:
        _check_id(cmd.token_id, "token_id")
        if cmd.token_id in self._join_tokens:
            raise _Rejected(_ALREADY_EXISTS, f"join token {cmd.token_id} already exists")
        _check_hash(cmd.secret_hash, "secret_hash")
        if cmd.secret_hash in self._join_by_hash:
            raise _Rejected(_ALREADY_EXISTS, "a join token with this secret already exists")
        _check_text(cmd.description, "description", MAX_DESCRIPTION_LENGTH)
        tags = _checked_tags(cmd.tags, "tags")
        if not cmd.HasField("expires_at"):
            raise _Rejected(_INVALID_ARGUMENT, f"join token {cmd.token_id} has no expires_at")
        expires_at = _checked_ns(cmd.expires_at, "expires_at")
        if expires_at <= ctx.now:
            raise _Rejected(
                _INVALID_ARGUMENT,
                f"expires_at {format_time(expires_at)} is not after now ({format_time(ctx.now)})",
            )
        if expires_at > ctx.now + MAX_JOIN_TOKEN_TTL_SECONDS * NS_PER_SECOND:
            raise _Rejected(_INVALID_ARGUMENT, "a join token may be valid for at most 365 days")
        if not cmd.reusable and cmd.max_uses > 1:
            raise _Rejected(_INVALID_ARGUMENT, f"max_uses {cmd.max_uses} needs a reusable token")
        # -- commit
        self._put_join_token(
            JoinToken(
                token_id=cmd.token_id,
                secret_hash=cmd.secret_hash,
                description=cmd.description,
                tags=tags,
                expires_at=expires_at,
                reusable=cmd.reusable,
                max_uses=cmd.max_uses if cmd.reusable else 0,
                uses=0,
                created_at=ctx.now,
                created_by=ctx.actor,
                revoked_at=None,
            )
        )

    def _revoke_join_token(self, cmd: state_pb2.RevokeJoinToken, ctx: _Ctx) -> None:
        token = self._join_tokens.get(cmd.token_id)
        if token is None:
            raise _Rejected(_NOT_FOUND, f"join token {cmd.token_id!r} does not exist")
        if token.revoked_at is None:  # revoking twice keeps the first time
            self._put_join_token(replace(token, revoked_at=ctx.now))

    def _create_api_token(self, cmd: state_pb2.CreateApiToken, ctx: _Ctx) -> None:
        _check_id(cmd.token_id, "token_id")
        if cmd.token_id in self._api_tokens:
            raise _Rejected(_ALREADY_EXISTS, f"API token {cmd.token_id} already exists")
        _check_hash(cmd.secret_hash, "secret_hash")
        if cmd.secret_hash in self._api_by_hash:
            raise _Rejected(_ALREADY_EXISTS, "an API token with this secret already exists")
        _check_text(cmd.description, "description", MAX_DESCRIPTION_LENGTH)
        if cmd.role not in _ROLES:
            raise _Rejected(
                _INVALID_ARGUMENT, f"role {cmd.role} is not a valid role (read-only, operator, admin)"
            )
        expires_at = _checked_ns(cmd.expires_at, "expires_at") if cmd.HasField("expires_at") else None
        if expires_at is not None and expires_at <= ctx.now:
            raise _Rejected(
                _INVALID_ARGUMENT,
                f"expires_at {format_time(expires_at)} is not after now ({format_time(ctx.now)})",
            )
        # -- commit
        token = ApiToken(
            token_id=cmd.token_id,
            secret_hash=cmd.secret_hash,
            description=cmd.description,
            role=cmd.role,
            expires_at=expires_at,
            created_at=ctx.now,
            created_by=ctx.actor,
            revoked_at=None,
        )
        self._api_tokens[token.token_id] = token
        self._api_by_hash[token.secret_hash] = token.token_id

    def _revoke_api_token(self, cmd: state_pb2.RevokeApiToken, ctx: _Ctx) -> None:
        token = self._api_tokens.get(cmd.token_id)
        if token is None:
            raise _Rejected(_NOT_FOUND, f"API token {cmd.token_id!r} does not exist")
        if token.revoked_at is not None:
            return  # revoking twice keeps the first time
        if token.role == common_pb2.ROLE_ADMIN and token.is_active(ctx.now):
            others = [
                t
                for t in self._api_tokens.values()
                if t.token_id != token.token_id and t.role == common_pb2.ROLE_ADMIN and t.is_active(ctx.now)
            ]
            if not others:
                raise _Rejected(
                    _FAILED_PRECONDITION,
                    f"API token {token.token_id} is the last active admin token: "
                    "create another admin token first",
                )
        self._api_tokens[token.token_id] = replace(token, revoked_at=ctx.now)

    def _kv_put(self, cmd: state_pb2.KvPut, ctx: _Ctx) -> state_pb2.CommandResult:
        _check_kv(cmd.key, cmd.value)
        previous = self._kv.get(cmd.key)
        self._kv[cmd.key] = KvEntry(cmd.value, ctx.index)
        return _kv_result(True, previous, ctx.index)

    def _kv_delete(self, cmd: state_pb2.KvDelete, ctx: _Ctx) -> state_pb2.CommandResult:
        _check_kv(cmd.key, b"")
        previous = self._kv.pop(cmd.key, None)
        return _kv_result(True, previous, 0)

    def _kv_compare_and_set(self, cmd: state_pb2.KvCompareAndSet, ctx: _Ctx) -> state_pb2.CommandResult:
        _check_kv(cmd.key, cmd.new_value)
        current = self._kv.get(cmd.key)
        if cmd.HasField("expected_value"):
            holds = current is not None and current.value == cmd.expected_value
        else:
            holds = current is None
        if not holds:
            return _kv_result(False, current, current.revision if current else 0)
        self._kv[cmd.key] = KvEntry(cmd.new_value, ctx.index)
        return _kv_result(True, current, ctx.index)

    # -- Handler helpers -------------------------------------------------------------------------------------

    def _existing_node(self, node_id: str) -> Node:
        node = self._nodes.get(node_id)
        if node is None:
            raise _Rejected(_NOT_FOUND, f"node {node_id!r} does not exist")
        return node

    def _update_node(self, node: Node, ctx: _Ctx, **changes: Any) -> None:
        """Stores ``node`` with config-visible ``changes``: bumps modified_index and feeds the change feed.
        (Display-only changes replace the record directly and leave both alone.)"""
        self._nodes[node.node_id] = replace(node, modified_index=ctx.index, **changes)
        ctx.upserted.add(node.node_id)

    def _put_join_token(self, token: JoinToken) -> None:
        self._join_tokens[token.token_id] = token
        self._join_by_hash[token.secret_hash] = token.token_id

    # -- Snapshot and restore --------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as a serialized ``StateSnapshot``; equal states give equal bytes.

        The bytes are exactly what ``SerializeToString`` of the full message gives (a test checks it), but
        built by framing each list element ourselves, so that the encoding of a record that did not change
        since the last snapshot is reused: with 10,000 nodes and a full request table this is what keeps
        periodic snapshots cheap.
        """
        head = state_pb2.StateSnapshot(format_version=FORMAT_VERSION, applied_index=self._applied_index)
        if self._now:
            head.now.CopyFrom(ns_to_timestamp(self._now))
        if self._settings is not None:
            head.settings.CopyFrom(self._settings.to_proto())
        parts = [head.SerializeToString(deterministic=True)]
        encoded = self._encoded
        parts += self._framed(5, self._nodes, encoded.setdefault("nodes", {}), _encode_record)
        parts += self._framed(6, self._join_tokens, encoded.setdefault("join", {}), _encode_record)
        parts += self._framed(7, self._api_tokens, encoded.setdefault("api", {}), _encode_record)
        quarantined = sorted((p.version, a, p, t) for p in self._pools for a, t in p.quarantined())
        parts += (
            length_delimited(
                8, state_pb2.QuarantinedAddress(address=p.str_of(a), reusable_at=ns_to_timestamp(t))
            )
            for _, a, p, t in quarantined
        )
        for request_id in sorted(self._requests):
            applied = self._requests[request_id]
            if applied.encoded is None:
                applied.encoded = length_delimited(9, _encode_applied(request_id, applied))
            parts.append(applied.encoded)
        parts += self._framed(10, self._kv, encoded.setdefault("kv", {}), _encode_kv)
        if self._config_version:  # field 11 (varint) follows the lists, as protobuf orders fields by number
            parts.append(varint(11 << 3) + varint(self._config_version))
        return b"".join(parts)

    @staticmethod
    def _framed(
        number: int,
        records: dict[Any, Any],
        cache: dict[Any, tuple[object, bytes]],
        encode: Callable[..., bytes],
    ) -> list[bytes]:
        """Framed encodings of ``records`` sorted by key; unchanged records (same object) reuse ``cache``."""
        fresh: dict[Any, tuple[object, bytes]] = {}
        out = []
        for k in sorted(records):
            record = records[k]
            hit = cache.get(k)
            if hit is None or hit[0] is not record:
                hit = (record, length_delimited(number, encode(k, record)))
            fresh[k] = hit
            out.append(hit[1])
        cache.clear()
        cache.update(fresh)  # drop entries of deleted records
        return out

    @classmethod
    def from_snapshot(cls, data: bytes) -> MeshState:
        """A new state restored from ``data``; raises ``SnapshotError`` (naming the problem) if it cannot."""
        state = cls()
        state.restore(data)
        return state

    def restore(self, data: bytes) -> None:
        """Replaces the whole state with the snapshot ``data``.

        All or nothing: on ``SnapshotError`` the state is unchanged. The change feed restarts empty, so
        watchers older than the snapshot get a full config.
        """
        try:
            snap = state_pb2.StateSnapshot.FromString(data)
        except DecodeError as exc:
            raise SnapshotError(f"snapshot is not a valid StateSnapshot ({exc})") from None
        if snap.format_version != FORMAT_VERSION:
            raise SnapshotError(
                f"snapshot format version {snap.format_version} is not supported (this coordinator reads "
                f"version {FORMAT_VERSION}); upgrade the coordinator"
            )
        fresh = MeshState()
        try:
            fresh._load(snap)
        except (_Rejected, IpamError, ValueError, KeyError) as exc:
            raise SnapshotError(f"snapshot at index {snap.applied_index} is inconsistent: {exc}") from None
        self.__dict__.update(fresh.__dict__)

    def _load(self, snap: state_pb2.StateSnapshot) -> None:
        self._applied_index = snap.applied_index
        self._now = _checked_ns(snap.now, "now") if snap.HasField("now") else 0
        if snap.HasField("settings"):
            s = snap.settings
            self._settings = Settings(
                mesh_id=s.mesh_id,
                mesh_domain=s.mesh_domain,
                mesh_prefixes=tuple(s.mesh_prefixes),
                preshared_key=s.preshared_key,
                mtu=s.mtu,
                address_quarantine_seconds=s.address_quarantine_seconds,
                request_retention_seconds=s.request_retention_seconds or DEFAULT_REQUEST_RETENTION_SECONDS,
            )
            self._pools = [AddressPool(parse_prefix(p)) for p in s.mesh_prefixes]
            self._retention_ns = self._settings.request_retention_seconds * NS_PER_SECOND
        for record in snap.nodes:
            node = Node.from_proto(record)
            if (
                node.node_id in self._nodes
                or node.public_key in self._node_by_key
                or node.name in self._node_by_name
            ):
                raise ValueError(f"node {node.node_id} duplicates another node's id, key or name")
            if len(node.mesh_ips) != len(self._pools):
                raise ValueError(
                    f"node {node.node_id} has {len(node.mesh_ips)} addresses for {len(self._pools)} pools"
                )
            for pool, text in zip(self._pools, node.mesh_ips, strict=True):
                address = pool.int_of(text)
                if address is None:
                    raise ValueError(f"node {node.node_id} address {text} is outside {pool.network}")
                pool.adopt(address)
            self._nodes[node.node_id] = node
            self._node_by_key[node.public_key] = node.node_id
            self._node_by_name[node.name] = node.node_id
        for q in snap.quarantined_addresses:
            owner = next((p for p in self._pools if p.int_of(q.address) is not None), None)
            address = owner.int_of(q.address) if owner is not None else None
            if owner is None or address is None or address in owner.taken:
                raise ValueError(f"quarantined address {q.address} is outside the pools or allocated")
            owner.quarantine_until(address, timestamp_to_ns(q.reusable_at), self._now)
        for jt in snap.join_tokens:
            join_token = JoinToken.from_proto(jt)
            if join_token.token_id in self._join_tokens or join_token.secret_hash in self._join_by_hash:
                raise ValueError(f"join token {join_token.token_id} duplicates another token's id or secret")
            self._put_join_token(join_token)
        for at in snap.api_tokens:
            token = ApiToken.from_proto(at)
            if token.token_id in self._api_tokens or token.secret_hash in self._api_by_hash:
                raise ValueError(f"API token {token.token_id} duplicates another token's id or secret")
            self._api_tokens[token.token_id] = token
            self._api_by_hash[token.secret_hash] = token.token_id
        # Insertion order must be apply order, so pruning keeps popping the oldest.
        # The results stay sub-messages of `snap` (no copy): the table never hands them out uncopied.
        for ar in sorted(snap.applied_requests, key=lambda r: r.applied_index):
            self._requests[ar.request_id] = _Applied(
                ar.applied_index, timestamp_to_ns(ar.applied_at), ar.result
            )
        for kv in snap.kv:
            self._kv[kv.key] = KvEntry(kv.value, kv.revision)
        newest = max((n.modified_index for n in self._nodes.values()), default=0)
        if not newest <= snap.config_version <= snap.applied_index:
            raise ValueError(
                f"config_version {snap.config_version} is outside [{newest}, {snap.applied_index}] (the "
                "newest node change and the applied index)"
            )
        self._config_version = snap.config_version
        self._feed_horizon = max(self._config_version, snap.applied_index)


# ------------------------------------------------------------------------------------------------------------
# Small helpers


def _error(
    request_id: str, code: state_pb2.CommandErrorCode.ValueType, message: str
) -> state_pb2.CommandResult:
    return state_pb2.CommandResult(
        request_id=request_id, error=state_pb2.CommandError(code=code, message=message)
    )


def _kv_result(succeeded: bool, previous: KvEntry | None, revision: int) -> state_pb2.CommandResult:
    kv = state_pb2.KvResult(succeeded=succeeded, revision=revision)
    if previous is not None:
        kv.previous_value = previous.value
    return state_pb2.CommandResult(kv=kv)


def _encode_record(_key: object, record: Node | JoinToken | ApiToken) -> bytes:
    return record.to_proto().SerializeToString(deterministic=True)


def _encode_kv(key: bytes, entry: KvEntry) -> bytes:
    return state_pb2.KvEntry(key=key, value=entry.value, revision=entry.revision).SerializeToString(
        deterministic=True
    )


def _encode_applied(request_id: str, applied: _Applied) -> bytes:
    entry = state_pb2.AppliedRequest(request_id=request_id, applied_index=applied.index)
    entry.applied_at.CopyFrom(ns_to_timestamp(applied.applied_at))
    # The result is appended as field 4 rather than copied into the message: same bytes, one copy less.
    return entry.SerializeToString(deterministic=True) + length_delimited(4, applied.result)


def _check_kv(key: bytes, value: bytes) -> None:
    if not key or len(key) > MAX_KV_KEY:
        raise _Rejected(_INVALID_ARGUMENT, f"KV key must be 1-{MAX_KV_KEY} bytes, got {len(key)}")
    if len(value) > MAX_KV_VALUE:
        raise _Rejected(_INVALID_ARGUMENT, f"KV value must be at most {MAX_KV_VALUE} bytes, got {len(value)}")


def _unknown_command_fields(cmd: state_pb2.Command) -> list[int]:
    """Unknown field numbers in the command range: command types from a newer coordinator."""
    found = unknown_fields.UnknownFieldSet(cmd)
    numbers = {int(found[i].field_number) for i in range(len(found))}
    # A known field number with the wrong wire type lands here too: a malformed entry, not a new type.
    return sorted(n for n in numbers if n >= _FIRST_COMMAND_FIELD and n not in _KNOWN_COMMAND_FIELDS)


_ONEOF_FIELD_OF_TYPE = {
    f.message_type.full_name: f.name
    for f in state_pb2.Command.DESCRIPTOR.oneofs_by_name["command"].fields
    if f.message_type is not None
}


def encode_command(body: Message, *, proposed_at: int, request_id: str = "", actor: str = "") -> bytes:
    """The log entry for a command message (``state_pb2.KvPut(...)``, ...), for proposers.

    ``proposed_at`` is the proposer's clock in ns since the epoch (``time.time_ns()`` in the I/O shell).
    """
    name = _ONEOF_FIELD_OF_TYPE.get(body.DESCRIPTOR.full_name)
    if name is None:
        raise StateError(f"{body.DESCRIPTOR.full_name} is not a Command.command member")
    cmd = state_pb2.Command(request_id=request_id, actor=actor, proposed_at=ns_to_timestamp(proposed_at))
    getattr(cmd, name).CopyFrom(body)
    return cmd.SerializeToString()


# Oneof member of Command.command -> handler. Every member must be here (tests check it): a member without a
# handler is treated like an unknown command type, which stops the replica.
_HANDLERS: dict[str, Handler] = {
    "initialize_mesh": MeshState._initialize_mesh,
    "register_node": MeshState._register_node,
    "rename_node": MeshState._rename_node,
    "remove_node": MeshState._remove_node,
    "set_node_endpoints": MeshState._set_node_endpoints,
    "record_nodes_seen": MeshState._record_nodes_seen,
    "create_join_token": MeshState._create_join_token,
    "revoke_join_token": MeshState._revoke_join_token,
    "create_api_token": MeshState._create_api_token,
    "revoke_api_token": MeshState._revoke_api_token,
    "kv_put": MeshState._kv_put,
    "kv_delete": MeshState._kv_delete,
    "kv_compare_and_set": MeshState._kv_compare_and_set,
}
