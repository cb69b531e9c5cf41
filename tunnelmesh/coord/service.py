"""gRPC servicers of a coordinator: KvService, AdminService (nodes, join and API tokens, the cluster),
ClusterJoinService, and the request/response half of the Raft port (Join, Propose, ProposeBatch, ReadIndex).

Writes go through ``Coordinator.write``: propose locally when this member leads; otherwise forward the
serialized ``Command`` to the leader, batched with the other writes forwarded meanwhile (``coord/forward.py``,
``Raft.ProposeBatch`` over mutual TLS). When no leader is known, or the
leader changed under the request, it retries until the request's deadline; this is safe because every
command carries the client's ``request_id`` and the state machine applies an id at most once.

Reads: ``Coordinator.read_barrier`` runs ReadIndex through the core (a follower's core forwards the request to
the leader and serves the read from its own state once it has applied the confirmed index).

Auth: API tokens and roles are checked by the interceptor of coord/auth.py before a KV or admin method runs;
the servicers only read the caller's token id (``created_by`` of what it creates).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter

from tunnelmesh import pki, tokens
from tunnelmesh.api.raft.v1 import raft_pb2
from tunnelmesh.api.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    common_pb2,
    kv_pb2,
    kv_pb2_grpc,
    state_pb2,
)
from tunnelmesh.coord import kv_session, state
from tunnelmesh.coord.auth import AuthFailure
from tunnelmesh.coord.forward import Forwarder
from tunnelmesh.coord.raft.driver import DeadlineExceeded, Driver, PeerStatus
from tunnelmesh.coord.raft.errors import NotLeader, ProposalDropped, RaftError, Stopped
from tunnelmesh.coord.raft.messages import ConfChange, ConfChangeType, StateType
from tunnelmesh.coord.raft.transport import member_label
from tunnelmesh.coord.state import (
    MAX_JOIN_TOKEN_TTL_SECONDS,
    NS_PER_SECOND,
    encode_command,
    is_label,
    ns_to_timestamp,
)

log = logging.getLogger(__name__)

R = TypeVar("R")

DEFAULT_TIMEOUT = 5.0
RETRY_PAUSE = 0.05
TRANSFER_REPEAT = 0.2  # seconds between repeats of a leadership transfer request that has not happened yet
PROMOTE_MAX_LAG = 64

_ERROR_CODES = {
    state_pb2.COMMAND_ERROR_CODE_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    state_pb2.COMMAND_ERROR_CODE_ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    state_pb2.COMMAND_ERROR_CODE_FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    state_pb2.COMMAND_ERROR_CODE_INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    state_pb2.COMMAND_ERROR_CODE_RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    state_pb2.COMMAND_ERROR_CODE_UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    state_pb2.COMMAND_ERROR_CODE_PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


_ANSWER_MARGIN = 0.2  # seconds kept back from a caller's deadline to send it our answer


def dead_voter_to_remove(voters: list[int], silent: dict[int, float], timeout: float) -> int | None:
    """The voter to remove so that a waiting learner can take its place, or None. ``silent``: seconds since
    the leader last heard from each other voter (the leader itself is not in it). Only a voter silent for
    ``timeout`` goes, the longest silent first, and only while the voters that answer make a quorum of the
    current configuration (the removal must commit in it; a quorum of the smaller one follows)."""
    dead = [v for v in voters if silent.get(v, 0.0) >= timeout]
    if not timeout or not dead:
        return None
    if len(voters) - len(dead) < len(voters) // 2 + 1:
        return None
    return max(dead, key=lambda v: silent[v])


class RequestFailed(Exception):
    """A request failed with a gRPC status the servicer returns as is."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _remaining(context: Any, default: float = DEFAULT_TIMEOUT) -> float:
    """The time a request may wait here: the caller's deadline minus a margin, so that when we give up the
    caller still receives our reason ("no leader") rather than its own bare DEADLINE_EXCEEDED."""
    left: float | None = context.time_remaining() if context is not None else None
    if left is None:
        return default
    return min(default, left - min(_ANSWER_MARGIN, left * 0.1))


