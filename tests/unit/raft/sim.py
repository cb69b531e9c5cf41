"""Deterministic simulation of a Raft cluster under faults, with safety invariants checked after every event.

One ``Simulation(seed)`` is one *schedule*: everything random (topology, fault rates, which node crashes when,
message delays, client traffic) is drawn from ``random.Random(seed)``, so a failing seed replays exactly.

The world: N nodes (3 or 5 founding voters) running ``RawNode`` on a ``MemoryStorage`` that plays the disk; an
in-memory network that drops, duplicates, delays and reorders messages and can be partitioned; crashes that
throw away the ``RawNode`` and every un-advanced ``Ready`` (only what reached the storage survives); clients
that propose, read (ReadIndex), change membership (add learner, promote, remove) and transfer leadership; the
application takes snapshots and compacts the log. Crashes strike between rounds, right after a node handled a
message, or after a Ready was persisted but before its messages were sent; drivers sometimes step messages
between ``ready()`` and ``advance()``. ``Params.draw`` picks a mixed profile or one focused on a hazard.

Invariants, checked as events happen:

* election safety: at most one leader per term;
* log matching: an entry is identified by (index, term): same data and same predecessor term everywhere;
* leader completeness: a new leader's log holds every entry any node has seen committed;
* state-machine safety: every node's state machine has the same hash after applying index i (snapshots
  included);
* read linearizability: a ReadState index covers every write acknowledged before the read was issued;
* liveness: after the schedule, the network heals, crashed members restart, and every member must apply every
  write that was acknowledged to a client.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections import deque
from dataclasses import dataclass, field

from tunnelmesh.coord.raft.core import Config
from tunnelmesh.coord.raft.errors import NotLeader, ProposalDropped
from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    EntryType,
    Message,
    MessageType,
    Ready,
    SnapshotStatus,
    StateType,
)
from tunnelmesh.coord.raft.rawnode import RawNode

REPLAY_HINT = "TM_RAFT_SIM_SEED={seed} pytest tests/unit/raft/test_simulation.py -k replay"

H0 = hashlib.sha256(b"tunnelmesh-sim").digest()[:16]


class InvariantViolation(AssertionError):
    pass


def _encode_app_snapshot(index: int, h: bytes) -> bytes:
    return struct.pack(">Q", index) + h


def _decode_app_snapshot(data: bytes) -> tuple[int, bytes]:
    if not data:
        return 1, H0  # the bootstrap snapshot
    (index,) = struct.unpack_from(">Q", data)
    return index, data[8:]


@dataclass
class Params:
    n: int
    rounds: int
    drop: float
    dup: float
    max_delay: int
    crash: float
    crash_leader: float
    partition: float
    propose: float
    read: float
    conf: float
    transfer: float
    snapshot: float
    pre_vote: bool
    check_quorum: bool
    max_inflight: int
    max_entries: int
    profile: str = "mixed"

    @classmethod
    def draw(cls, rng: random.Random, rounds: int) -> Params:
        """Most schedules mix every fault; some focus on one hazard so that rare interleavings come up often:

        * ``split``: 5 nodes, long partitions, many reads, no crashes: stale leaders on the minority side
          (a read served there without a quorum would miss writes acknowledged by the majority);
        * ``churn``: frequent leader crashes right after appending, one entry per append, no pre-vote or
          check-quorum: many short terms with divergent log tails (Figure 8 territory).
        """
        p = cls._draw_mixed(rng, rounds)
        kind = rng.random()
        if kind < 0.15:
            p.profile = "split"
            p.n, p.partition, p.read, p.propose = 5, rng.choice((0.03, 0.05)), 0.5, 1.5
            p.crash = p.crash_leader = p.conf = 0.0
            p.check_quorum = rng.random() < 0.3
        elif kind < 0.3:
            p.profile = "churn"
            p.max_entries, p.max_delay, p.drop = 1, rng.choice((1, 2)), 0.0
            p.crash_leader, p.crash, p.partition = rng.choice((0.05, 0.1)), 0.02, 0.0
            p.pre_vote = p.check_quorum = False
            p.propose = 2.0
        return p

    @classmethod
    def _draw_mixed(cls, rng: random.Random, rounds: int) -> Params:
        return cls(
            n=rng.choice((3, 5)),
            rounds=rounds,
            drop=rng.choice((0.0, 0.02, 0.1, 0.25)),
            dup=rng.choice((0.0, 0.02, 0.1)),
            max_delay=rng.choice((0, 1, 3, 6)),
            crash=rng.choice((0.0, 0.01, 0.04)),
            crash_leader=rng.choice((0.0, 0.0, 0.02, 0.08)),
            partition=rng.choice((0.0, 0.01, 0.03)),
            propose=rng.choice((0.3, 0.8, 2.0)),
            read=rng.choice((0.0, 0.2, 0.5)),
            conf=rng.choice((0.0, 0.02, 0.06)),
            transfer=rng.choice((0.0, 0.01, 0.04)),
            snapshot=rng.choice((0.0, 0.03, 0.1)),
            pre_vote=rng.random() < 0.7,
            check_quorum=rng.random() < 0.7,
            max_inflight=rng.choice((1, 4, 256)),
            max_entries=rng.choice((1, 3, 64)),
        )


@dataclass
class SimNode:
    id: int
    storage: MemoryStorage
    raw: RawNode | None = None
    app_index: int = 0
    app_hash: bytes = H0
    conf_state: ConfState = field(default_factory=ConfState)
    proposals: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # index -> (term, data)
    reads: dict[bytes, int] = field(default_factory=dict)  # ctx -> minimum acceptable read index
    down_until: int = 0


@dataclass(order=True)
class InFlight:
    deliver_at: int
    seq: int
    msg: Message = field(compare=False)


class Simulation:
    def __init__(self, seed: int, rounds: int = 120, trace_len: int | None = 60) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.p = Params.draw(self.rng, rounds)
        self.now = 0
        self.seq = 0
        self.trace: deque[str] = deque(maxlen=trace_len)
        self.nodes: dict[int, SimNode] = {}
        self.next_id = self.p.n + 1
        self.removed: set[int] = set()
        self.net: list[InFlight] = []
        self.groups: dict[int, int] | None = None  # node id -> partition side; None = healed
        # Global knowledge for the invariants.
        self.leader_of_term: dict[int, int] = {}
        self.entries_seen: dict[tuple[int, int], tuple[int, bytes, int]] = {}
        self.committed_terms: dict[int, int] = {}
        self.hash_at: dict[int, bytes] = {1: H0}
        self.acked: dict[int, tuple[int, bytes]] = {}
        self.max_acked = 0
        self.proposal_counter = 0
        self.read_counter = 0
        self.stats: dict[str, int] = {
            "proposed": 0,
            "acked": 0,
            "reads": 0,
            "elections": 0,
            "crashes": 0,
            "snapshots_sent": 0,
            "conf_changes": 0,
            "transfers": 0,
            "events": 0,
        }
        voters = list(range(1, self.p.n + 1))
        for i in voters:
            node = SimNode(i, MemoryStorage.bootstrap(voters))
            self.nodes[i] = node
            self._start(node)

    # -- plumbing --------------------------------------------------------------------------------------------

    def fail(self, what: str) -> None:
        raise InvariantViolation(f"raft simulation seed={self.seed}: {what}\n{self.trace_text()}")

    def trace_text(self) -> str:
        tail = "\n  ".join(self.trace)
        return f"  params: {self.p}\n  last events:\n  {tail}\nreplay: {REPLAY_HINT.format(seed=self.seed)}"

    def log(self, s: str) -> None:
        self.trace.append(f"t={self.now} {s}")

    def _config(self, node_id: int, applied: int) -> Config:
        return Config(
            id=node_id,
            election_tick=10,
            heartbeat_tick=1,
            applied=applied,
            pre_vote=self.p.pre_vote,
            check_quorum=self.p.check_quorum,
            max_inflight_msgs=self.p.max_inflight,
            max_entries_per_msg=self.p.max_entries,
            max_size_per_msg=4096,
        )

    def _start(self, node: SimNode) -> None:
        snap = node.storage.snapshot()
        if not snap.is_empty():
            node.app_index, node.app_hash = _decode_app_snapshot(snap.data)
            node.conf_state = snap.metadata.conf_state
        else:
            node.app_index, node.app_hash, node.conf_state = 0, H0, ConfState()
        node.raw = RawNode(
            self._config(node.id, snap.index), node.storage, random.Random(self.rng.getrandbits(32))
        )
        node.proposals.clear()
        node.reads.clear()

    def alive(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.raw is not None]

    def leader(self) -> SimNode | None:
        best: SimNode | None = None
        for n in self.alive():
            assert n.raw is not None
            if n.raw.raft.state == StateType.LEADER and (
                best is None or n.raw.raft.term > best.raw.raft.term
            ):  # type: ignore[union-attr]
                best = n
        return best

    # -- network ---------------------------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        if self.rng.random() < self.p.drop:
            self._on_drop(m)
            return
        copies = 2 if self.rng.random() < self.p.dup else 1
        for _ in range(copies):
            self.seq += 1
            delay = self.rng.randint(0, self.p.max_delay)
            self.net.append(InFlight(self.now + delay, self.seq, m))

    def _on_drop(self, m: Message) -> None:
        if m.type == MessageType.SNAP:
            sender = self.nodes.get(m.frm)
            if sender is not None and sender.raw is not None:
                sender.raw.report_snapshot(m.to, SnapshotStatus.FAILURE)

    def _deliver_some_to(self, node: SimNode, k: int) -> None:
        picked = [f for f in self.net if f.deliver_at <= self.now and f.msg.to == node.id][:k]
        for f in picked:
            self.net.remove(f)
            self._deliver(f)

    def _connected(self, a: int, b: int) -> bool:
        return self.groups is None or self.groups.get(a, 0) == self.groups.get(b, 0)

    def _deliver(self, f: InFlight) -> None:
        m = f.msg
        dst = self.nodes.get(m.to)
        if dst is None or dst.raw is None or not self._connected(m.frm, m.to):
            self._on_drop(m)
            if (dst is not None and dst.raw is None) or not self._connected(m.frm, m.to):
                sender = self.nodes.get(m.frm)
                if sender is not None and sender.raw is not None and self.rng.random() < 0.3:
                    sender.raw.report_unreachable(m.to)
            return
        self.stats["events"] += 1
        if m.type == MessageType.SNAP:
            self.stats["snapshots_sent"] += 1
        dst.raw.step(m)
        if m.type == MessageType.SNAP:
            sender = self.nodes.get(m.frm)
            if sender is not None and sender.raw is not None:
                sender.raw.report_snapshot(m.to, SnapshotStatus.FINISH)
        self._check_leaders()

    # -- the driver loop of one node (the Ready contract) ----------------------------------------------------

    def process_ready(self, node: SimNode, crash_after_persist: bool = False) -> None:
        raw = node.raw
        if raw is None or not raw.has_ready():
            return
        rd = raw.ready()
        self.stats["events"] += 1
        if self.rng.random() < 0.15:
            # The driver may keep stepping messages while it persists a Ready (etcd allows this too).
            self._deliver_some_to(node, 2)
            if node.raw is not raw:
                return
        self._persist(node, rd)
        if crash_after_persist:
            self._crash(node, "after persisting, before sending")
            return
        for m in rd.messages:
            self._send(m)
        self._apply(node, rd)
        raw.advance(rd)
        self._check_leaders()

    def _persist(self, node: SimNode, rd: Ready) -> None:
        st = node.storage
        raw = node.raw
        assert raw is not None
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
            idx, h = _decode_app_snapshot(rd.snapshot.data)
            if idx != rd.snapshot.index:
                self.fail(f"node {node.id}: snapshot data index {idx} != metadata index {rd.snapshot.index}")
            self._check_hash(node.id, idx, h)
            node.app_index, node.app_hash = idx, h
            node.conf_state = rd.snapshot.metadata.conf_state
            self.log(f"n{node.id} restored snapshot @{idx}")
        if rd.entries:
            st.append(rd.entries)
            for e in rd.entries:
                try:
                    prev_term = st.term(e.index - 1)
                except Exception:
                    prev_term = -1
                key = (e.index, e.term)
                val = (int(e.type), e.data, prev_term)
                seen = self.entries_seen.get(key)
                if seen is None:
                    self.entries_seen[key] = val
                elif seen[:2] != val[:2] or (seen[2] != val[2] and -1 not in (seen[2], val[2])):
                    self.fail(f"log matching: node {node.id} has {key}={val}, another node had {seen}")
        if rd.hard_state is not None:
            old = st.hard_state.commit
            st.set_hard_state(rd.hard_state)
            log = raw.raft.raft_log
            for i in range(max(old + 1, log.first_index()), rd.hard_state.commit + 1):
                t = log.zero_term_on_compacted(i)
                known = self.committed_terms.get(i)
                if known is None:
                    self.committed_terms[i] = t
                elif known != t:
                    self.fail(
                        f"committed entry {i}: node {node.id} has term {t}, committed elsewhere as {known}"
                    )

    def _check_hash(self, node_id: int, index: int, h: bytes) -> None:
        known = self.hash_at.get(index)
        if known is None:
            self.hash_at[index] = h
        elif known != h:
            self.fail(f"state machine safety: node {node_id} state after {index} differs from another node's")

    def _apply(self, node: SimNode, rd: Ready) -> None:
        raw = node.raw
        assert raw is not None
        for e in rd.committed_entries:
            if e.index != node.app_index + 1:
                self.fail(f"node {node.id}: applying {e.index} after {node.app_index} (gap or replay)")
            node.app_hash = hashlib.sha256(
                node.app_hash + struct.pack(">QB", e.term, e.type) + e.data
            ).digest()[:16]
            node.app_index = e.index
            self._check_hash(node.id, e.index, node.app_hash)
            if e.type == EntryType.CONF_CHANGE:
                cc = ConfChange.decode(e.data)
                node.conf_state = raw.apply_conf_change(cc)
                self.log(
                    f"n{node.id} applied conf {cc.type.name} {cc.node_id} @{e.index} -> {node.conf_state}"
                )
            p = node.proposals.pop(e.index, None)
            if p is not None and p == (e.term, e.data):
                prev = self.acked.get(e.index)
                if prev is not None and prev != p:
                    self.fail(f"two different writes acknowledged at index {e.index}")
                self.acked[e.index] = p
                self.max_acked = max(self.max_acked, e.index)
                self.stats["acked"] += 1
        for rs in rd.read_states:
            floor = node.reads.pop(rs.request_ctx, None)
            if floor is None:
                continue
            if rs.index < floor:
                self.fail(
                    f"read index {rs.index} at node {node.id} misses a write acknowledged "
                    f"before the read (index {floor})"
                )
            if node.app_index < rs.index:
                self.fail(
                    f"read state {rs.index} released at node {node.id} before it applied it "
                    f"({node.app_index})"
                )
            self.stats["reads"] += 1

    def _check_leaders(self) -> None:
        for n in self.nodes.values():
            raw = n.raw
            if raw is None or raw.raft.state != StateType.LEADER:
                continue
            term = raw.raft.term
            known = self.leader_of_term.get(term)
            if known is None:
                self.leader_of_term[term] = n.id
                self.stats["elections"] += 1
                self.log(f"n{n.id} became leader of term {term}")
                self._check_leader_completeness(n)
            elif known != n.id:
                self.fail(f"election safety: nodes {known} and {n.id} are both leaders of term {term}")

    def _check_leader_completeness(self, n: SimNode) -> None:
        assert n.raw is not None
        log = n.raw.raft.raft_log
        first = log.first_index()
        last = log.last_index()
        for i, t in self.committed_terms.items():
            if i < first:
                continue
            if i > last or log.zero_term_on_compacted(i) != t:
                self.fail(f"leader completeness: new leader {n.id} lacks committed entry {i} (term {t})")

    # -- faults and clients ----------------------------------------------------------------------------------

    def _crash(self, node: SimNode, how: str) -> None:
        node.raw = None
        node.down_until = self.now + self.rng.randint(5, 60)
        self.stats["crashes"] += 1
        self.log(f"n{node.id} crashed ({how})")

    def _maybe_faults(self) -> None:
        p = self.p
        alive = self.alive()
        if alive and self.rng.random() < p.crash:
            node = self.rng.choice(alive)
            if self.rng.random() < 0.3 and node.raw is not None and node.raw.has_ready():
                self.process_ready(node, crash_after_persist=True)
            else:
                self._crash(node, "pending Ready lost")
        if self.rng.random() < p.crash_leader:
            lead = self.leader()
            if lead is not None:
                if self.rng.random() < 0.5 and lead.raw is not None and lead.raw.has_ready():
                    self.process_ready(lead, crash_after_persist=True)
                else:
                    self._crash(lead, "leader, pending Ready lost")
                lead.down_until = self.now + self.rng.randint(1, 25)
        for node in self.nodes.values():
            if node.raw is None and node.id not in self.removed and node.down_until <= self.now:
                self._start(node)
                self.log(f"n{node.id} restarted at applied={node.app_index}")
        if self.rng.random() < p.partition:
            if self.groups is None:
                ids = list(self.nodes)
                self.groups = {i: self.rng.randrange(2) for i in ids}
                self.log(f"partition {self.groups}")
            else:
                self.groups = None
                self.log("heal")

    def _client_ops(self) -> None:
        p = self.p
        alive = self.alive()
        if not alive:
            return
        k = int(p.propose) + (1 if self.rng.random() < p.propose - int(p.propose) else 0)
        for _ in range(k):
            node = self.rng.choice(alive)
            self._propose(node)
        if self.rng.random() < p.read:
            node = self.rng.choice(alive)
            assert node.raw is not None
            self.read_counter += 1
            ctx = b"r%d" % self.read_counter
            try:
                node.raw.read_index(ctx)
                node.reads[ctx] = self.max_acked
            except NotLeader:
                pass
        if self.rng.random() < p.conf:
            self._conf_change()
        if self.rng.random() < p.transfer:
            lead = self.leader()
            if lead is not None and lead.raw is not None:
                voters = [v for v in lead.raw.raft.prs.voters.voters if v != lead.id]
                if voters:
                    to = self.rng.choice(voters)
                    self.stats["transfers"] += 1
                    self.log(f"transfer leadership {lead.id} -> {to}")
                    lead.raw.transfer_leadership(to)
        if self.rng.random() < p.snapshot:
            node = self.rng.choice(alive)
            self._snapshot(node)

    def _propose(self, node: SimNode) -> None:
        assert node.raw is not None
        self.proposal_counter += 1
        data = b"w%d" % self.proposal_counter
        try:
            index, term = node.raw.propose(data)
        except (NotLeader, ProposalDropped):
            return
        node.proposals[index] = (term, data)
        self.stats["proposed"] += 1

    def _conf_change(self) -> None:
        lead = self.leader()
        if lead is None or lead.raw is None:
            return
        prs = lead.raw.raft.prs
        voters = sorted(prs.voters.voters)
        learners = sorted(prs.learners)
        choices: list[ConfChange] = []
        if len(voters) + len(learners) < self.p.n + 2:
            choices.append(ConfChange(ConfChangeType.ADD_LEARNER, self.next_id))
        for lid in learners:
            choices.append(ConfChange(ConfChangeType.ADD_NODE, lid))
            choices.append(ConfChange(ConfChangeType.REMOVE_NODE, lid))
        if len(voters) > 3:
            choices.extend(ConfChange(ConfChangeType.REMOVE_NODE, v) for v in voters)
        if not choices:
            return
        cc = self.rng.choice(choices)
        try:
            lead.raw.propose_conf_change(cc)
        except ProposalDropped:
            return
        self.stats["conf_changes"] += 1
        self.log(f"n{lead.id} proposed {cc.type.name} {cc.node_id}")
        if cc.type == ConfChangeType.ADD_LEARNER:
            self.next_id += 1
            new = SimNode(cc.node_id, MemoryStorage())
            self.nodes[cc.node_id] = new
            self._start(new)

    def _snapshot(self, node: SimNode) -> None:
        st = node.storage
        if node.app_index <= st.snapshot().index or node.app_index > st.last_index():
            return
        st.create_snapshot(
            node.app_index, node.conf_state, _encode_app_snapshot(node.app_index, node.app_hash)
        )
        keep = self.rng.choice((0, 2, 10))
        compact_to = node.app_index - keep
        if compact_to >= st.first_index():
            st.compact(compact_to)
        self.log(f"n{node.id} snapshot @{node.app_index}, compacted to {compact_to}")

    # -- schedule --------------------------------------------------------------------------------------------

    def _round(self, faults: bool) -> None:
        rng = self.rng
        if faults:
            self._maybe_faults()
            self._client_ops()
        due = [f for f in self.net if f.deliver_at <= self.now]
        if due:
            self.net = [f for f in self.net if f.deliver_at > self.now]
            rng.shuffle(due)
            for f in due:
                self._deliver(f)
                dst = self.nodes.get(f.msg.to)
                if dst is None or dst.raw is None:
                    continue
                if faults and rng.random() < self.p.crash / 4:
                    # Crash right after handling a message: its Ready is lost, or persisted but never sent.
                    if rng.random() < 0.5 and dst.raw.has_ready():
                        self.process_ready(dst, crash_after_persist=True)
                    else:
                        self._crash(dst, "mid-round, pending Ready lost")
                elif rng.random() < 0.3:
                    self.process_ready(dst)
        for node in list(self.nodes.values()):
            if not faults or rng.random() < 0.95:
                self.process_ready(node)
        for node in self.alive():
            if not faults or rng.random() < 0.97:
                assert node.raw is not None
                node.raw.tick()
        self._check_leaders()
        self.now += 1

    def members(self) -> set[int]:
        lead = self.leader()
        if lead is None or lead.raw is None:
            return set()
        prs = lead.raw.raft.prs
        return set(prs.voters.voters) | set(prs.learners)

    def run(self) -> None:
        for _ in range(self.p.rounds):
            self._round(faults=True)
        self.settle()

    def _progress_mark(self) -> tuple[int, ...]:
        mark = []
        for n in self.nodes.values():
            if n.raw is not None:
                log = n.raw.raft.raft_log
                mark += [n.raw.raft.term, log.committed, log.last_index(), n.app_index]
                if n.raw.raft.state == StateType.LEADER:
                    mark += [pr.match for _, pr in n.raw.raft.prs]
        return tuple(mark)

    def settle(self, stall_rounds: int = 300, max_rounds: int = 20_000) -> None:
        """Heal everything and require every acknowledged write to be applied by every member.

        The cluster may take as long as it needs while it makes progress (a slow profile with one entry per
        append and one append in flight has a long backlog to ship); it fails once ``stall_rounds`` pass
        without any node's term, log, commit or applied index moving.
        """
        last_mark: tuple[int, ...] = ()
        last_change = 0
        self.groups = None
        self.log("final heal")
        self.p.drop = 0.0
        self.p.dup = 0.0
        for node in self.nodes.values():
            if node.raw is None and node.id not in self.removed:
                self._start(node)
        for i in range(max_rounds):
            self._round(faults=False)
            mark = self._progress_mark()
            if mark != last_mark:
                last_mark, last_change = mark, i
            elif i - last_change > stall_rounds:
                break
            lead = self.leader()
            if lead is None or lead.raw is None:
                continue
            members = self.members()
            log = lead.raw.raft.raft_log
            if log.applied < log.last_index():
                continue  # membership may still change
            # Nodes outside the final membership are shut down, as an operator would.
            for node in self.nodes.values():
                if node.id not in members and node.raw is not None and node.id not in self.removed:
                    self.removed.add(node.id)
                    node.raw = None
            log = lead.raw.raft.raft_log
            if (
                log.committed < self.max_acked
                or log.zero_term_on_compacted(log.committed) != lead.raw.raft.term
            ):
                continue
            if all(
                self.nodes[m].raw is not None and self.nodes[m].app_index >= log.committed
                for m in members
                if m in self.nodes
            ):
                return
        lead = self.leader()
        states = {
            n.id: (
                None
                if n.raw is None
                else (n.raw.raft.state.name, n.raw.raft.term, n.raw.raft.raft_log.committed, n.app_index)
            )
            for n in self.nodes.values()
        }
        self.fail(
            f"liveness: cluster did not converge after healing (max acked {self.max_acked}, "
            f"leader {lead.id if lead else None}, nodes {states})"
        )
