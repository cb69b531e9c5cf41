"""Data-driven scenarios: ``testdata/*.txt`` files replayed against a cluster of ``RawNode`` drivers.

Each file is a sequence of commands, one per line; ``#`` starts a comment, usually citing the rule being
checked.

* ``cluster 1,2,3 [pre_vote=1] [check_quorum=1]``: the founding voters.
* ``campaign N``: node N starts an election now.
* ``propose N DATA``: a client write at node N (``propose! N DATA`` expects NotLeader / ProposalDropped).
* ``conf N add|learner|remove M``: node N proposes a membership change for M (``conf!`` expects a refusal).
* ``transfer N M``: ask leader N to hand leadership to M.
* ``read N CTX``: a ReadIndex request at node N.
* ``isolate N`` / ``cut A B`` / ``heal``: drop the traffic of N / between A and B; restore every link.
* ``crash N`` / ``restart N``: lose N's volatile state, un-persisted Ready included / rebuild it from storage.
* ``snapshot N``: N's application snapshots at its applied index and compacts its log.
* ``tick N K`` / ``tick * K``: K ticks to node N or to every live node, stabilizing after each.
* ``stabilize``: handle Readies and deliver messages until the cluster is quiet (every command but
  ``isolate``, ``cut``, ``heal``, ``crash`` and ``snapshot`` ends with it).
* ``expect N key=val ...``: assert ``state``, ``term``, ``lead``, ``commit``, ``applied``, ``last``,
  ``voters``, ``learners``, ``reads`` (served read contexts) or ``data`` (applied payloads), comma-separated
  lists.
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path

import pytest

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
    SnapshotStatus,
)
from tunnelmesh.coord.raft.rawnode import RawNode

TESTDATA = Path(__file__).parent / "testdata"
CONF_KINDS = {
    "add": ConfChangeType.ADD_NODE,
    "learner": ConfChangeType.ADD_LEARNER,
    "remove": ConfChangeType.REMOVE_NODE,
}


class Cluster:
    def __init__(self, voters: list[int], opts: dict[str, str]) -> None:
        self.opts = opts
        self.storage: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RawNode | None] = {}
        self.applied: dict[int, list[bytes]] = {}
        self.reads: dict[int, list[bytes]] = {}
        self.conf: dict[int, ConfState] = {}
        self.cut: set[tuple[int, int]] = set()
        self.queue: deque[Message] = deque()
        for v in voters:
            self.storage[v] = MemoryStorage.bootstrap(voters)
            self.start(v)

    def start(self, node_id: int) -> None:
        st = self.storage.setdefault(node_id, MemoryStorage())
        cfg = Config(
            id=node_id,
            pre_vote=self.opts.get("pre_vote", "0") == "1",
            check_quorum=self.opts.get("check_quorum", "0") == "1",
            applied=st.snapshot().index,
        )
        self.nodes[node_id] = RawNode(cfg, st, random.Random(node_id))
        self.applied[node_id] = []
        self.reads.setdefault(node_id, [])
        self.conf[node_id] = st.snapshot().metadata.conf_state

    def node(self, node_id: int) -> RawNode:
        rn = self.nodes.get(node_id)
        if rn is None:
            raise AssertionError(f"node {node_id} is down")
        return rn

    def handle_ready(self, node_id: int) -> bool:
        rn = self.nodes.get(node_id)
        if rn is None or not rn.has_ready():
            return False
        st = self.storage[node_id]
        rd = rn.ready()
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
            self.conf[node_id] = rd.snapshot.metadata.conf_state
        st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        self.queue.extend(rd.messages)
        for e in rd.committed_entries:
            if e.type == EntryType.CONF_CHANGE:
                self.conf[node_id] = rn.apply_conf_change(ConfChange.decode(e.data))
            elif e.data:
                self.applied[node_id].append(e.data)
        self.reads[node_id].extend(rs.request_ctx for rs in rd.read_states)
        rn.advance(rd)
        return True

    def stabilize(self) -> None:
        for _ in range(10_000):
            busy = False
            for node_id in sorted(self.nodes):
                busy |= self.handle_ready(node_id)
            while self.queue:
                busy = True
                m = self.queue.popleft()
                dst = self.nodes.get(m.to)
                if dst is None or (m.frm, m.to) in self.cut:
                    if m.type == MessageType.SNAP and self.nodes.get(m.frm) is not None:
                        self.node(m.frm).report_snapshot(m.to, SnapshotStatus.FAILURE)
                    continue
                dst.step(m)
                if m.type == MessageType.SNAP and self.nodes.get(m.frm) is not None:
                    self.node(m.frm).report_snapshot(m.to, SnapshotStatus.FINISH)
            if not busy:
                return
        raise AssertionError("cluster did not quiesce")

    def value(self, node_id: int, key: str) -> str:
        rn = self.node(node_id)
        r = rn.raft
        if key == "state":
            return r.state.name
        if key == "term":
            return str(r.term)
        if key == "lead":
            return str(r.lead)
        if key == "commit":
            return str(r.raft_log.committed)
        if key == "applied":
            return str(r.raft_log.applied)
        if key == "last":
            return str(r.raft_log.last_index())
        if key == "voters":
            return ",".join(map(str, self.conf[node_id].voters))
        if key == "learners":
            return ",".join(map(str, self.conf[node_id].learners))
        if key == "reads":
            return ",".join(c.decode() for c in self.reads[node_id])
        if key == "data":
            return ",".join(d.decode() for d in self.applied[node_id])
        raise AssertionError(f"unknown key {key!r}")


def run_scenario(path: Path) -> None:
    cluster: Cluster | None = None
    for lineno, raw_line in enumerate(path.read_text().splitlines(), 1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path.name}:{lineno}: {raw_line.strip()}"
        cmd, *args = line.split()
        try:
            if cmd == "cluster":
                opts = dict(a.split("=", 1) for a in args[1:])
                cluster = Cluster([int(x) for x in args[0].split(",")], opts)
                continue
            assert cluster is not None, "the first command must be 'cluster'"
            c = cluster
            if cmd == "campaign":
                c.node(int(args[0])).campaign()
                c.stabilize()
            elif cmd in ("propose", "propose!"):
                try:
                    c.node(int(args[0])).propose(args[1].encode())
                except (NotLeader, ProposalDropped):
                    assert cmd == "propose!", "proposal was refused"
                else:
                    assert cmd == "propose", "proposal was accepted but a refusal was expected"
                c.stabilize()
            elif cmd in ("conf", "conf!"):
                node_id, kind, target = int(args[0]), args[1], int(args[2])
                if kind == "learner" and target not in c.nodes:
                    c.start(target)
                try:
                    c.node(node_id).propose_conf_change(ConfChange(CONF_KINDS[kind], target))
                except (NotLeader, ProposalDropped):
                    assert cmd == "conf!", "conf change was refused"
                else:
                    assert cmd == "conf", "conf change was accepted but a refusal was expected"
                c.stabilize()
            elif cmd == "transfer":
                c.node(int(args[0])).transfer_leadership(int(args[1]))
                c.stabilize()
            elif cmd == "read":
                c.node(int(args[0])).read_index(args[1].encode())
                c.stabilize()
            elif cmd == "isolate":
                n = int(args[0])
                for other in c.nodes:
                    c.cut |= {(n, other), (other, n)}
            elif cmd == "cut":
                a, b = int(args[0]), int(args[1])
                c.cut |= {(a, b), (b, a)}
            elif cmd == "heal":
                c.cut.clear()
            elif cmd == "crash":
                c.nodes[int(args[0])] = None
            elif cmd == "restart":
                c.start(int(args[0]))
                c.stabilize()
            elif cmd == "snapshot":
                n = int(args[0])
                st = c.storage[n]
                applied = c.node(n).raft.raft_log.applied
                st.create_snapshot(applied, c.conf[n], b"")
                st.compact(applied)
            elif cmd == "tick":
                targets = list(c.nodes) if args[0] == "*" else [int(args[0])]
                for _ in range(int(args[1])):
                    for n in targets:
                        rn = c.nodes.get(n)
                        if rn is not None:
                            rn.tick()
                    c.stabilize()
            elif cmd == "stabilize":
                c.stabilize()
            elif cmd == "expect":
                n = int(args[0])
                for kv in args[1:]:
                    key, want = kv.split("=", 1)
                    got = c.value(n, key)
                    assert got == want, f"node {n}: {key}={got}, want {want}"
            else:
                raise AssertionError(f"unknown command {cmd!r}")
        except AssertionError as e:
            raise AssertionError(f"{where}\n  {e}") from None


SCENARIOS = sorted(TESTDATA.glob("*.txt"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path) -> None:
    run_scenario(path)
