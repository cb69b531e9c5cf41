"""Values that cross the Raft core's boundary: messages, log entries, durable state, snapshots and ``Ready``.

Everything here is a frozen, slotted dataclass: the core never mutates a value after handing it out, so the
driver may persist, send and apply them concurrently. Node ids are positive integers; ``NONE`` (0) means "no
node".
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from tunnelmesh.coord.raft.errors import RaftError

NONE = 0
"""The node id that means "nobody" (no leader known, no vote cast)."""


class MessageType(enum.IntEnum):
    """Message types, named as in etcd's raftpb. Local ones are stepped by the node itself and never sent."""

    HUP = 0  # local: start an election (tick-driven or forced)
    BEAT = 1  # local: leader sends heartbeats
    PROP = 2  # local (or forwarded): propose entries
    APP = 3  # AppendEntries
    APP_RESP = 4
    VOTE = 5  # RequestVote
    VOTE_RESP = 6
    SNAP = 7  # InstallSnapshot
    HEARTBEAT = 8
    HEARTBEAT_RESP = 9
    UNREACHABLE = 10  # local: the transport could not reach a peer
    SNAP_STATUS = 11  # local: the transport finished (or failed) sending a snapshot
    CHECK_QUORUM = 12  # local: leader verifies it heard from a quorum
    TRANSFER_LEADER = 13  # local (or forwarded): hand leadership to ``frm``
    TIMEOUT_NOW = 14  # leader tells the transferee to campaign immediately
    READ_INDEX = 15  # local (or forwarded from a follower): linearizable read
    READ_INDEX_RESP = 16
    PRE_VOTE = 17
    PRE_VOTE_RESP = 18


LOCAL_MESSAGES = frozenset(
    {
        MessageType.HUP,
        MessageType.BEAT,
        MessageType.UNREACHABLE,
        MessageType.SNAP_STATUS,
        MessageType.CHECK_QUORUM,
    }
)
RESPONSE_MESSAGES = frozenset(
    {
        MessageType.APP_RESP,
        MessageType.VOTE_RESP,
        MessageType.HEARTBEAT_RESP,
        MessageType.READ_INDEX_RESP,
        MessageType.PRE_VOTE_RESP,
    }
)


def vote_response_type(t: MessageType) -> MessageType:
    """The response type that answers a (pre-)vote request of type ``t``."""
    if t == MessageType.VOTE:
        return MessageType.VOTE_RESP
    if t == MessageType.PRE_VOTE:
        return MessageType.PRE_VOTE_RESP
    raise RaftError(f"not a vote message: {t.name}")


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. ``data`` is opaque to Raft for NORMAL entries, an encoded ``ConfChange`` otherwise."""

    index: int
    term: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


ENTRY_OVERHEAD = 24
"""Bytes counted per entry on top of its payload when sizing batches (index, term, type, framing)."""


def entry_size(e: Entry) -> int:
    return len(e.data) + ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True)
class HardState:
    """The state a node must persist before it sends the messages of the same ``Ready``."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


EMPTY_HARD_STATE = HardState()


@dataclass(frozen=True, slots=True)
class ConfState:
    """Cluster membership: voters elect and form quorums; learners only receive the log."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SnapshotMetadata:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The application's state as of ``metadata.index`` (inclusive), with the membership at that index."""

    metadata: SnapshotMetadata = field(default_factory=SnapshotMetadata)
    data: bytes = b""

    @property
    def index(self) -> int:
        return self.metadata.index

    @property
    def term(self) -> int:
        return self.metadata.term

    def is_empty(self) -> bool:
        return self.metadata.index == 0


EMPTY_SNAPSHOT = Snapshot()


@dataclass(frozen=True, slots=True)
class Message:
    """A Raft message. ``term`` 0 marks a local message (or a forwarded proposal / read request).

    ``index``/``log_term`` identify the entry preceding ``entries`` (APP), the candidate's last entry (VOTE),
    the highest matching index (APP_RESP) or the read index (READ_INDEX_RESP). ``context`` carries a read
    request's id or the campaign kind (``CAMPAIGN_TRANSFER``).
    """

    type: MessageType
    to: int = NONE
    frm: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    snapshot: Snapshot | None = None
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""


class ConfChangeType(enum.IntEnum):
    ADD_NODE = 0  # add a voter, or promote a learner to voter
    REMOVE_NODE = 1
    ADD_LEARNER = 2  # add a learner, or demote a voter to learner


_CONF_CHANGE_HEADER = struct.Struct(">BQ")


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A single-server membership change, carried in a CONF_CHANGE entry's ``data``."""

    type: ConfChangeType
    node_id: int
    context: bytes = b""

    def encode(self) -> bytes:
        return _CONF_CHANGE_HEADER.pack(int(self.type), self.node_id) + self.context

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        if len(data) < _CONF_CHANGE_HEADER.size:
            raise RaftError(
                f"conf change entry too short: {len(data)} bytes, need {_CONF_CHANGE_HEADER.size}"
            )
        kind, node_id = _CONF_CHANGE_HEADER.unpack_from(data)
        try:
            cc_type = ConfChangeType(kind)
        except ValueError:
            raise RaftError(f"unknown conf change type {kind}") from None
        return cls(cc_type, node_id, bytes(data[_CONF_CHANGE_HEADER.size :]))


class StateType(enum.IntEnum):
    FOLLOWER = 0
    CANDIDATE = 1
    LEADER = 2
    PRE_CANDIDATE = 3


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth reporting (not persisted): who leads and which role this node plays."""

    lead: int = NONE
    raft_state: StateType = StateType.FOLLOWER


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served from the state machine once it has applied ``index``."""

    index: int
    request_ctx: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the driver must do, in order; see ``rawnode`` for the contract.

    ``soft_state`` / ``hard_state`` are ``None`` when unchanged since the previous ``Ready``.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    read_states: tuple[ReadState, ...] = ()
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    must_sync: bool = False


class SnapshotStatus(enum.IntEnum):
    FINISH = 0
    FAILURE = 1
