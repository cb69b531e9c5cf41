"""The Raft paper (Ongaro & Ousterhout, "In Search of an Understandable Consensus Algorithm"), section by
section.

Each test is named after the section whose rule it checks, as in etcd's ``raft_paper_test.go``.
"""

from __future__ import annotations

import pytest

from tunnelmesh.coord.raft.core import Raft
from tunnelmesh.coord.raft.errors import NotLeader
from tunnelmesh.coord.raft.memory_storage import MemoryStorage
from tunnelmesh.coord.raft.messages import NONE, Entry, Message, MessageType, StateType

from .harness import Network, commit_noop_entry, ents_with_terms, new_raft, read_messages, storage_with

M = MessageType

# -- §5.1 Raft basics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [StateType.FOLLOWER, StateType.CANDIDATE, StateType.LEADER])
def test_5_1_server_with_smaller_term_updates_term_and_reverts_to_follower(state: StateType) -> None:
    r = new_raft(1, [1, 2, 3])
    if state == StateType.CANDIDATE:
        r.become_candidate()
    elif state == StateType.LEADER:
        r.become_candidate()
        r.become_leader()
    r.step(Message(M.APP, frm=2, to=1, term=2))
    assert r.term == 2
    assert r.state == StateType.FOLLOWER
    assert r.lead == 2


def test_5_1_stale_term_requests_are_rejected() -> None:
    r = new_raft(1, [1, 2, 3])
    r.become_follower(2, NONE)
    called = []
    orig = r._step
    r._step = lambda m: (called.append(m), orig(m))  # type: ignore[assignment,func-returns-value]
    r.step(Message(M.APP, frm=2, to=1, term=1))
    assert called == []
    assert r.term == 2


def test_5_2_servers_start_as_followers() -> None:
    r = new_raft(1, [1, 2, 3])
    assert r.state == StateType.FOLLOWER
    assert r.term == 0


# -- §5.2 Leader election ------------------------------------------------------------------------------------


def test_5_2_leader_sends_heartbeats_to_all_followers() -> None:
    hb = 1
    r = new_raft(1, [1, 2, 3], heartbeat=hb)
    r.become_candidate()
    r.become_leader()
    read_messages(r)
    for _ in range(hb):
        r.tick()
    msgs = sorted(read_messages(r), key=lambda m: m.to)
    assert [(m.type, m.to, m.term) for m in msgs] == [(M.HEARTBEAT, 2, 1), (M.HEARTBEAT, 3, 1)]


@pytest.mark.parametrize("state", [StateType.FOLLOWER, StateType.CANDIDATE])
def test_5_2_follower_without_contact_becomes_candidate(state: StateType) -> None:
    """A follower (or a candidate whose election timed out) starts a new election."""
    et = 10
    r = new_raft(1, [1, 2, 3], election=et)
    if state == StateType.CANDIDATE:
        r.become_candidate()
    term = r.term
    for _ in range(2 * et):
        r.tick()
    assert r.state == StateType.CANDIDATE
    assert r.term == term + 1
    assert r.vote == 1
    msgs = sorted(read_messages(r), key=lambda m: m.to)
    assert [(m.type, m.to, m.term) for m in msgs] == [(M.VOTE, 2, term + 1), (M.VOTE, 3, term + 1)]


