"""Raft consensus: a sans-I/O core (core, log, quorum, progress) and its asyncio/gRPC shell.

The driver-facing API is ``RawNode`` (see ``rawnode`` for the Ready contract) over a ``LogStore``; everything
the core exchanges with the outside world is a value from ``messages``.
"""

from tunnelmesh.coord.raft.core import Config
from tunnelmesh.coord.raft.errors import NotLeader, ProposalDropped, RaftError
from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Snapshot,
    SnapshotMetadata,
    SnapshotStatus,
    SoftState,
    StateType,
)
from tunnelmesh.coord.raft.rawnode import RawNode, Status
from tunnelmesh.coord.raft.read_only import ReadOnlyOption
from tunnelmesh.coord.raft.storage_api import LogStore, Storage

__all__ = [
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Config",
    "Entry",
    "EntryType",
    "HardState",
    "LogStore",
    "MemoryStorage",
    "Message",
    "MessageType",
    "NotLeader",
    "ProposalDropped",
    "RaftError",
    "RawNode",
    "ReadOnlyOption",
    "ReadState",
    "Ready",
    "Snapshot",
    "SnapshotMetadata",
    "SnapshotStatus",
    "SoftState",
    "StateType",
    "Status",
    "Storage",
]
