"""NodeService on a coordinator: Register, WatchConfig and ReportStatus (proto/tunnelmesh/v1/node.proto).

Every coordinator serves it from its own applied state; writes (RegisterNode, SetNodeEndpoints,
RecordNodesSeen) go through ``Coordinator.write``, which forwards them to the Raft leader.

* **GetServerInfo** (open) describes this coordinator: its id and relay key are what a Register key proof is
  made for (``tunnelmesh.keyproof``).
* **Register** checks the join token (id, secret hash, CA pin, expiry, uses), the key and the proof that the
  caller holds its private key (``key_proof``, verified with this coordinator's relay key: a public key is
  public, so without it a holder of the same reusable token could take over another node's key), the name,
  tags and CSR, then proposes ``RegisterNode``. Retrying is safe: the state keeps one node per public key
  and only replaces its node token hash.
* **WatchConfig** streams a node's view (``config_view``). Config versions are Raft indexes, so a node may
  resume on any coordinator. Each stream waits on the driver's ``applied_changed`` event (one waiter per
  stream); when it wakes it asks the state for the changes since the version it last sent (memoized per
  version in the state) and sends one delta, so a stream whose client is slow simply merges everything it
  missed into its next delta and never holds up the others (so nothing queues per stream). A delta is encoded
  once per (base version, version) and every stream outside the change sends the same bytes (``DeltaParts``);
  snapshots share one encoding of the mesh (``SnapshotEncoder``). One applied entry wakes every stream in
  the same event-loop iteration, so each takes a turn (``_Pacer``) before its work: at most ``PACE_PER_TURN``
  per iteration, and the loop serves Raft in between (a blocked loop loses the leader). A heartbeat goes out
  when a stream was idle for 75-100 % of ``heartbeat_interval`` (random per gap, so that streams opened
  together do not beat together).
* **ReportStatus** replicates changed endpoint candidates and keeps per-peer statistics in memory here.
* Liveness: ``liveness_loop`` proposes one ``RecordNodesSeen`` per ``seen_interval`` for the nodes whose
  stream this coordinator holds (online) or lost (offline); the leader also marks offline the nodes nobody
  reported for ``STALE_INTERVALS`` intervals (their coordinator died). Liveness is not config: it updates
  ``NodeRecord.online/last_seen`` (``tunnelmesh nodes list``) and sends nothing to the watchers.

Node credentials: ``authorization: Bearer tmn_<node id>_<secret>`` (``tokens.NodeToken``); the state stores
the secret's hash in ``NodeRecord.node_token_hash``.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import random
import re
import secrets
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import nacl.public
from cryptography.hazmat.primitives import serialization
from google.protobuf import duration_pb2
from prometheus_client import Counter, Gauge

from tunnelmesh import keyproof, pki, tokens
from tunnelmesh.api.v1 import common_pb2, node_pb2, state_pb2
from tunnelmesh.coord.config_view import (
    DeltaParts,
    NodeNotFound,
    SnapshotEncoder,
    ViewCache,
    coordinators_from_members,
)
from tunnelmesh.coord.raft.driver import DeadlineExceeded
from tunnelmesh.coord.raft.errors import Stopped
from tunnelmesh.coord.raft.transport import member_label
from tunnelmesh.coord.service import Coordinator, RequestFailed, _check_result, _remaining
from tunnelmesh.coord.state import (
    KEY_LENGTH,
    MAX_ENDPOINTS,
    ChangeSet,
    Endpoint,
    MeshState,
    Node,
    candidate_error,
    encode_command,
    is_label,
    ns_to_timestamp,
)
from tunnelmesh.protowire import varint

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 15.0
HEARTBEAT_JITTER = 0.75  # a stream's heartbeat gap is uniform in [0.75, 1] x the interval (never above it)
SEEN_INTERVAL = 30.0
STALE_INTERVALS = 3  # an online node unheard of for this many seen intervals is marked offline
RESUME_WAIT = 5.0  # how long a stream waits for this coordinator to reach a node's resume version
REPORT_INTERVAL = 30
REPORT_INTERVAL_AFTER_CHANGE = 10
# Streams that may do their work in one event-loop iteration; the rest wait for the next (see _Pacer).
PACE_PER_TURN = 64
# Each snapshot is a fresh ~130 KB at 1,000 nodes, held by the transport until the client has read it. After a
# burst of this many bytes, once snapshots paused for TRIM_QUIET s, give the freed heap back (malloc_trim):
# glibc keeps the peak otherwise, which at 1,000 watchers was three quarters of the coordinators' growth.
TRIM_AFTER_BYTES = 16 * 2**20
TRIM_QUIET = 2.0

REQUESTS = Counter(
    "tunnelmesh_node_api_requests_total",
    "NodeService calls by method and final gRPC status code (WatchConfig: counted when the stream ends).",
    ["method", "code"],
)
KEY_PROOF_REFUSED = Counter(
    "tunnelmesh_node_api_key_proof_refused_total",
    "Register calls refused because the key proof was missing, for another coordinator, malformed, forged "
    "(made without the key's private half), stale or bound to other fields.",
    ["reason"],
)
WATCHERS = Gauge("tunnelmesh_config_watchers", "Open WatchConfig streams on this coordinator.")
UPDATES = Counter("tunnelmesh_config_updates_sent_total", "WatchConfig messages sent, by kind.", ["kind"])
TRIMS = Counter("tunnelmesh_heap_trims_total", "Heap given back to the OS after a burst of config snapshots.")

_OK = grpc.StatusCode.OK
_NODE_ID_HEX = 6  # "n-" + 12 hex digits, as state.proto describes RegisterNode.node_id
_NOT_LABEL = re.compile(r"[^a-z0-9-]+")


def _derived_name(hostname: str) -> str:
    """A DNS label from a host name ("Web-01.lan" -> "web-01"); "node" if nothing usable is left."""
    label = _NOT_LABEL.sub("-", hostname.split(".", 1)[0].lower()).strip("-")[:63].rstrip("-")
    return label or "node"


def _duration(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


@dataclass(frozen=True, slots=True)
class PeerReport:
    """The last ReportStatus of a node, kept on the coordinator that received it (not replicated)."""

    node_id: str
    received_at: float  # time.time()
    agent_version: str
    peers: tuple[node_pb2.PeerStatus, ...]


class NodeServicer:  # registered by add_to_server (snapshots go out pre-serialized)
    """``NodeServicer(coord, ca=..., ca_pem=..., relay_key=...)``; run ``liveness_loop()`` next to the server.
    ``relay_key`` is this coordinator's relay key (``relay.load_relay_key``): Register key proofs are sealed
    to its public half."""

    def __init__(
        self,
        coord: Coordinator,
        *,
        ca: pki.CertificateAuthority | None,
        ca_pem: bytes,
        relay_key: nacl.public.PrivateKey,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        seen_interval: float = SEEN_INTERVAL,
        resume_wait: float = RESUME_WAIT,
    ) -> None:
        self.c = coord
        self.ca = ca
        self.ca_pem = ca_pem
        self.ca_fingerprint = ca.fingerprint if ca is not None else ""
        self.relay_key = relay_key
        self.heartbeat_interval = heartbeat_interval
        self.seen_interval = seen_interval
        self.resume_wait = resume_wait
        self.reports: dict[str, PeerReport] = {}
        self._cache = ViewCache()
        # Deltas shared by every stream at the same (base, version, with coordinators); valid for one state.
        self._parts: dict[tuple[int, int, bool], DeltaParts] = {}
        self._parts_for: tuple[int, int, int] = (0, 0, 0)
        # The shared delta of each DeltaParts, wrapped as a WatchConfigResponse once for every stream.
        self._wrapped: dict[tuple[int, int, bool], bytes] = {}
        self._pacer = _Pacer(PACE_PER_TURN)
        self._untrimmed = 0  # snapshot bytes sent since the heap was last trimmed
        self._last_snapshot = 0.0
        self._trim_timer: asyncio.TimerHandle | None = None
        self._coords: tuple[int, list[common_pb2.CoordinatorInfo]] = (-1, [])
        self._encoder: tuple[tuple[int, int, int], SnapshotEncoder] | None = None
        self._streams: Tally[str] = Tally()  # node id -> open streams here
        self._ended: dict[str, int] = {}  # node id -> ns when its last stream here ended (not yet reported)

    # -- helpers ---------------------------------------------------------------------------------------------

    @property
    def _state(self) -> MeshState:
        return self.c.driver.state  # replaced when a snapshot is installed: never keep it

    def coordinators(self) -> list[common_pb2.CoordinatorInfo]:
        """The coordinator list nodes see, rebuilt only when the member registry changed."""
        d = self.c.driver
        if self._coords[0] != d.members_index:
            self._coords = (d.members_index, coordinators_from_members(d.registry.members.values()))
        return self._coords[1]

    async def _fail(self, method: str, context: Any, exc: RequestFailed) -> None:
        REQUESTS.labels(method, exc.code.name).inc()
        log.info("event=node_api_refused method=%s code=%s reason=%r", method, exc.code.name, exc.message)
        await context.abort(exc.code, exc.message)

    async def _fresh_state(self, context: Any) -> MeshState:
        """The state after a linearizable read barrier: for a record this coordinator may not have applied yet
        (a join token or node created through another coordinator a moment ago)."""
        await self.c.read_barrier(_remaining(context))
        return self._state

    @property
    def coordinator_id(self) -> str:
        return member_label(self.c.driver.member_id)

    # -- GetServerInfo ---------------------------------------------------------------------------------------

    async def GetServerInfo(
        self, request: node_pb2.GetServerInfoRequest, context: Any
    ) -> node_pb2.GetServerInfoResponse:
        me = self.coordinator_id
        info = common_pb2.CoordinatorInfo(id=me)
        for c in self.coordinators():
            if c.id == me:
                info.CopyFrom(c)
        # The key Register verifies with, whatever the registry says (it may not list this member yet).
        info.relay_public_key = bytes(self.relay_key.public_key)
        settings = self._state.settings
        REQUESTS.labels("GetServerInfo", _OK.name).inc()
        return node_pb2.GetServerInfoResponse(
            coordinator=info,
            mesh_id=settings.mesh_id if settings is not None else "",
            server_time=ns_to_timestamp(time.time_ns()),
        )

    # -- Register --------------------------------------------------------------------------------------------

    async def Register(self, request: node_pb2.RegisterRequest, context: Any) -> node_pb2.RegisterResponse:
        try:
            response = await self._register(request, context)
        except RequestFailed as exc:
            await self._fail("Register", context, exc)
            raise
        REQUESTS.labels("Register", _OK.name).inc()
        return response

    async def _register(self, request: node_pb2.RegisterRequest, context: Any) -> node_pb2.RegisterResponse:
        try:
            join = tokens.JoinToken.parse(request.join_token)
        except tokens.TokenError as exc:
            raise RequestFailed(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        if self.ca_fingerprint and join.ca_fingerprint != self.ca_fingerprint:
            raise RequestFailed(
                grpc.StatusCode.UNAUTHENTICATED,
                f"join token {join.token_id} pins CA {join.ca_fingerprint[:19]}..., but this mesh's CA is "
                f"{self.ca_fingerprint[:19]}...: the token belongs to another mesh",
            )
        if len(request.public_key) != KEY_LENGTH:
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"public_key must be a {KEY_LENGTH}-byte X25519 key, got {len(request.public_key)} bytes",
            )
        self._check_key_proof(request, join.token_id)
        if request.name and not is_label(request.name):
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"name {request.name!r} is not a DNS label (1-63 lowercase letters, digits and '-', not at "
                "either end)",
            )
        state = self._state
        record = state.get_join_token(join.token_id)
        if record is None:
            state = await self._fresh_state(context)
            record = state.get_join_token(join.token_id)
        if record is None or not tokens.matches(join.secret, record.secret_hash):
            raise RequestFailed(
                grpc.StatusCode.UNAUTHENTICATED,
                f"join token {join.token_id} is not valid in this mesh (unknown id or wrong secret)",
            )
        settings = state.settings
        if settings is None:
            raise RequestFailed(
                grpc.StatusCode.UNAVAILABLE,
                "the mesh is not initialized yet (a new cluster's first leader has not proposed the mesh "
                "settings); retry",
            )
        existing = state.node_by_public_key(request.public_key)
        now = max(state.now, time.time_ns())
        reason = record.rejection(now)
        is_retry = (
            existing is not None
            and existing.join_token_id == record.token_id
            and not (record.revoked_at is not None or record.expires_at <= now)
        )
        if reason is not None and not is_retry:
            raise RequestFailed(grpc.StatusCode.UNAUTHENTICATED, reason)
        missing = sorted(set(request.tags).difference(record.tags))
        if missing:
            raise RequestFailed(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tags {missing} are not granted by join token {record.token_id} (it grants "
                f"{list(record.tags)})",
            )
        node_id = existing.node_id if existing is not None else "n-" + secrets.token_hex(_NODE_ID_HEX)
        chain = self._issue_certificate(
            request.csr_der, settings.mesh_id, node_id
        )  # validates before writing
        node_token = tokens.NodeToken.new(node_id)
        token_hash = node_token.secret_hash
        # Same bytes on every internal retry of the write (leader change): the state applies it once.
        request_id = (
            "register-"
            + hashlib.sha256(record.token_id.encode() + request.public_key + token_hash).hexdigest()[:32]
        )
        body = state_pb2.RegisterNode(
            node_id=node_id,
            join_token_id=record.token_id,
            public_key=request.public_key,
            name=request.name or _derived_name(request.hostname),
            hostname=request.hostname,
            tags=request.tags,
            node_token_hash=token_hash,
            agent_version=request.agent_version,
            platform=request.platform,
        )
        data = encode_command(
            body, proposed_at=time.time_ns(), request_id=request_id, actor=f"join-token:{record.token_id}"
        )
        result = await self.c.write(data, _remaining(context))
        _check_result(result)
        node = result.register_node.node
        if node.node_id != node_id:
            # The key was registered meanwhile (a retry of a Register that another coordinator applied before
            # this one saw it): the state kept that node and took our token hash, so name that node.
            node_token = tokens.NodeToken(node.node_id, node_token.secret)
            chain = self._issue_certificate(request.csr_der, settings.mesh_id, node.node_id)
        lengths = [p.rpartition("/")[2] for p in settings.mesh_prefixes]
        log.info(
            "event=node_registered node=%s name=%s join_token=%s retry=%s",
            node.node_id,
            node.name,
            record.token_id,
            existing is not None,
        )
        return node_pb2.RegisterResponse(
            node_id=node.node_id,
            name=node.name,
            mesh_addresses=[f"{ip}/{n}" for ip, n in zip(node.mesh_ips, lengths, strict=True)],
            mesh_domain=settings.mesh_domain,
            ca_certificates_pem=self.ca_pem,
            client_certificate_chain_pem=chain,
            node_token=str(node_token),
            coordinators=self.coordinators(),
            mesh_id=settings.mesh_id,
        )

    def _check_key_proof(self, request: node_pb2.RegisterRequest, join_token_id: str) -> None:
        """Refuses a Register whose caller did not prove it holds the private key of ``public_key``."""
        me = self.coordinator_id
        if not request.key_proof:
            KEY_PROOF_REFUSED.labels("missing").inc()
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                "key_proof is missing: the agent must prove it holds the node's private key (GetServerInfo, "
                "then Register with key_proof and coordinator_id; agents older than this coordinator must be "
                "upgraded, see docs/security.md)",
            )
        if request.coordinator_id != me:
            KEY_PROOF_REFUSED.labels("wrong_coordinator").inc()
            raise RequestFailed(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"key_proof is for coordinator {request.coordinator_id or '(none)'}, this is {me}; call "
                "GetServerInfo on the coordinator you register with",
            )
        try:
            keyproof.verify(
                request.key_proof,
                bytes(self.relay_key),
                public_key=request.public_key,
                join_token_id=join_token_id,
                coordinator_id=me,
                now_ns=time.time_ns(),
            )
        except keyproof.KeyProofError as exc:
            KEY_PROOF_REFUSED.labels(exc.reason).inc()
            raise RequestFailed(grpc.StatusCode.UNAUTHENTICATED, f"key proof refused: {exc}") from None

    def _issue_certificate(self, csr_der: bytes, mesh_id: str, node_id: str) -> bytes:
        if not csr_der:
            return b""
        if self.ca is None:
            raise RequestFailed(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this cluster uses operator-supplied certificates and cannot sign node CSRs: register "
                "without a CSR and authenticate with the node token",
            )
        try:
            cert = pki.issue_node_certificate(self.ca, csr_der, mesh_id=mesh_id, node_id=node_id)
        except pki.PkiError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return cert.public_bytes(serialization.Encoding.PEM) + self.ca.certificate_pem

    # -- node authentication ---------------------------------------------------------------------------------

    async def _authenticate(self, context: Any, node_id: str) -> Node:
        raw = tokens.bearer(context.invocation_metadata())
        if raw is None:
            raise RequestFailed(
                grpc.StatusCode.UNAUTHENTICATED,
                "no node credential: send metadata 'authorization: Bearer tmn_...' (the node_token Register "
                "returned)",
            )
        try:
            token = tokens.NodeToken.parse(raw)
        except tokens.TokenError as exc:
            raise RequestFailed(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        node = self._state.get_node(token.node_id)
        if node is None or not tokens.matches(token.secret, node.node_token_hash):
            node = (await self._fresh_state(context)).get_node(token.node_id)  # maybe registered elsewhere
        if node is None:
            raise RequestFailed(
                grpc.StatusCode.NOT_FOUND,
                f"node {token.node_id} is not registered (removed?); join again with a new join token",
            )
        if not tokens.matches(token.secret, node.node_token_hash):
            raise RequestFailed(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the node token for {token.node_id} is not valid (replaced by a later Register?)",
            )
        if not node_id:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "node_id is empty: send the node's own id")
        if node_id != token.node_id:
            raise RequestFailed(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the credential of node {token.node_id} may not act for node {node_id!r}",
            )
        return node

    # -- WatchConfig -----------------------------------------------------------------------------------------

    async def WatchConfig(
        self, request: node_pb2.WatchConfigRequest, context: Any
    ) -> AsyncIterator[_Outgoing]:
        method = "WatchConfig"
        try:
            node = await self._authenticate(context, request.node_id)
        except RequestFailed as exc:
            await self._fail(method, context, exc)
            raise
        node_id = node.node_id
        self._streams[node_id] += 1
        self._ended.pop(node_id, None)
        WATCHERS.inc()
        log.info("event=watch_started node=%s resume_from=%d", node_id, request.resume_from_version)
        code = grpc.StatusCode.CANCELLED
        failure: RequestFailed | None = None
        try:
            async for message in self._stream(node_id, request.resume_from_version):
                box = _Outgoing(message)
                del message
                yield box
                box.data = b""  # sent; grpc's handler keeps the last item until the next one (~15 s)
            code = _OK
        except RequestFailed as exc:
            failure = exc
            code = exc.code
        finally:
            WATCHERS.dec()
            self._streams[node_id] -= 1
            if self._streams[node_id] <= 0:
                del self._streams[node_id]
                self._ended[node_id] = time.time_ns()
            if failure is None:
                REQUESTS.labels(method, code.name).inc()
                log.info("event=watch_ended node=%s code=%s", node_id, code.name)
        if failure is not None:
            await self._fail(method, context, failure)

    async def _stream(self, node_id: str, resume: int) -> AsyncIterator[node_pb2.WatchConfigResponse | bytes]:
        d = self.c.driver
        if resume > d.applied:
            try:
                await d.wait_applied(resume, self.resume_wait)
            except Stopped as exc:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"{exc}; try another coordinator") from None
            except DeadlineExceeded:
                raise RequestFailed(
                    grpc.StatusCode.UNAVAILABLE,
                    f"this coordinator has applied up to index {d.applied}, behind the version {resume} the "
                    "node already has; try another coordinator",
                ) from None
        await self._pacer.turn()  # a thousand nodes reconnecting at once: snapshots in groups
        event = d.applied_changed  # before reading the state: a change after this read sets it
        state = self._state
        version = max(state.config_version, d.members_index, resume)
        changes = state.changes_since(resume) if resume else None
        first: node_pb2.WatchConfigResponse | bytes
        if changes is None:
            first = self._snapshot(state, node_id, version)
        else:
            coords = d.members_index > resume  # the list may have changed since the node's version
            delta = self._delta(state, node_id, changes, resume, version, coords)
            first = delta if delta is not None else self._heartbeat(version)
        sent, sent_coords = version, self.coordinators()
        yield first
        # The generator lives as long as the stream: keep no reference to what was sent.
        del first, changes, state
        next_beat = time.monotonic() + self._beat_gap()
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_beat - time.monotonic())):
                    await event.wait()
            except TimeoutError:
                yield self._heartbeat(sent)
                next_beat = time.monotonic() + self._beat_gap()
                continue
            await self._pacer.turn()
            event = d.applied_changed
            state = self._state
            if state.get_node(node_id) is None:
                raise RequestFailed(grpc.StatusCode.NOT_FOUND, f"node {node_id} was removed from the mesh")
            current = self.coordinators()  # the same list object until the registry changes
            coords = current is not sent_coords and current != sent_coords
            if state.config_version <= sent and not coords:
                continue
            version = max(state.config_version, d.members_index if coords else 0, sent)
            changes = state.changes_since(sent)
            message: bytes
            if changes is None or changes.settings_changed:
                message = self._snapshot(state, node_id, version)
            else:
                maybe = self._delta(state, node_id, changes, sent, version, coords)
                if maybe is None:
                    continue
                message = maybe
            sent, sent_coords = version, current
            yield message
            del message, changes, state
            next_beat = time.monotonic() + self._beat_gap()

    def _snapshot(self, state: MeshState, node_id: str, version: int) -> bytes:
        """A serialized WatchConfigResponse{snapshot} (see ``add_to_server``): thousands of streams connecting
        at once share one encoding of the mesh."""
        key = (id(state), state.config_version, self.c.driver.members_index)
        if self._encoder is None or self._encoder[0] != key:
            self._encoder = (key, SnapshotEncoder(state, self.coordinators(), cache=self._cache))
        try:
            snap = self._encoder[1].encode(node_id, version)
        except NodeNotFound as exc:
            raise RequestFailed(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        UPDATES.labels("snapshot").inc()
        self._note_snapshot(len(snap))
        return _SNAPSHOT_TAG + varint(len(snap)) + snap

    def _note_snapshot(self, size: int) -> None:
        self._untrimmed += size
        self._last_snapshot = time.monotonic()
        if self._untrimmed >= TRIM_AFTER_BYTES and self._trim_timer is None and _malloc_trim is not None:
            self._trim_timer = asyncio.get_running_loop().call_later(TRIM_QUIET, self._trim_heap)

    def _trim_heap(self) -> None:
        """Gives the heap freed by a burst of snapshots back to the OS, once the burst is over."""
        quiet = time.monotonic() - self._last_snapshot
        if quiet < TRIM_QUIET:
            self._trim_timer = asyncio.get_running_loop().call_later(TRIM_QUIET - quiet, self._trim_heap)
            return
        self._trim_timer = None
        burst, self._untrimmed = self._untrimmed, 0
        assert _malloc_trim is not None
        started = time.monotonic()
        _malloc_trim(0)
        TRIMS.inc()
        log.info(
            "event=heap_trimmed snapshot_mib=%.1f seconds=%.3f", burst / 2**20, time.monotonic() - started
        )

    def _delta(
        self, state: MeshState, node_id: str, changes: ChangeSet, base: int, version: int, coords: bool
    ) -> bytes | None:
        """A serialized WatchConfigResponse{delta}, or None if nothing the node sees changed."""
        key_state = (id(state), state.config_version, self.c.driver.members_index)
        if key_state != self._parts_for:
            self._parts.clear()
            self._wrapped.clear()
            self._parts_for = key_state
            self._cache.forget(n for n in changes.removed_node_ids if state.get_node(n) is None)
        key = (base, version, coords)
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= 1024:  # streams at many different versions: bound the memo
                self._parts.clear()
                self._wrapped.clear()
            parts = DeltaParts(
                state,
                changes,
                base,
                self.coordinators() if coords else None,
                version=version,
                cache=self._cache,
            )
            self._parts[key] = parts
        try:
            delta = parts.encoded_for(node_id)
        except NodeNotFound as exc:
            raise RequestFailed(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        if delta is None:
            return None
        UPDATES.labels("delta").inc()
        if delta is not parts.shared:  # a node inside the change set: its own delta
            return _DELTA_TAG + varint(len(delta)) + delta
        wrapped = self._wrapped.get(key)
        if wrapped is None:  # the shared delta: wrapped once, the same bytes for every stream
            wrapped = self._wrapped[key] = _DELTA_TAG + varint(len(delta)) + delta
        return wrapped

    def _beat_gap(self) -> float:
        """Idle time before a heartbeat: 75-100 % of the interval, at random. Streams opened together (a
        thousand nodes after a restart) would otherwise send every heartbeat together, forever."""
        return self.heartbeat_interval * random.uniform(HEARTBEAT_JITTER, 1.0)

    def _heartbeat(self, version: int) -> node_pb2.WatchConfigResponse:
        UPDATES.labels("heartbeat").inc()
        beat = node_pb2.Heartbeat(
            version=version,
            server_time=ns_to_timestamp(time.time_ns()),
            coordinator_id=member_label(self.c.driver.member_id),
        )
        return node_pb2.WatchConfigResponse(heartbeat=beat)

    # -- ReportStatus ----------------------------------------------------------------------------------------

    async def ReportStatus(
        self, request: node_pb2.ReportStatusRequest, context: Any
    ) -> node_pb2.ReportStatusResponse:
        try:
            changed = await self._report(request, context)
        except RequestFailed as exc:
            await self._fail("ReportStatus", context, exc)
            raise
        REQUESTS.labels("ReportStatus", _OK.name).inc()
        interval = REPORT_INTERVAL_AFTER_CHANGE if changed else REPORT_INTERVAL
        return node_pb2.ReportStatusResponse(next_report_in=_duration(interval))

    async def _report(self, request: node_pb2.ReportStatusRequest, context: Any) -> bool:
        node = await self._authenticate(context, request.node_id)
        if len(request.endpoints) > MAX_ENDPOINTS:
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.endpoints)} endpoints; the limit is {MAX_ENDPOINTS}",
            )
        for candidate in request.endpoints:
            reason = candidate_error(candidate)
            if reason is not None:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, reason)
        self.reports[node.node_id] = PeerReport(
            node.node_id, time.time(), request.agent_version, tuple(request.peers)
        )
        wanted = tuple(
            Endpoint(int(c.type), c.address, c.priority, c.relay_coordinator_id) for c in request.endpoints
        )
        if wanted == node.endpoints:
            return False
        body = state_pb2.SetNodeEndpoints(
            node_id=node.node_id, endpoints=request.endpoints, agent_version=request.agent_version
        )
        request_id = f"endpoints-{node.node_id}-{secrets.token_hex(8)}"
        data = encode_command(
            body, proposed_at=time.time_ns(), request_id=request_id, actor=f"node:{node.node_id}"
        )
        result = await self.c.write(data, _remaining(context))
        _check_result(result)
        log.info("event=node_endpoints_changed node=%s endpoints=%d", node.node_id, len(wanted))
        return True

    # -- liveness --------------------------------------------------------------------------------------------

    def seen_batch(self) -> list[state_pb2.NodeSeen]:
        """What the next RecordNodesSeen carries: nodes streaming here (online) and nodes whose last stream
        here ended since the previous batch (offline, unless another coordinator heard from them since)."""
        now = time.time_ns()
        state = self._state
        batch = [
            state_pb2.NodeSeen(node_id=n, last_seen=ns_to_timestamp(now), online=True)
            for n in sorted(self._streams)
        ]
        for node_id, ended in sorted(self._ended.items()):
            node = state.get_node(node_id)
            if node is None or (node.last_seen is not None and node.last_seen > ended):
                continue  # removed, or seen by another coordinator after it left here
            batch.append(state_pb2.NodeSeen(node_id=node_id, last_seen=ns_to_timestamp(ended), online=False))
        if self.c.driver.is_leader:
            # A coordinator that died cannot report its nodes offline; every holder of a stream refreshes
            # last_seen each interval, so an "online" node unheard of for STALE_INTERVALS intervals is
            # orphaned. Only the leader sweeps, so that coordinators do not all propose the same thing.
            horizon = now - int(STALE_INTERVALS * self.seen_interval * 1e9)
            listed = {s.node_id for s in batch}
            batch += [
                state_pb2.NodeSeen(node_id=n.node_id, online=False)
                for n in sorted(state.nodes(), key=lambda n: n.node_id)
                if n.online and n.node_id not in listed and (n.last_seen is None or n.last_seen < horizon)
            ]
        return batch

    async def liveness_loop(self) -> None:
        """Propose RecordNodesSeen at most every ``seen_interval`` while there is something to record."""
        while True:
            await asyncio.sleep(self.seen_interval)
            batch = self.seen_batch()
            if not batch:
                continue
            reported = {s.node_id for s in batch if not s.online}
            data = encode_command(
                state_pb2.RecordNodesSeen(nodes=batch),
                proposed_at=time.time_ns(),
                request_id=f"seen-{member_label(self.c.driver.member_id)}-{secrets.token_hex(8)}",
                actor=f"coordinator:{member_label(self.c.driver.member_id)}",
            )
            try:
                _check_result(await self.c.write(data, min(10.0, self.seen_interval)))
            except RequestFailed as exc:
                log.warning("event=nodes_seen_failed nodes=%d reason=%r", len(batch), exc.message)
                continue
            for node_id in reported:
                self._ended.pop(node_id, None)

    # -- status ----------------------------------------------------------------------------------------------

    def watched_nodes(self) -> Sequence[str]:
        """Node ids with an open WatchConfig stream on this coordinator."""
        return sorted(self._streams)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS): then the peak simply stays."""
    try:
        fn: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return fn