@pytest.mark.parametrize(
    ("size", "votes", "want"),
    [
        (1, {}, StateType.LEADER),
        (3, {2: True, 3: True}, StateType.LEADER),
        (3, {2: True}, StateType.LEADER),
        (5, {2: True, 3: True, 4: True, 5: True}, StateType.LEADER),
        (5, {2: True, 3: True, 4: True}, StateType.LEADER),
        (5, {2: True, 3: True}, StateType.LEADER),
        (3, {2: False, 3: False}, StateType.FOLLOWER),  # lost: a majority rejected
        (5, {2: False, 3: False, 4: False}, StateType.FOLLOWER),
        (3, {}, StateType.CANDIDATE),  # no quorum yet: keep waiting
        (5, {2: True}, StateType.CANDIDATE),
        (5, {2: False, 3: False}, StateType.CANDIDATE),
    ],
)
def test_5_2_candidate_wins_election_with_majority_of_votes(
    size: int, votes: dict[int, bool], want: StateType
) -> None:
    peers = list(range(1, size + 1))
    r = new_raft(1, peers)
    r.step(Message(M.HUP, frm=1, to=1))
    for frm, granted in votes.items():
        r.step(Message(M.VOTE_RESP, frm=frm, to=1, term=r.term, reject=not granted))
    assert r.state == want
    assert r.term == 1


@pytest.mark.parametrize(
    ("vote", "nvote", "want_reject"),
    [
        (NONE, 2, False),
        (NONE, 3, False),
        (2, 2, False),  # the same candidate may ask again
        (3, 3, False),
        (2, 3, True),  # at most one vote per term, first come first served
        (3, 2, True),
    ],
)
def test_5_2_follower_votes_for_at_most_one_candidate_per_term(
    vote: int, nvote: int, want_reject: bool
) -> None:
    r = new_raft(1, [1, 2, 3])
    r.term = 1
    r.vote = vote
    r.step(Message(M.VOTE, frm=nvote, to=1, term=1))
    msgs = read_messages(r)
    assert [(m.type, m.to, m.term, m.reject) for m in msgs] == [(M.VOTE_RESP, nvote, 1, want_reject)]


@pytest.mark.parametrize("leader_term", [1, 2])
def test_5_2_candidate_falls_back_to_follower_on_append_from_leader(leader_term: int) -> None:
    r = new_raft(1, [1, 2, 3])
    r.step(Message(M.HUP, frm=1, to=1))
    assert r.state == StateType.CANDIDATE
    r.step(Message(M.APP, frm=2, to=1, term=leader_term))
    assert r.state == StateType.FOLLOWER
    assert r.term == leader_term


@pytest.mark.parametrize("state", [StateType.FOLLOWER, StateType.CANDIDATE])
def test_5_2_election_timeout_is_randomized_over_one_timeout_range(state: StateType) -> None:
    et = 10
    seen = set()
    for seed in range(200):
        r = new_raft(1, [1, 2, 3], election=et, seed=seed)
        if state == StateType.CANDIDATE:
            r.become_candidate()
        term = r.term
        for t in range(1, 2 * et + 1):
            r.tick()
            if r.term > term:
                seen.add(t)
                break
    assert seen == set(range(et, 2 * et))


def test_5_2_election_timeouts_rarely_conflict() -> None:
    """With randomized timeouts, two candidates time out in the same tick rarely (< 30% of rounds)."""
    conflicts = 0
    rounds = 500
    for seed in range(rounds):
        a = new_raft(1, [1, 2, 3], seed=seed)
        b = new_raft(2, [1, 2, 3], seed=seed + 7919)
        for _ in range(20):
            a.tick()
            b.tick()
            if a.state == StateType.CANDIDATE or b.state == StateType.CANDIDATE:
                break
        if a.state == StateType.CANDIDATE and b.state == StateType.CANDIDATE:
            conflicts += 1
    assert conflicts / rounds < 0.3


def test_5_2_proposal_to_follower_is_rejected_with_leader_hint() -> None:
    nt = Network(None, None, None)
    nt.hup(1)
    with pytest.raises(NotLeader) as exc:
        nt.propose(2)
    assert exc.value.leader_id == 1
    assert "forward to leader 1" in str(exc.value)


# -- §5.3 Log replication ------------------------------------------------------------------------------------


def _elected_leader(size: int = 3) -> tuple[Raft, MemoryStorage]:
    st = storage_with(list(range(1, size + 1)))
    r = new_raft(1, list(range(1, size + 1)), storage=st)
    r.become_candidate()
    r.become_leader()
    commit_noop_entry(r, st)
    return r, st