class Coordinator:
    """Request handling on top of a ``Driver``: forwarding, joins, membership upkeep."""

    def __init__(
        self,
        driver: Driver,
        *,
        self_member: raft_pb2.Member,
        join_bundle: Callable[[], bytes] | None,
        max_voters: int,
        dead_voter_timeout: float = 0.0,
        ca_fingerprint: str = "",
    ) -> None:
        self.driver = driver
        self.self_member = self_member
        # "sha256:<hex>" of the cluster CA: join tokens carry it so a new node can pin the CA.
        self.ca_fingerprint = ca_fingerprint
        self._make_bundle = join_bundle
        self._bundle: bytes | None = None
        self.max_voters = max_voters
        self.dead_voter_timeout = dead_voter_timeout  # seconds; 0: never replace a silent voter
        self._leading_since: float | None = None  # monotonic time this member's current leadership began
        self._membership_lock = asyncio.Lock()
        self._forwarder = Forwarder(driver.transport)
        driver.transport.set_handler(self)

    async def join_bundle(self) -> bytes | None:
        """The encrypted cluster bundle, made on first use (PBKDF2 with 600k rounds takes ~0.5 s)."""
        if self._bundle is None and self._make_bundle is not None:
            self._bundle = await asyncio.to_thread(self._make_bundle)
        return self._bundle

    @property
    def cluster_id(self) -> str:
        return self.driver.cluster_id

    # -- writes ----------------------------------------------------------------------------------------------

    async def write(self, command: bytes, timeout: float) -> state_pb2.CommandResult:  # noqa: ASYNC109 - a wait budget
        """Commit ``command`` (a serialized Command) through the leader; returns its result once applied here
        or on the leader. Raises ``RequestFailed``."""
        try:
            return await self._write(command, timeout)
        except Stopped as exc:
            # UNAVAILABLE: clients retry on another coordinator, and the request id applies the write once.
            raise RequestFailed(
                grpc.StatusCode.UNAVAILABLE,
                f"{exc}: the write may still commit; retry it (same request id) on another coordinator",
            ) from None

    async def _write(self, command: bytes, timeout: float) -> state_pb2.CommandResult:  # noqa: ASYNC109 - a wait budget
        deadline = time.monotonic() + timeout
        last = "no leader"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                code = (
                    grpc.StatusCode.DEADLINE_EXCEEDED if last == "deadline" else grpc.StatusCode.UNAVAILABLE
                )
                raise RequestFailed(code, f"write not committed within {timeout:.1f}s ({last}); retry")
            d = self.driver
            try:
                _, result = await d.propose(command, left)
                return result if result is not None else state_pb2.CommandResult()
            except NotLeader as exc:
                lead = exc.leader_id
                if lead:
                    fwd = await self._forward_propose(lead, command, left)
                    if fwd is not None:
                        return fwd
                    last = f"leader {member_label(lead)} unreachable"
                else:
                    last = "no leader"
            except ProposalDropped as exc:
                last = str(exc)
            except DeadlineExceeded:
                last = "deadline"
                continue
            await asyncio.sleep(RETRY_PAUSE)

    async def _forward_propose(
        self, lead: int, command: bytes, left: float
    ) -> state_pb2.CommandResult | None:
        try:
            outcome = await self._forwarder.forward(lead, command, left)
        except DeadlineExceeded:
            raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "forwarded write timed out") from None
        if outcome is None:
            return None
        index, result = outcome
        # The leader applied it; make our own state catch up so a read here sees the write.
        with _suppress_deadline():
            await self.driver.wait_applied(index, max(0.0, min(left, 1.0)))
        return state_pb2.CommandResult.FromString(result)

    async def read_barrier(self, timeout: float) -> int:  # noqa: ASYNC109 - a wait budget
        deadline = time.monotonic() + timeout
        last = "no leader"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestFailed(
                    grpc.StatusCode.UNAVAILABLE, f"read not confirmed within {timeout:.1f}s ({last})"
                )
            try:
                return await self.driver.read_index(left)
            except Stopped as exc:
                raise RequestFailed(
                    grpc.StatusCode.UNAVAILABLE, f"{exc}: retry the read on another coordinator"
                ) from None
            except NotLeader:
                last = "no leader"
            except DeadlineExceeded:
                last = "deadline"
                continue
            except RaftError as exc:
                last = str(exc)
            await asyncio.sleep(RETRY_PAUSE)

    # -- Raft port: Join / Propose / ReadIndex ---------------------------------------------------------------

    async def handle_propose(
        self, request: raft_pb2.ProposeRequest, context: Any
    ) -> raft_pb2.ProposeResponse:
        d = self.driver
        try:
            index, result = await d.propose(request.command, _remaining(context))
        except NotLeader as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        except (ProposalDropped, DeadlineExceeded, Stopped) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        # The follower waits to apply the entry before it answers its client: tell it the commit now.
        d.release_commit_notice(request.header.from_id)
        return raft_pb2.ProposeResponse(
            header=d.transport.header(request.header.from_id),
            index=index,
            result=(result or state_pb2.CommandResult()).SerializeToString(),
        )

    async def handle_propose_batch(
        self, request: raft_pb2.ProposeBatchRequest, context: Any
    ) -> raft_pb2.ProposeBatchResponse:
        d = self.driver
        budget = _remaining(context)

        async def one(command: bytes) -> raft_pb2.ProposeOutcome:
            try:
                index, result = await d.propose(command, budget)
            except (NotLeader, ProposalDropped, DeadlineExceeded, Stopped) as exc:
                return raft_pb2.ProposeOutcome(error=str(exc) or type(exc).__name__)
            result = result or state_pb2.CommandResult()
            return raft_pb2.ProposeOutcome(index=index, result=result.SerializeToString())

        # Proposed in one loop turn: one Raft append and one fsync for the whole batch.
        outcomes = await asyncio.gather(*(one(c) for c in request.commands))
        d.release_commit_notice(request.header.from_id)
        return raft_pb2.ProposeBatchResponse(
            header=d.transport.header(request.header.from_id), outcomes=outcomes
        )

    async def handle_read_index(
        self, request: raft_pb2.ReadIndexRequest, context: Any
    ) -> raft_pb2.ReadIndexResponse:
        d = self.driver
        if not d.is_leader:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")
        try:
            index = await d.read_index(_remaining(context))
        except RaftError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        return raft_pb2.ReadIndexResponse(
            header=d.transport.header(request.header.from_id),
            read_index=index,
            context=request.context,
            term=d.status().term,
        )

    async def handle_join(self, request: raft_pb2.JoinRequest, context: Any) -> raft_pb2.JoinResponse:
        try:
            return await self.join(request.member, _remaining(context, 10.0))
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)
            raise

    async def join(self, member: raft_pb2.Member, timeout: float) -> raft_pb2.JoinResponse:  # noqa: ASYNC109 - a wait budget
        d = self.driver
        mid = member.member_id
        deadline = time.monotonic() + timeout
        while not d.is_leader:
            lead = d.leader_id
            stub = d.transport.stub(lead) if lead else None
            if stub is not None:
                req = raft_pb2.JoinRequest(header=d.transport.header(lead), member=member)
                try:
                    return await stub.Join(req, timeout=max(0.1, deadline - time.monotonic()))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION):
                        raise RequestFailed(exc.code(), exc.details() or "join refused") from None
            if time.monotonic() >= deadline:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "no leader to add the member; retry")
            await asyncio.sleep(0.1)
        async with self._membership_lock:
            reg = d.registry
            if mid in reg.removed:
                raise RequestFailed(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"member id {member_label(mid)} was removed from the cluster and is never reused; wipe "
                    "the "
                    "data dir and join as a new member",
                )
            known = reg.members.get(mid)
            cs = d.conf_state
            if known is not None and (mid in cs.voters or mid in cs.learners):
                if known.storage_id != member.storage_id:
                    raise RequestFailed(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"member {member_label(mid)} joined with storage id {known.storage_id}, not "
                        f"{member.storage_id}: its data dir was replaced. Remove the old member and join as "
                        "a new one",
                    )
                index = 0
                if known != member:
                    # The same member restarted with other addresses (or name): record them, with a
                    # membership change that keeps its role, so that every member dials the new ones.
                    kind = ConfChangeType.ADD_NODE if mid in cs.voters else ConfChangeType.ADD_LEARNER
                    index = await self._conf_change(
                        ConfChange(kind, mid, member.SerializeToString()), deadline
                    )
                    log.info(
                        "event=member_addresses_updated member=%x raft_address=%s api_address=%s index=%d",
                        mid,
                        member.raft_address,
                        member.api_address,
                        index,
                    )
                return raft_pb2.JoinResponse(
                    header=d.transport.header(mid),
                    leader_id=d.member_id,
                    conf_change_index=index,
                    members=list(reg.members.values()),
                )
            if not member.storage_id or not member.raft_address:
                raise RequestFailed(
                    grpc.StatusCode.INVALID_ARGUMENT, "join needs storage_id and raft_address"
                )
            index = await self._conf_change(
                ConfChange(ConfChangeType.ADD_LEARNER, mid, member.SerializeToString()), deadline
            )
            log.info(
                "event=member_join_accepted member=%x name=%s raft_address=%s index=%d",
                mid,
                member.name,
                member.raft_address,
                index,
            )
            return raft_pb2.JoinResponse(
                header=d.transport.header(mid),
                leader_id=d.member_id,
                conf_change_index=index,
                members=list(d.registry.members.values()),
            )

    async def advertise(self, me: raft_pb2.Member, *, retry: float = 1.0) -> None:
        """Make the cluster's record of this member match ``me`` (addresses given at this start). Until it
        does, the others dial the old addresses and this member may not even learn who leads: so ask every
        other member in turn, through its Raft port (``Join`` of a known member with the same storage id
        updates the record, through the leader). Returns once this member has applied the new record."""
        d = self.driver
        # The record is in the log this member replays at start: compare only once that is applied.
        with _suppress_deadline():
            await d.wait_applied(d.storage.hard_state.commit, timeout=60.0)
        while d.registry.members.get(me.member_id, me) != me:
            index = await self._record_addresses(me)
            if not index:
                await asyncio.sleep(retry)
                continue
            with _suppress_deadline():
                await d.wait_applied(index, 5.0)

    async def _record_addresses(self, me: raft_pb2.Member) -> int:
        """One round of ``advertise``: the index of the committed change, 0 if nobody could make it."""
        d = self.driver
        if d.is_leader:
            try:
                return (await self.join(me, 5.0)).conf_change_index
            except RequestFailed:
                return 0
        for peer in [m for m in d.registry.members if m != me.member_id]:
            stub = d.transport.stub(peer)
            if stub is None:
                continue
            req = raft_pb2.JoinRequest(header=d.transport.header(peer), member=me)
            try:
                return (await stub.Join(req, timeout=5.0)).conf_change_index
            except grpc.aio.AioRpcError as exc:
                log.info("event=member_advertise_retry peer=%x code=%s", peer, exc.code().name)
        return 0

    async def _conf_change(self, cc: ConfChange, deadline: float) -> int:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "membership change not committed in time")
            try:
                return await self.driver.propose_conf_change(cc, left)
            except (NotLeader, Stopped) as exc:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            except ProposalDropped:
                await asyncio.sleep(0.1)
            except DeadlineExceeded as exc:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    # -- membership upkeep (leader) --------------------------------------------------------------------------

    async def membership_loop(self) -> None:
        """Promote caught-up learners to voters while that keeps the voter count odd and <= max_voters, and
        let such a learner take the place of a voter silent for ``dead_voter_timeout``."""
        while True:
            await asyncio.sleep(0.3)
            d = self.driver
            if not d.is_leader:
                self._leading_since = None
                continue
            if self._leading_since is None:
                self._leading_since = time.monotonic()
            try:
                if not await self._promote_once():
                    await self._replace_dead_voter()
            except RequestFailed as exc:
                log.info("event=member_promotion_deferred reason=%r", exc.message)

    async def _promote_once(self) -> bool:
        """Promote one caught-up learner if the voter count allows. False: one waits, the voters are full."""
        d = self.driver
        async with self._membership_lock:
            voters = len(d.conf_state.voters)
            ready = d.caught_up_learners(PROMOTE_MAX_LAG)
            if not ready:
                return True
            total = voters + len(ready)
            target = min(self.max_voters, total if total % 2 == 1 else total - 1)
            if voters >= target:
                return False
            mid = ready[0]
            member = d.registry.members.get(mid)
            ctx = member.SerializeToString() if member is not None else b""
            index = await self._conf_change(
                ConfChange(ConfChangeType.ADD_NODE, mid, ctx), time.monotonic() + 5.0
            )
            log.info("event=member_promoted member=%x index=%d voters=%d", mid, index, voters + 1)
            return True

    async def _replace_dead_voter(self) -> None:
        """A caught-up learner waits and the voters are full: remove a voter this leader has not heard from
        for ``dead_voter_timeout`` (the next round promotes the learner in its place)."""
        if not self.dead_voter_timeout or self._leading_since is None:
            return
        d = self.driver
        async with self._membership_lock:
            st = d.status()
            if not d.caught_up_learners(PROMOTE_MAX_LAG):
                return
            # Silence as this leader knows it: a voter never heard from since it took office counts from then.
            tenure = time.monotonic() - self._leading_since
            silent: dict[int, float] = {}
            for v in st.conf_state.voters:
                if v != st.member_id:
                    p = st.peers.get(v)
                    age = p.last_contact_age if p is not None else None
                    silent[v] = tenure if age is None else min(tenure, age)
            mid = dead_voter_to_remove(list(st.conf_state.voters), silent, self.dead_voter_timeout)
            if mid is None:
                return
            index = await self._conf_change(
                ConfChange(ConfChangeType.REMOVE_NODE, mid), time.monotonic() + 5.0
            )
            DEAD_VOTERS_REMOVED.inc()
            log.warning(
                "event=dead_voter_removed member=%x silent_seconds=%.0f index=%d: a caught-up learner takes "
                "its place; that coordinator cannot come back under its old id (wipe its data dir, rejoin)",
                mid,
                silent[mid],
                index,
            )

    async def remove_member(self, mid: int, timeout: float) -> None:  # noqa: ASYNC109 - a wait budget
        d = self.driver
        cs = d.conf_state
        if mid not in cs.voters and mid not in cs.learners:
            if mid in d.registry.removed:
                return  # idempotent
            raise RequestFailed(
                grpc.StatusCode.NOT_FOUND, f"member {member_label(mid)} is not in the cluster"
            )
        if cs.voters == (mid,):
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, "cannot remove the last voter")
        if not d.is_leader:
            raise RequestFailed(
                grpc.StatusCode.UNAVAILABLE,
                f"not the leader; send RemoveMember to the leader {member_label(d.leader_id)}",
            )
        async with self._membership_lock:
            await self._conf_change(ConfChange(ConfChangeType.REMOVE_NODE, mid), time.monotonic() + timeout)

    # -- leadership transfer ---------------------------------------------------------------------------------

    def transfer_target(self) -> int:
        """The voter to hand leadership to: of the others that answered this leader within an election
        timeout, the one with the most of the log (it can take over without catching up). 0: none, or this
        member does not lead (only a leader knows how far each member is)."""
        d = self.driver
        st = d.status()
        if st.leader_id != st.member_id:
            return 0
        others = [v for v in st.conf_state.voters if v != st.member_id and self._answers(st.peers.get(v))]
        return max(others, key=lambda v: st.peers[v].match, default=0)

    async def transfer_leadership(self, target: int, timeout: float) -> bool:  # noqa: ASYNC109 - a wait budget
        """Ask the leader (through this member's Raft node, which passes it on) to hand leadership to
        ``target``; True once ``target`` leads (within ``timeout``). The request is repeated while it has not
        happened: the core abandons a transfer that takes longer than an election timeout."""
        d = self.driver
        deadline = time.monotonic() + timeout
        asked = 0.0
        while time.monotonic() < deadline:
            if d.leader_id == target:
                return True
            now = time.monotonic()
            if d.leader_id and now - asked >= TRANSFER_REPEAT:
                d.transfer_leadership(target)
                asked = now
            await asyncio.sleep(0.01)
        return False

    async def hand_over_leadership(self) -> None:
        """Before a graceful stop: if this member leads, move leadership to the best other voter first, as
        etcd does, so that clients wait a round trip for the new leader rather than an election timeout.
        Gives up after two election timeouts (the target did not take over: the others elect as usual)."""
        d = self.driver
        if not d.is_leader:
            return
        timeout = 2 * d.opts.tick * d.opts.election_ticks
        target = self.transfer_target()
        if not target:
            log.info("event=leadership_handover_skipped reason=no_voter_in_contact")
            return
        started = time.monotonic()
        moved = await self.transfer_leadership(target, timeout)
        log.info(
            "event=leadership_handover to=%s moved=%s took_ms=%.0f",
            member_label(target),
            str(moved).lower(),
            (time.monotonic() - started) * 1000,
        )

    def _answers(self, peer: PeerStatus | None) -> bool:
        """The member answered this leader within an election timeout. (Not Raft's ``recent_active``: the
        leader clears that at every quorum check and sets it again at the next answer, so it flickers.)"""
        opts = self.driver.opts
        age = peer.last_contact_age if peer is not None else None
        return age is not None and age < opts.tick * opts.election_ticks

    # -- admin views -----------------------------------------------------------------------------------------

    def members_proto(self) -> list[admin_pb2.Member]:
        st = self.driver.status()
        out: list[admin_pb2.Member] = []
        ids = list(st.conf_state.voters) + [
            m for m in st.conf_state.learners if m not in st.conf_state.voters
        ]
        for mid in ids:
            reg = st.members.get(mid)
            peer = st.peers.get(mid)
            m = admin_pb2.Member(
                member_id=member_label(mid),
                raft_address=reg.raft_address if reg is not None else "",
                role=admin_pb2.MEMBER_ROLE_VOTER
                if mid in st.conf_state.voters
                else admin_pb2.MEMBER_ROLE_LEARNER,
                is_leader=mid == st.leader_id,
            )
            m.info.id = member_label(mid)
            if reg is not None:
                m.info.name = reg.name
                m.info.api_address = reg.api_address
            if mid == st.member_id:
                m.healthy = True
                m.match_index = st.commit if st.role == StateType.LEADER else 0
            elif peer is not None:
                m.match_index = peer.match
                if peer.last_contact_age is not None:
                    m.last_contact_age.FromNanoseconds(int(peer.last_contact_age * 1e9))
                m.healthy = st.role == StateType.LEADER and self._answers(peer)
            out.append(m)
        return out