_malloc_trim = _libc_malloc_trim()
_SNAPSHOT_TAG = varint(node_pb2.WatchConfigResponse.SNAPSHOT_FIELD_NUMBER << 3 | 2)
_DELTA_TAG = varint(node_pb2.WatchConfigResponse.DELTA_FIELD_NUMBER << 3 | 2)


class _Pacer:
    """Spreads work that many tasks start in the same event-loop iteration over several iterations.

    One applied entry sets the event every stream waits on, so all of them run in one iteration, and asyncio
    polls no socket until that iteration ends. ``turn()`` lets ``per_turn`` callers through at once; the
    others queue (FIFO) and are released ``per_turn`` per iteration, the loop serving I/O in between. Each
    waiter wakes once: no polling.
    """

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self._left = per_turn
        self._queue: deque[asyncio.Future[None]] = deque()
        self._reset_pending = False

    async def turn(self) -> None:
        if self._left > 0 and not self._queue:
            self._left -= 1
            self._schedule_reset()
            return
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        self._schedule_reset()
        await fut  # a cancelled waiter's future is skipped when released

    def _schedule_reset(self) -> None:
        if not self._reset_pending:  # call_soon: runs in the next iteration, after this one's I/O poll
            asyncio.get_running_loop().call_soon(self._reset)
            self._reset_pending = True

    def _reset(self) -> None:
        self._reset_pending = False
        self._left = self.per_turn
        while self._queue and self._left > 0:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(None)  # the waiter runs in the next iteration
                self._left -= 1
        if self._queue or self._left < self.per_turn:
            self._schedule_reset()