def test_5_3_leader_appends_proposal_and_starts_replication() -> None:
    r, _ = _elected_leader()
    r.step(Message(M.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"some data"),)))
    assert r.raft_log.last_index() == 2
    msgs = sorted(read_messages(r), key=lambda m: m.to)
    want_ent = (Entry(2, 1, data=b"some data"),)
    assert [(m.type, m.to, m.index, m.log_term, m.entries, m.commit) for m in msgs] == [
        (M.APP, 2, 1, 1, want_ent, 1),
        (M.APP, 3, 1, 1, want_ent, 1),
    ]
    assert r.raft_log.unstable_entries() == list(want_ent)


def test_5_3_leader_commits_entry_once_replicated_on_a_majority_and_tells_followers() -> None:
    r, _ = _elected_leader()
    r.step(Message(M.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"some data"),)))
    for m in read_messages(r):
        r.step(Message(M.APP_RESP, frm=m.to, to=1, term=m.term, index=m.index + len(m.entries)))
    assert r.raft_log.committed == 2
    assert r.raft_log.next_committed_entries() == [Entry(2, 1, data=b"some data")]
    msgs = read_messages(r)
    assert sorted((m.to, m.type, m.commit) for m in msgs) == [(2, M.APP, 2), (3, M.APP, 2)]


@pytest.mark.parametrize(
    ("size", "acceptors", "want_commit"),
    [
        (1, set(), True),
        (3, set(), False),
        (3, {2}, True),
        (3, {2, 3}, True),
        (5, set(), False),
        (5, {2}, False),
        (5, {2, 3}, True),
        (5, {2, 3, 4}, True),
        (5, {2, 3, 4, 5}, True),
    ],
)
def test_5_3_leader_acknowledges_commit_only_with_a_majority(
    size: int, acceptors: set[int], want_commit: bool
) -> None:
    r, _ = _elected_leader(size)
    r.step(Message(M.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"x"),)))
    for m in read_messages(r):
        if m.to in acceptors:
            r.step(Message(M.APP_RESP, frm=m.to, to=1, term=m.term, index=m.index + len(m.entries)))
    assert (r.raft_log.committed > 1) == want_commit


@pytest.mark.parametrize("prev_terms", [[], [2], [1, 1], [1, 2]])
def test_5_3_leader_commit_also_commits_preceding_entries(prev_terms: list[int]) -> None:
    st = storage_with([1, 2, 3], ents=ents_with_terms(*prev_terms))
    r = new_raft(1, [1, 2, 3], storage=st)
    r.term = 2
    r.become_candidate()
    r.become_leader()
    r.step(Message(M.PROP, frm=1, to=1, entries=(Entry(0, 0, data=b"some data"),)))
    for m in read_messages(r):
        r.step(Message(M.APP_RESP, frm=m.to, to=1, term=m.term, index=m.index + len(m.entries)))
    li = len(prev_terms)
    want = [*ents_with_terms(*prev_terms), Entry(li + 1, 3), Entry(li + 2, 3, data=b"some data")]
    assert r.raft_log.next_committed_entries() == want


@pytest.mark.parametrize(
    ("ents", "commit"),
    [
        ([Entry(1, 1, data=b"a")], 1),
        ([Entry(1, 1, data=b"a"), Entry(2, 1, data=b"b")], 1),
        ([Entry(1, 1, data=b"a"), Entry(2, 1, data=b"b")], 2),
    ],
)
def test_5_3_follower_learns_commit_index_and_applies_in_order(ents: list[Entry], commit: int) -> None:
    r = new_raft(1, [1, 2, 3])
    r.become_follower(1, 2)
    r.step(Message(M.APP, frm=2, to=1, term=1, index=0, log_term=0, entries=tuple(ents), commit=commit))
    assert r.raft_log.committed == commit
    assert r.raft_log.next_committed_entries() == ents[:commit]