class _suppress_deadline:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, ev: object, tb: object) -> bool:
        return isinstance(ev, DeadlineExceeded)


async def _fail(context: Any, exc: RequestFailed) -> None:
    await context.abort(exc.code, exc.message)


def _check_result(result: state_pb2.CommandResult) -> None:
    if result.HasField("error"):
        code = _ERROR_CODES.get(result.error.code, grpc.StatusCode.INTERNAL)
        raise RequestFailed(code, result.error.message)


class KvServicer(kv_pb2_grpc.KvServiceServicer):
    """The four KV operations, as unary calls and as the operations of a ``Session`` (coord/kv_session.py).

    ``authorize(metadata, method)`` is the API-token check (``auth.ApiTokenInterceptor.authorize``): the
    interceptor runs it once per call; a session runs it for each operation, with that operation's unary
    method.
    """

    def __init__(self, coord: Coordinator, authorize: Callable[[Any, str], Awaitable[None]]) -> None:
        self.c = coord
        self._authorize = authorize
        self._ops: dict[str, tuple[str, Callable[[Any, float], Awaitable[Any]]]] = {
            "put": ("/tunnelmesh.v1.KvService/Put", self._put),
            "get": ("/tunnelmesh.v1.KvService/Get", self._get),
            "delete": ("/tunnelmesh.v1.KvService/Delete", self._delete),
            "compare_and_set": ("/tunnelmesh.v1.KvService/CompareAndSet", self._compare_and_set),
        }

    # -- the operations: request and time budget in, response out, RequestFailed on failure ----------------

    async def _write(self, body: Any, request_id: str, budget: float) -> state_pb2.KvResult:
        data = encode_command(body, proposed_at=time.time_ns(), request_id=request_id)
        result = await self.c.write(data, budget)
        _check_result(result)
        return result.kv

    async def _put(self, request: kv_pb2.KvPutRequest, budget: float) -> kv_pb2.KvPutResponse:
        body = state_pb2.KvPut(key=request.key, value=request.value)
        kv = await self._write(body, request.request_id, budget)
        resp = kv_pb2.KvPutResponse(revision=kv.revision)
        if kv.HasField("previous_value"):
            resp.previous_value = kv.previous_value
        return resp

    async def _delete(self, request: kv_pb2.KvDeleteRequest, budget: float) -> kv_pb2.KvDeleteResponse:
        kv = await self._write(state_pb2.KvDelete(key=request.key), request.request_id, budget)
        resp = kv_pb2.KvDeleteResponse()
        if kv.HasField("previous_value"):
            resp.previous_value = kv.previous_value
        return resp

    async def _compare_and_set(
        self, request: kv_pb2.KvCompareAndSetRequest, budget: float
    ) -> kv_pb2.KvCompareAndSetResponse:
        body = state_pb2.KvCompareAndSet(key=request.key, new_value=request.new_value)
        if request.HasField("expected_value"):
            body.expected_value = request.expected_value
        kv = await self._write(body, request.request_id, budget)
        resp = kv_pb2.KvCompareAndSetResponse(succeeded=kv.succeeded, revision=kv.revision)
        if kv.HasField("previous_value"):
            resp.previous_value = kv.previous_value
        return resp

    async def _get(self, request: kv_pb2.KvGetRequest, budget: float) -> kv_pb2.KvGetResponse:
        if not request.stale:
            await self.c.read_barrier(budget)
        d = self.c.driver
        entry = d.state.kv_get(request.key)
        if entry is None:
            return kv_pb2.KvGetResponse(found=False, read_index=d.applied)
        return kv_pb2.KvGetResponse(
            found=True, value=entry.value, revision=entry.revision, read_index=d.applied
        )

    # -- unary calls ---------------------------------------------------------------------------------------

    async def _unary(self, op: Awaitable[R], context: Any) -> R:
        try:
            return await op
        except RequestFailed as exc:
            await _fail(context, exc)
            raise

    async def Put(self, request: kv_pb2.KvPutRequest, context: Any) -> kv_pb2.KvPutResponse:
        return await self._unary(self._put(request, _remaining(context)), context)

    async def Delete(self, request: kv_pb2.KvDeleteRequest, context: Any) -> kv_pb2.KvDeleteResponse:
        return await self._unary(self._delete(request, _remaining(context)), context)

    async def CompareAndSet(
        self, request: kv_pb2.KvCompareAndSetRequest, context: Any
    ) -> kv_pb2.KvCompareAndSetResponse:
        return await self._unary(self._compare_and_set(request, _remaining(context)), context)

    async def Get(self, request: kv_pb2.KvGetRequest, context: Any) -> kv_pb2.KvGetResponse:
        return await self._unary(self._get(request, _remaining(context)), context)

    # -- Session ---------------------------------------------------------------------------------------------

    async def Session(  # type: ignore[override]  # answers with context.write, not by yielding
        self, request_iterator: Any, context: Any
    ) -> None:
        metadata = context.invocation_metadata()

        async def run(req: kv_pb2.KvSessionRequest, which: str) -> kv_pb2.KvSessionResponse:
            method, op = self._ops[which]
            timeout = req.timeout_ms / 1000 if req.timeout_ms else DEFAULT_TIMEOUT
            try:
                await self._authorize(metadata, method)
                result = await op(getattr(req, which), _remaining(context, timeout))
            except (RequestFailed, AuthFailure) as exc:
                error = kv_pb2.KvError(code=exc.code.value[0], message=exc.message)
                return kv_pb2.KvSessionResponse(id=req.id, error=error)
            except Exception:  # a bug: answer it like gRPC answers a unary handler that raised
                log.exception("event=kv_session_op_failed op=%s id=%d", which, req.id)
                error = kv_pb2.KvError(code=grpc.StatusCode.UNKNOWN.value[0], message="unexpected error")
                return kv_pb2.KvSessionResponse(id=req.id, error=error)
            resp = kv_pb2.KvSessionResponse(id=req.id)
            getattr(resp, which).CopyFrom(result)
            return resp

        await kv_session.serve(request_iterator, context, run)