class _Outgoing:
    """One WatchConfig message on its way out. grpc keeps a reference to the last item a handler yielded
    until the next one, up to a heartbeat interval later, and a 1,000-node snapshot is ~130 KB per stream:
    the handler empties the box once the message was sent."""

    __slots__ = ("data",)

    def __init__(self, message: node_pb2.WatchConfigResponse | bytes) -> None:
        self.data = message if isinstance(message, bytes) else message.SerializeToString()


def _serialize_update(message: _Outgoing) -> bytes:
    return message.data


def add_to_server(servicer: NodeServicer, server: grpc.aio.Server) -> None:
    """Like the generated ``add_NodeServiceServicer_to_server``, but WatchConfig yields responses that are
    already serialized (``_Outgoing``): snapshots and shared deltas are encoded once, not once per stream."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo,
            request_deserializer=node_pb2.GetServerInfoRequest.FromString,
            response_serializer=node_pb2.GetServerInfoResponse.SerializeToString,
        ),
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register,
            request_deserializer=node_pb2.RegisterRequest.FromString,
            response_serializer=node_pb2.RegisterResponse.SerializeToString,
        ),
        "WatchConfig": grpc.unary_stream_rpc_method_handler(
            servicer.WatchConfig,
            request_deserializer=node_pb2.WatchConfigRequest.FromString,
            response_serializer=_serialize_update,
        ),
        "ReportStatus": grpc.unary_unary_rpc_method_handler(
            servicer.ReportStatus,
            request_deserializer=node_pb2.ReportStatusRequest.FromString,
            response_serializer=node_pb2.ReportStatusResponse.SerializeToString,
        ),
    }
    name = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


__all__ = ["NodeServicer", "PeerReport", "add_to_server"]