@pytest.mark.parametrize(
    ("term", "index", "want_index", "want_reject", "want_hint"),
    [
        (0, 0, 1, False, 0),  # below the commit index: answer with the commit index
        (1, 1, 1, False, 0),  # matches
        (2, 2, 2, False, 0),
        (1, 2, 2, True, 1),  # term mismatch at 2: hint the last index whose term is <= 1
        (3, 3, 3, True, 2),  # past our log: hint our last index
    ],
)
def test_5_3_follower_rejects_append_whose_previous_entry_does_not_match(
    term: int, index: int, want_index: int, want_reject: bool, want_hint: int
) -> None:
    st = storage_with([1, 2, 3], ents=ents_with_terms(1, 2))
    r = new_raft(1, [1, 2, 3], storage=st)
    r.raft_log.commit_to(1)
    r.become_follower(2, 2)
    r.step(Message(M.APP, frm=2, to=1, term=2, log_term=term, index=index))
    (m,) = read_messages(r)
    assert (m.type, m.index, m.reject, m.reject_hint) == (M.APP_RESP, want_index, want_reject, want_hint)


@pytest.mark.parametrize(
    ("index", "term", "ents", "want"),
    [
        (2, 2, [Entry(3, 3)], [1, 2, 3]),
        (1, 1, [Entry(2, 3), Entry(3, 4)], [1, 3, 4]),  # conflict: truncate and replace
        (0, 0, [Entry(1, 1)], [1, 2]),  # already present: nothing truncated
        (0, 0, [Entry(1, 3)], [3]),
    ],
)
def test_5_3_follower_deletes_conflicting_entries_and_appends_new_ones(
    index: int, term: int, ents: list[Entry], want: list[int]
) -> None:
    st = storage_with([1, 2, 3], ents=ents_with_terms(1, 2))
    r = new_raft(1, [1, 2, 3], storage=st)
    r.become_follower(2, 2)
    r.step(Message(M.APP, frm=2, to=1, term=2, log_term=term, index=index, entries=tuple(ents)))
    got = [r.raft_log.term(i) for i in range(1, r.raft_log.last_index() + 1)]
    assert got == want


FIGURE_7_LEADER = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FIGURE_7_FOLLOWERS = {
    "a": [1, 1, 1, 4, 4, 5, 5, 6, 6],
    "b": [1, 1, 1, 4],
    "c": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    "d": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    "e": [1, 1, 1, 4, 4, 4, 4],
    "f": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
}


@pytest.mark.parametrize("follower", sorted(FIGURE_7_FOLLOWERS))
def test_5_3_leader_brings_follower_log_into_consistency_figure_7(follower: str) -> None:
    lead_st = storage_with([1, 2, 3], ents=ents_with_terms(*FIGURE_7_LEADER))
    lead = new_raft(1, [1, 2, 3], storage=lead_st)
    lead.term = 7
    lead.raft_log.commit_to(len(FIGURE_7_LEADER))
    fol_st = storage_with([1, 2, 3], ents=ents_with_terms(*FIGURE_7_FOLLOWERS[follower]))
    fol = new_raft(2, [1, 2, 3], storage=fol_st)
    fol.term = 7
    nt = Network(lead, fol, None)
    nt.hup(1)
    # Node 3 votes for us, node 2 may refuse (its log can be longer); then replicate.
    nt.send(Message(M.VOTE_RESP, frm=3, to=1, term=lead.term))
    nt.propose(1, b"")
    want = [lead.raft_log.term(i) for i in range(1, lead.raft_log.last_index() + 1)]
    got = [fol.raft_log.term(i) for i in range(1, fol.raft_log.last_index() + 1)]
    assert got == want