# -- AdminService: nodes, join tokens, API tokens ------------------------------------------------------------

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_JOIN_TOKEN_TTL = 3600  # seconds, as admin.proto documents
MAX_API_TOKEN_TTL = (
    10 * 365 * 24 * 3600
)  # seconds; far enough for any rotation policy, inside Timestamp's range
_VALID_ROLES = {common_pb2.ROLE_READ_ONLY, common_pb2.ROLE_OPERATOR, common_pb2.ROLE_ADMIN}

SNAPSHOT_CHUNK = 1 << 20  # bytes of snapshot data per SaveSnapshot message (well under gRPC's 4 MiB limit)

DEAD_VOTERS_REMOVED = Counter(
    "tunnelmesh_coord_dead_voters_removed_total",
    "Voters this leader removed because it had not heard from them for coord.dead_voter_timeout while a "
    "caught-up learner waited to take their place.",
)
ADMIN_FAILURES = Counter(
    "tunnelmesh_admin_requests_failed",
    "AdminService node and token calls that failed, by method and gRPC status code (bad input included).",
    ["method", "code"],
)


def _actor(context: Any) -> str:
    """Who is calling, for ``created_by``: the caller's API token id (never the secret)."""
    text = tokens.bearer(context.invocation_metadata())
    if text is None:
        return ""
    try:
        return f"api-token:{tokens.ApiToken.parse(text).token_id}"
    except tokens.TokenError:
        return ""


