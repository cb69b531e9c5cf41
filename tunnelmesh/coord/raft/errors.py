"""Errors raised by the Raft core and its storage.

``NotLeader`` is the one a caller acts on: the gRPC service forwards the request to ``leader_id`` (0 when no
leader is known yet; retry after a short delay). The storage errors mirror etcd's
``ErrCompacted``/``ErrUnavailable``: the core catches them and falls back to a snapshot or a retry, they never
reach the driver.
"""

from tunnelmesh.errors import TunnelMeshError


class RaftError(TunnelMeshError):
    """Base class of Raft errors; raised directly for misuse (bad config, broken invariant)."""


class NotLeader(RaftError):
    """A proposal or read reached a node that is not the leader; ``leader_id`` is 0 when unknown."""

    def __init__(self, leader_id: int, node_id: int = 0) -> None:
        self.leader_id = leader_id
        self.node_id = node_id
        where = f"node {node_id:x}" if node_id else "this node"
        hint = f"forward to leader {leader_id:x}" if leader_id else "no leader known yet; retry shortly"
        super().__init__(f"{where} is not the Raft leader: {hint}")


class ProposalDropped(RaftError):
    """The leader refused a proposal (leadership transfer in progress, conf change pending, node removed)."""


class Stopped(RaftError):
    """This member is stopping (shutdown, or its storage failed): proposals, reads and waits in flight end
    with it. A proposal's outcome is then unknown (it may still commit through the others): retry it, with
    the same request id, on another member."""


class StorageError(RaftError):
    """Base class of errors a ``Storage`` raises to the core."""


class CompactedError(StorageError):
    """The requested index is older than the first index still in the log (it was compacted away)."""


class UnavailableError(StorageError):
    """The requested index is newer than the last index in the log."""


class SnapOutOfDateError(StorageError):
    """A snapshot older than the one the storage already holds was offered."""


class SnapshotTemporarilyUnavailable(StorageError):
    """The application is still building a snapshot; the leader retries later."""