# -- §5.4 Safety ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log_terms", "cand_index", "cand_term", "want_reject"),
    [
        # §5.4.1: grant only to a candidate whose log is at least as up-to-date as ours.
        ([1, 1], 2, 2, False),  # higher last term
        ([1, 1], 3, 1, False),  # same last term, longer
        ([1, 1], 2, 1, False),  # identical
        ([1, 1], 1, 1, True),  # same last term, shorter
        ([1, 2], 3, 1, True),  # lower last term, even though longer
        ([1, 2], 2, 2, False),
        ([1, 2], 1, 2, True),
    ],
)
def test_5_4_1_voter_grants_only_to_up_to_date_candidates(
    log_terms: list[int], cand_index: int, cand_term: int, want_reject: bool
) -> None:
    st = storage_with([1, 2, 3], ents=ents_with_terms(*log_terms))
    r = new_raft(1, [1, 2, 3], storage=st)
    r.step(Message(M.VOTE, frm=2, to=1, term=3, log_term=cand_term, index=cand_index))
    (m,) = read_messages(r)
    assert (m.type, m.reject) == (M.VOTE_RESP, want_reject)


def test_5_4_1_candidate_requests_votes_with_its_last_log_position() -> None:
    st = storage_with([1, 2, 3], ents=ents_with_terms(1, 2, 2))
    r = new_raft(1, [1, 2, 3], storage=st)
    r.term = 2
    r.step(Message(M.HUP, frm=1, to=1))
    msgs = read_messages(r)
    assert {(m.type, m.index, m.log_term, m.term) for m in msgs} == {(M.VOTE, 3, 2, 3)}


@pytest.mark.parametrize(("index", "want_commit"), [(1, 0), (2, 0), (3, 3)])
def test_5_4_2_leader_only_commits_entries_from_its_current_term(index: int, want_commit: int) -> None:
    """Entries of earlier terms are never committed by counting replicas; only the new term's entry commits
    them."""
    st = storage_with([1, 2], ents=ents_with_terms(1, 2))
    r = new_raft(1, [1, 2], storage=st)
    r.term = 2
    r.become_candidate()  # term 3
    r.become_leader()  # appends entry 3 at term 3
    read_messages(r)
    r.step(Message(M.APP_RESP, frm=2, to=1, term=r.term, index=index))
    assert r.raft_log.committed == want_commit


def test_5_4_2_figure_8_old_term_entry_replicated_on_majority_is_not_committed() -> None:
    """Figure 8 (c): S1 re-elected in term 4 replicates its term-2 entry to a majority, but must not commit
    it: S5, holding a term-3 entry at that index, could still be elected and overwrite it."""
    peers = [1, 2, 3, 4, 5]
    logs = {1: [1, 2], 2: [1, 2], 3: [1], 4: [1], 5: [1, 3]}
    nodes = []
    for i in peers:
        r = new_raft(i, peers, storage=storage_with(peers, ents=ents_with_terms(*logs[i])))
        r.term = 3
        nodes.append(r)
    nt = Network(*nodes)
    nt.ignore(M.APP)  # the election happens without replication at first
    nt.hup(1)  # term 4; S1's log (2, term 2) is as up-to-date as S2-S4's
    s1 = nt.peers[1]
    assert s1.state == StateType.LEADER and s1.term == 4
    # S1 gets its term-2 entry (only) onto S3: a majority {S1, S2, S3} now holds index 2.
    s1.step(Message(M.APP_RESP, frm=2, to=1, term=4, index=2))
    s1.step(Message(M.APP_RESP, frm=3, to=1, term=4, index=2))
    assert s1.raft_log.committed == 0, "a term-2 entry must not commit by counting replicas in term 4"
    # Once the term-4 entry reaches a majority, everything up to it commits.
    s1.step(Message(M.APP_RESP, frm=2, to=1, term=4, index=3))
    assert s1.raft_log.committed == 0
    s1.step(Message(M.APP_RESP, frm=3, to=1, term=4, index=3))
    assert s1.raft_log.committed == 3