def _page_size(requested: int) -> int:
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _page_token(kind: str, key: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{key}".encode()).decode().rstrip("=")


def _page_key(kind: str, token: str) -> str:
    """The position encoded in a page token of this ``kind``; INVALID_ARGUMENT for anything else."""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        text = ""
    prefix, sep, key = text.partition(":")
    if prefix != kind or not sep or not key:
        raise RequestFailed(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"page_token {token[:40]!r} is not a next_page_token of this method; start again without one",
        )
    return key


def _ttl_ns(request: Any, *, default: int | None, maximum: int, what: str) -> int | None:
    """The request's ``ttl`` in ns: ``default`` (seconds) if unset or zero, INVALID_ARGUMENT outside
    (0, maximum]."""
    seconds = request.ttl.ToNanoseconds() / NS_PER_SECOND if request.HasField("ttl") else 0.0
    if seconds == 0:
        return None if default is None else default * NS_PER_SECOND
    if seconds < 0 or seconds > maximum:
        raise RequestFailed(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"ttl {seconds:.0f}s is out of range for {what}: "
            f"give more than 0 and at most {maximum // 86400} days",
        )
    return int(request.ttl.ToNanoseconds())


def _require(value: str, what: str) -> None:
    if not value:
        raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is required")


def _node_proto(n: state.Node) -> admin_pb2.Node:
    node = admin_pb2.Node(
        node_id=n.node_id,
        name=n.name,
        hostname=n.hostname,
        public_key=n.public_key,
        mesh_ips=n.mesh_ips,
        tags=n.tags,
        endpoints=[e.to_proto() for e in n.endpoints],
        agent_version=n.agent_version,
        platform=n.platform,
        created_at=ns_to_timestamp(n.created_at),
        online=n.online,
        join_token_id=n.join_token_id,
    )
    if n.last_seen is not None:
        node.last_seen.CopyFrom(ns_to_timestamp(n.last_seen))
    return node


def _join_token_proto(t: state.JoinToken) -> admin_pb2.JoinToken:
    out = admin_pb2.JoinToken(
        token_id=t.token_id,
        description=t.description,
        tags=t.tags,
        expires_at=ns_to_timestamp(t.expires_at),
        reusable=t.reusable,
        max_uses=t.max_uses,
        uses=t.uses,
        created_at=ns_to_timestamp(t.created_at),
        created_by=t.created_by,
    )
    if t.revoked_at is not None:
        out.revoked_at.CopyFrom(ns_to_timestamp(t.revoked_at))
    return out


def _api_token_proto(t: state.ApiToken) -> admin_pb2.ApiToken:
    out = admin_pb2.ApiToken(
        token_id=t.token_id,
        description=t.description,
        role=t.role,  # type: ignore[arg-type]
        created_at=ns_to_timestamp(t.created_at),
        created_by=t.created_by,
    )
    if t.expires_at is not None:
        out.expires_at.CopyFrom(ns_to_timestamp(t.expires_at))
    if t.revoked_at is not None:
        out.revoked_at.CopyFrom(ns_to_timestamp(t.revoked_at))
    return out


def _reused_request(request_id: str, what: str) -> RequestFailed:
    # The state answered a retry of an id it already applied: the first attempt made the token, and its secret
    # (shown only once, never stored) cannot be shown again.
    return RequestFailed(
        grpc.StatusCode.ALREADY_EXISTS,
        f"request_id {request_id!r} already created {what} (its secret is shown only once); list the tokens, "
        "revoke the one that was lost and create a new one with a new request_id",
    )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """AdminService. Roles are enforced before a method runs (the auth interceptor reads each method's
    ``required_role``); here: input validation, mutations through ``Coordinator.write`` (actor = the caller's
    API token), and reads from the applied state after a read barrier, so a read sees every write
    acknowledged before it started, on any coordinator."""

    def __init__(self, coord: Coordinator) -> None:
        self.c = coord

    async def _serve(self, method: str, context: Any, fn: Callable[[], Awaitable[R]]) -> R:
        try:
            return await fn()
        except RequestFailed as exc:
            ADMIN_FAILURES.labels(method, exc.code.name).inc()
            log.info(
                "event=admin_request_failed method=%s code=%s reason=%r", method, exc.code.name, exc.message
            )
            await _fail(context, exc)
            raise

    async def _state(self, context: Any) -> state.MeshState:
        await self.c.read_barrier(_remaining(context))
        return self.c.driver.state

    async def _propose(
        self, body: Any, request_id: str, context: Any, *, proposed_at: int | None = None
    ) -> str:
        """Commit one command (the caller's request id makes retries apply at most once); returns the id."""
        request_id = request_id or uuid.uuid4().hex
        data = encode_command(
            body,
            proposed_at=proposed_at or time.time_ns(),
            request_id=request_id,
            actor=_actor(context),
        )
        _check_result(await self.c.write(data, _remaining(context)))
        return request_id

    async def _settled(
        self, context: Any, read: Callable[[state.MeshState], R], done: Callable[[R], bool]
    ) -> R:
        """``read`` of this coordinator's state once it shows the write just committed: usually at once (the
        write path waits for the local apply), else after a read barrier."""
        value = read(self.c.driver.state)
        if not done(value):
            await self.c.read_barrier(_remaining(context))
            value = read(self.c.driver.state)
        return value

    def _join_command(self, secret: str) -> str:
        addresses = [m.info.api_address for m in self.c.members_proto() if m.info.api_address]
        return f"tunnelmesh join {','.join(dict.fromkeys(addresses))} --token {secret}"

    # -- nodes -----------------------------------------------------------------------------------------------

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: Any
    ) -> admin_pb2.ListNodesResponse:
        async def run() -> admin_pb2.ListNodesResponse:
            size = _page_size(request.page_size)
            after = _page_key("nodes", request.page_token) if request.page_token else ""
            st = await self._state(context)
            nodes = st.list_nodes(tags=request.tags, after_name=after, limit=size + 1)
            resp = admin_pb2.ListNodesResponse(nodes=[_node_proto(n) for n in nodes[:size]])
            if len(nodes) > size:
                resp.next_page_token = _page_token("nodes", nodes[size - 1].name)
            return resp

        return await self._serve("ListNodes", context, run)

    async def GetNode(self, request: admin_pb2.GetNodeRequest, context: Any) -> admin_pb2.GetNodeResponse:
        async def run() -> admin_pb2.GetNodeResponse:
            which = request.WhichOneof("node")
            value = getattr(request, which) if which else ""
            if not value:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "give the node's node_id or name")
            st = await self._state(context)
            node = st.get_node(value) if which == "node_id" else st.node_by_name(value)
            if node is None:
                what = "id" if which == "node_id" else "name"
                raise RequestFailed(grpc.StatusCode.NOT_FOUND, f"no node with {what} {value!r}")
            return admin_pb2.GetNodeResponse(node=_node_proto(node))

        return await self._serve("GetNode", context, run)

    async def RenameNode(
        self, request: admin_pb2.RenameNodeRequest, context: Any
    ) -> admin_pb2.RenameNodeResponse:
        async def run() -> admin_pb2.RenameNodeResponse:
            _require(request.node_id, "node_id")
            if not is_label(request.new_name):
                raise RequestFailed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"new_name {request.new_name!r} is not a DNS label "
                    "(1-63 lowercase letters, digits and '-', not at either end)",
                )
            body = state_pb2.RenameNode(node_id=request.node_id, new_name=request.new_name)
            await self._propose(body, request.request_id, context)
            node = await self._settled(
                context,
                lambda s: s.get_node(request.node_id),
                lambda n: n is None or n.name == request.new_name,
            )
            if node is None:
                raise RequestFailed(
                    grpc.StatusCode.NOT_FOUND, f"node {request.node_id} was removed meanwhile"
                )
            log.info("event=node_renamed node=%s name=%s actor=%s", node.node_id, node.name, _actor(context))
            return admin_pb2.RenameNodeResponse(node=_node_proto(node))

        return await self._serve("RenameNode", context, run)

    async def RemoveNode(
        self, request: admin_pb2.RemoveNodeRequest, context: Any
    ) -> admin_pb2.RemoveNodeResponse:
        async def run() -> admin_pb2.RemoveNodeResponse:
            _require(request.node_id, "node_id")
            await self._propose(state_pb2.RemoveNode(node_id=request.node_id), request.request_id, context)
            log.info("event=node_removed node=%s actor=%s", request.node_id, _actor(context))
            return admin_pb2.RemoveNodeResponse()

        return await self._serve("RemoveNode", context, run)

    # -- join tokens -----------------------------------------------------------------------------------------

    async def CreateJoinToken(
        self, request: admin_pb2.CreateJoinTokenRequest, context: Any
    ) -> admin_pb2.CreateJoinTokenResponse:
        async def run() -> admin_pb2.CreateJoinTokenResponse:
            if not self.c.ca_fingerprint:
                raise RequestFailed(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this coordinator has no cluster CA to pin in a join token",
                )
            ttl = _ttl_ns(
                request,
                default=DEFAULT_JOIN_TOKEN_TTL,
                maximum=MAX_JOIN_TOKEN_TTL_SECONDS,
                what="a join token",
            )
            assert ttl is not None
            now = time.time_ns()
            token = tokens.JoinToken.new(self.c.ca_fingerprint)
            body = state_pb2.CreateJoinToken(
                token_id=token.token_id,
                secret_hash=token.secret_hash,
                description=request.description,
                tags=request.tags,
                expires_at=ns_to_timestamp(now + ttl),
                reusable=request.reusable,
                max_uses=request.max_uses,
            )
            rid = await self._propose(body, request.request_id, context, proposed_at=now)
            record = await self._settled(
                context, lambda s: s.get_join_token(token.token_id), lambda r: r is not None
            )
            if record is None:
                raise _reused_request(rid, "a join token")
            log.info(
                "event=join_token_created token_id=%s reusable=%s actor=%s",
                token.token_id,
                record.reusable,
                record.created_by,
            )
            return admin_pb2.CreateJoinTokenResponse(
                token=_join_token_proto(record),
                secret=str(token),
                join_command=self._join_command(str(token)),
            )

        return await self._serve("CreateJoinToken", context, run)

    async def ListJoinTokens(
        self, request: admin_pb2.ListJoinTokensRequest, context: Any
    ) -> admin_pb2.ListJoinTokensResponse:
        async def run() -> admin_pb2.ListJoinTokensResponse:
            size = _page_size(request.page_size)
            after: tuple[int, str] | None = None
            if request.page_token:
                created, _, token_id = _page_key("join-tokens", request.page_token).partition(":")
                if not created.lstrip("-").isdigit() or not token_id:
                    raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "page_token is malformed")
                after = (-int(created), token_id)
            st = await self._state(context)
            now = max(time.time_ns(), st.now)
            page: list[state.JoinToken] = []
            more = False
            for t in st.join_tokens():  # newest first: ordered by (-created_at, token_id)
                if after is not None and (-t.created_at, t.token_id) <= after:
                    continue
                if not request.include_inactive and t.rejection(now) is not None:
                    continue
                if len(page) == size:
                    more = True
                    break
                page.append(t)
            resp = admin_pb2.ListJoinTokensResponse(tokens=[_join_token_proto(t) for t in page])
            if more:
                resp.next_page_token = _page_token(
                    "join-tokens", f"{page[-1].created_at}:{page[-1].token_id}"
                )
            return resp

        return await self._serve("ListJoinTokens", context, run)

    async def RevokeJoinToken(
        self, request: admin_pb2.RevokeJoinTokenRequest, context: Any
    ) -> admin_pb2.RevokeJoinTokenResponse:
        async def run() -> admin_pb2.RevokeJoinTokenResponse:
            _require(request.token_id, "token_id")
            body = state_pb2.RevokeJoinToken(token_id=request.token_id)
            await self._propose(body, request.request_id, context)
            record = await self._settled(
                context,
                lambda s: s.get_join_token(request.token_id),
                lambda r: r is not None and r.revoked_at is not None,
            )
            if record is None:
                raise RequestFailed(
                    grpc.StatusCode.NOT_FOUND, f"join token {request.token_id!r} does not exist"
                )
            log.info("event=join_token_revoked token_id=%s actor=%s", record.token_id, _actor(context))
            return admin_pb2.RevokeJoinTokenResponse(token=_join_token_proto(record))

        return await self._serve("RevokeJoinToken", context, run)

    # -- API tokens ------------------------------------------------------------------------------------------

    async def CreateApiToken(
        self, request: admin_pb2.CreateApiTokenRequest, context: Any
    ) -> admin_pb2.CreateApiTokenResponse:
        async def run() -> admin_pb2.CreateApiTokenResponse:
            if request.role not in _VALID_ROLES:
                raise RequestFailed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"role {request.role} is not a role: give ROLE_READ_ONLY, ROLE_OPERATOR or ROLE_ADMIN",
                )
            ttl = _ttl_ns(request, default=None, maximum=MAX_API_TOKEN_TTL, what="an API token")
            now = time.time_ns()
            token = tokens.ApiToken.new()
            body = state_pb2.CreateApiToken(
                token_id=token.token_id,
                secret_hash=token.secret_hash,
                description=request.description,
                role=request.role,
            )
            if ttl is not None:
                body.expires_at.CopyFrom(ns_to_timestamp(now + ttl))
            rid = await self._propose(body, request.request_id, context, proposed_at=now)
            record = await self._settled(
                context, lambda s: s.get_api_token(token.token_id), lambda r: r is not None
            )
            if record is None:
                raise _reused_request(rid, "an API token")
            log.info(
                "event=api_token_created token_id=%s role=%s actor=%s",
                token.token_id,
                common_pb2.Role.Name(request.role),
                record.created_by,
            )
            return admin_pb2.CreateApiTokenResponse(token=_api_token_proto(record), secret=str(token))

        return await self._serve("CreateApiToken", context, run)

    async def ListApiTokens(
        self, request: admin_pb2.ListApiTokensRequest, context: Any
    ) -> admin_pb2.ListApiTokensResponse:
        async def run() -> admin_pb2.ListApiTokensResponse:
            st = await self._state(context)
            now = max(time.time_ns(), st.now)
            found = [t for t in st.api_tokens() if request.include_inactive or t.is_active(now)]
            return admin_pb2.ListApiTokensResponse(tokens=[_api_token_proto(t) for t in found])

        return await self._serve("ListApiTokens", context, run)

    async def RevokeApiToken(
        self, request: admin_pb2.RevokeApiTokenRequest, context: Any
    ) -> admin_pb2.RevokeApiTokenResponse:
        async def run() -> admin_pb2.RevokeApiTokenResponse:
            _require(request.token_id, "token_id")
            body = state_pb2.RevokeApiToken(token_id=request.token_id)
            await self._propose(body, request.request_id, context)
            record = await self._settled(
                context,
                lambda s: s.get_api_token(request.token_id),
                lambda r: r is not None and r.revoked_at is not None,
            )
            if record is None:
                raise RequestFailed(
                    grpc.StatusCode.NOT_FOUND, f"API token {request.token_id!r} does not exist"
                )
            log.info("event=api_token_revoked token_id=%s actor=%s", record.token_id, _actor(context))
            return admin_pb2.RevokeApiTokenResponse(token=_api_token_proto(record))

        return await self._serve("RevokeApiToken", context, run)

    # -- coordinator cluster ---------------------------------------------------------------------------------

    async def GetClusterStatus(
        self, request: admin_pb2.GetClusterStatusRequest, context: Any
    ) -> admin_pb2.GetClusterStatusResponse:
        st = self.c.driver.status()
        return admin_pb2.GetClusterStatusResponse(
            cluster_id=st.cluster_id,
            member_id=member_label(st.member_id),
            leader_id=member_label(st.leader_id) if st.leader_id else "",
            term=st.term,
            commit_index=st.commit,
            applied_index=st.applied,
            snapshot_index=st.snapshot_index,
            members=self.c.members_proto(),
            has_quorum=st.role == StateType.LEADER,
        )

    async def ListMembers(
        self, request: admin_pb2.ListMembersRequest, context: Any
    ) -> admin_pb2.ListMembersResponse:
        return admin_pb2.ListMembersResponse(members=self.c.members_proto())

    async def TransferLeadership(
        self, request: admin_pb2.TransferLeadershipRequest, context: Any
    ) -> admin_pb2.TransferLeadershipResponse:
        d = self.c.driver
        st = d.status()
        if request.target_member_id:
            try:
                target = int(request.target_member_id, 16)
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target_member_id must be hex")
                raise
        else:
            others = [v for v in st.conf_state.voters if v != st.leader_id]
            if not others:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no other voter to transfer to")
            target = self.c.transfer_target() or max(
                others, key=lambda v: st.peers[v].match if v in st.peers else 0
            )
        if target not in st.conf_state.voters:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{member_label(target)} is not a voter")
        if await self.c.transfer_leadership(target, _remaining(context, 10.0)):
            return admin_pb2.TransferLeadershipResponse(leader_id=member_label(target), term=d.status().term)
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"leadership did not move to {member_label(target)}"
        )
        raise AssertionError("unreachable")

    async def RemoveMember(
        self, request: admin_pb2.RemoveMemberRequest, context: Any
    ) -> admin_pb2.RemoveMemberResponse:
        try:
            mid = int(request.member_id, 16)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "member_id must be 16 hex digits")
            raise
        try:
            await self.c.remove_member(mid, _remaining(context, 10.0))
        except RequestFailed as exc:
            await _fail(context, exc)
            raise
        return admin_pb2.RemoveMemberResponse(members=self.c.members_proto())

    async def SaveSnapshot(
        self, request: admin_pb2.SaveSnapshotRequest, context: Any
    ) -> AsyncIterator[admin_pb2.SnapshotChunk]:
        async def take() -> tuple[int, int, bytes]:
            await self.c.read_barrier(_remaining(context))  # includes every write acknowledged before
            return await self.c.driver.backup()

        index, term, data = await self._serve("SaveSnapshot", context, take)
        info = admin_pb2.SnapshotInfo(
            cluster_id=self.c.cluster_id,
            index=index,
            term=term,
            taken_by=member_label(self.c.driver.member_id),
            taken_at=ns_to_timestamp(time.time_ns()),
            size=len(data),
        )
        log.info("event=snapshot_saved index=%d term=%d bytes=%d", index, term, len(data))
        view = memoryview(data)
        for off in range(0, max(len(data), 1), SNAPSHOT_CHUNK):
            chunk = admin_pb2.SnapshotChunk(data=bytes(view[off : off + SNAPSHOT_CHUNK]))
            if off == 0:
                chunk.info.CopyFrom(info)
            if off + SNAPSHOT_CHUNK >= len(data):
                chunk.sha256 = hashlib.sha256(data).digest()
            yield chunk


class ClusterJoinServicer(cluster_pb2_grpc.ClusterJoinServiceServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.c = coord

    async def GetJoinBundle(
        self, request: cluster_pb2.GetJoinBundleRequest, context: Any
    ) -> cluster_pb2.GetJoinBundleResponse:
        c = self.c
        if request.cluster_id and request.cluster_id != c.cluster_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this coordinator belongs to cluster {c.cluster_id!r}, not {request.cluster_id!r}",
            )
        bundle = await c.join_bundle()
        if bundle is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this coordinator has no join secret")
            raise AssertionError("unreachable")
        members = [m.raft_address for m in c.driver.registry.members.values() if m.raft_address]
        return cluster_pb2.GetJoinBundleResponse(
            cluster_id=c.cluster_id,
            bundle=bundle,
            raft_address=c.self_member.raft_address,
            member_raft_addresses=sorted(members),
        )


def new_join_secret() -> str:
    return secrets.token_urlsafe(32)


__all__ = [
    "AdminServicer",
    "ClusterJoinServicer",
    "Coordinator",
    "KvServicer",
    "RequestFailed",
    "new_join_secret",
    "pki",
]
