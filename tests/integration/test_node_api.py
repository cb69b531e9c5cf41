"""NodeService against real coordinators (in-process, loopback, TLS): Register, WatchConfig, ReportStatus.

The coordinators run as ``CoordinatorProcess`` tasks in the test's event loop, so a test can look at the
replicated state directly to check that a refused request changed nothing. Join tokens, renames and removals
go through AdminService with the bootstrap admin token (``tunnelmesh.client``), as an operator's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nacl.public
import pytest
from cryptography import x509
from prometheus_client import REGISTRY

from tunnelmesh import client, keyproof, pki, tokens
from tunnelmesh.api.v1 import common_pb2, node_pb2, node_pb2_grpc, state_pb2
from tunnelmesh.coord import relay
from tunnelmesh.coord.bootstrap import ADMIN_TOKEN_FILE
from tunnelmesh.coord.config_view import normalized, snapshot_for
from tunnelmesh.coord.node_api import NodeServicer
from tunnelmesh.coord.raft.driver import DriverOptions
from tunnelmesh.coord.server import JOIN_SECRET_FILE, CoordinatorProcess, CoordOptions
from tunnelmesh.coord.service import Coordinator
from tunnelmesh.coord.state import MeshState, encode_command, ns_to_timestamp
from tunnelmesh.node.config_apply import apply_delta

START_TIMEOUT = 60.0  # generous: the machine is shared
READ_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Coord:
    proc: CoordinatorProcess
    task: asyncio.Task[None]
    api: str
    data_dir: Path

    @property
    def node_api(self) -> NodeServicer:
        return self.proc.node_api

    @property
    def coord(self) -> Coordinator:
        return self.proc.node_api.c

    @property
    def state(self) -> MeshState:
        return self.coord.driver.state

    def channel(self) -> grpc.aio.Channel:
        return client.open_channel(self.api, ca_pem=self.node_api.ca_pem)

    def admin(self) -> client.Client:
        token = (self.data_dir / ADMIN_TOKEN_FILE).read_text().strip()
        return client.Client([self.api], ca_pem=self.node_api.ca_pem, token=token, deadline=20.0)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


async def _until(what: str, check: Any, timeout: float = START_TIMEOUT) -> None:  # noqa: ASYNC109 - a wait budget
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def start_coord(root: Path, name: str, *, seed: Coord | None = None) -> Coord:
    api = f"127.0.0.1:{_free_port()}"
    opts = CoordOptions(
        data_dir=root / name,
        listen=api,
        raft_listen=f"127.0.0.1:{_free_port()}",
        bootstrap=seed is None,
        seeds=[seed.api] if seed else [],
        join_secret=(seed.data_dir / JOIN_SECRET_FILE).read_text().strip() if seed else None,
        name=name,
        relay_listen=None,
        http_listen=None,
        driver=DriverOptions(tick=0.05),
    )
    proc = CoordinatorProcess(opts)
    task = asyncio.create_task(proc.run(), name=f"coordinator-{name}")
    c = Coord(proc, task, api, root / name)

    def ready() -> bool:
        if task.done():
            task.result()  # raises the coordinator's error
        if not hasattr(proc, "node_api"):
            return False
        state = proc.node_api.c.driver.state
        return state.settings is not None and bool(state.api_tokens())  # InitializeMesh and the admin token

    await _until(f"coordinator {name} to serve an initialized mesh", ready)
    return c


@pytest.fixture
async def one(tmp_path: Path) -> AsyncIterator[Coord]:
    c = await start_coord(tmp_path, "c1")
    try:
        yield c
    finally:
        await c.stop()


# -- helpers ------------------------------------------------------------------------------------------------


async def make_token(
    c: Coord, *, tags: tuple[str, ...] = (), reusable: bool = False, max_uses: int = 0, ttl: float = 3600
) -> tokens.JoinToken:
    async with c.admin() as admin:
        resp = await admin.create_join_token(tags=tags, reusable=reusable, max_uses=max_uses, ttl=ttl)
    return tokens.JoinToken.parse(resp.secret)


def keypair(n: int) -> nacl.public.PrivateKey:
    """Node n's X25519 key pair (deterministic, so that n names the same node across calls)."""
    return nacl.public.PrivateKey(hashlib.sha256(b"node-key-%d" % n).digest())


def pubkey(n: int) -> bytes:
    return bytes(keypair(n).public_key)


async def register(c: Coord, token: tokens.JoinToken | str, n: int, **kw: Any) -> node_pb2.RegisterResponse:
    """Register node n as an agent does (GetServerInfo, then Register with a key proof). ``key`` overrides
    the public key sent and ``private`` the key that makes the proof (both node n's by default)."""
    private: nacl.public.PrivateKey = kw.pop("private", keypair(n))
    async with c.channel() as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        req = node_pb2.RegisterRequest(join_token=str(token), public_key=kw.pop("key", pubkey(n)), **kw)
        if not req.hostname:
            req.hostname = f"host{n}.lan"
        return await keyproof.register(stub, req, bytes(private), timeout=20.0)


def bearer(node_token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {node_token}"),)


async def read(call: Any, timeout: float = READ_TIMEOUT) -> node_pb2.WatchConfigResponse:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        msg = await call.read()
    assert msg is not grpc.aio.EOF, "the stream ended"
    return msg  # type: ignore[no-any-return]


async def read_until(
    call: Any,
    kind: str,
    timeout: float = READ_TIMEOUT,  # noqa: ASYNC109 - a wait budget
) -> node_pb2.WatchConfigResponse:
    """The next message of ``kind``, skipping heartbeats and liveness deltas."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await read(call, max(0.01, deadline - time.monotonic()))
        if msg.WhichOneof("update") == kind:
            return msg


def requests_count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("tunnelmesh_node_api_requests_total", {"method": method, "code": code})
    return value or 0.0


# -- tests --------------------------------------------------------------------------------------------------


async def test_register_then_snapshot_then_a_new_node_reaches_the_stream_as_a_delta_within_1s(
    one: Coord,
) -> None:
    token = await make_token(one, reusable=True, tags=("tag:ci",))
    a = await register(one, token, 1, name="alpha")
    assert a.name == "alpha" and a.node_id.startswith("n-")
    assert a.mesh_addresses == ["100.64.0.1/10"] and a.mesh_domain == "mesh.internal"
    assert a.ca_certificates_pem == (one.data_dir / pki.CA_CERT_FILE).read_bytes()
    assert [c.api_address for c in a.coordinators] == [one.api]
    assert a.mesh_id == one.state.settings.mesh_id  # type: ignore[union-attr]
    assert a.node_token.startswith(f"tmn_{a.node_id}_")

    async with one.channel() as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        call = stub.WatchConfig(node_pb2.WatchConfigRequest(node_id=a.node_id), metadata=bearer(a.node_token))
        first = await read(call)
        snap = first.snapshot
        assert snap.self.node_id == a.node_id and not snap.peers
        assert [r.name for r in snap.dns.records] == ["alpha.mesh.internal"]
        assert snap.version == one.state.config_version
        assert one.node_api.watched_nodes() == [a.node_id]

        registered_at = time.monotonic()
        b = await register(one, token, 2, hostname="Beta-Box.example.org")
        msg = await read_until(call, "delta")
        latency = time.monotonic() - registered_at
        assert latency < 1.0, f"a new node reached the watcher after {latency:.2f}s"
        delta = msg.delta
        assert delta.base_version == snap.version
        assert [p.node_id for p in delta.upserted_peers] == [b.node_id]
        assert b.name == "beta-box", "name derived from the host name"
        assert delta.upserted_peers[0].allowed_ips == ["100.64.0.2/32"]
        assert [r.name for r in delta.upserted_dns_records] == ["beta-box.mesh.internal"]
        assert normalized(apply_delta(snap, delta)) == normalized(
            snapshot_for(one.state, a.node_id, one.node_api.coordinators(), version=delta.version)
        )
        call.cancel()


async def test_rename_and_remove_reach_watchers_and_the_removed_nodes_stream_ends_not_found(
    one: Coord,
) -> None:
    token = await make_token(one, reusable=True)
    a = await register(one, token, 1)
    b = await register(one, token, 2)
    async with one.channel() as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        watch_a = stub.WatchConfig(
            node_pb2.WatchConfigRequest(node_id=a.node_id), metadata=bearer(a.node_token)
        )
        watch_b = stub.WatchConfig(
            node_pb2.WatchConfigRequest(node_id=b.node_id), metadata=bearer(b.node_token)
        )
        assert (await read(watch_a)).HasField("snapshot") and (await read(watch_b)).HasField("snapshot")

        async with one.admin() as admin:
            await admin.rename_node(b.node_id, "db")
        delta = (await read_until(watch_a, "delta")).delta
        assert [p.name for p in delta.upserted_peers] == ["db"]
        assert [k.name for k in delta.removed_dns_records] == ["host2.mesh.internal"]
        own = (await read_until(watch_b, "delta")).delta
        assert own.self.name == "db", "the renamed node sees its own new name"

        async with one.admin() as admin:
            removed_at = time.monotonic()
            await admin.remove_node(b.node_id)
        delta = (await read_until(watch_a, "delta")).delta
        assert time.monotonic() - removed_at < 1.0, "a removal reaches the other watchers within 1 s"
        assert list(delta.removed_peer_ids) == [b.node_id]
        assert [k.name for k in delta.removed_dns_records] == ["db.mesh.internal"]
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await read_until(watch_b, "never")
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND and "removed" in (ended.value.details() or "")
        watch_a.cancel()


async def test_resume_gives_deltas_heartbeats_when_current_and_a_snapshot_when_too_old(one: Coord) -> None:
    token = await make_token(one, reusable=True)
    a = await register(one, token, 1)
    one.node_api.heartbeat_interval = 0.5
    async with one.channel() as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        md = bearer(a.node_token)
        call = stub.WatchConfig(node_pb2.WatchConfigRequest(node_id=a.node_id), metadata=md)
        snap = (await read(call)).snapshot
        beat = await read_until(call, "heartbeat", timeout=5.0)
        assert beat.heartbeat.version == snap.version and beat.heartbeat.coordinator_id
        call.cancel()

        b = await register(one, token, 2)
        req = node_pb2.WatchConfigRequest(node_id=a.node_id, resume_from_version=snap.version)
        call = stub.WatchConfig(req, metadata=md)
        first = await read(call)
        assert first.WhichOneof("update") == "delta", "resuming gives a delta, not a snapshot"
        assert first.delta.base_version == snap.version
        assert [p.node_id for p in first.delta.upserted_peers] == [b.node_id]
        call.cancel()

        current = node_pb2.WatchConfigRequest(node_id=a.node_id, resume_from_version=first.delta.version)
        call = stub.WatchConfig(current, metadata=md)
        assert (await read(call)).heartbeat.version == first.delta.version, "up to date: a heartbeat"
        call.cancel()

        ahead = node_pb2.WatchConfigRequest(node_id=a.node_id, resume_from_version=10**9)
        one.node_api.resume_wait = 0.5
        call = stub.WatchConfig(ahead, metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as behind:
            await read(call)
        assert behind.value.code() == grpc.StatusCode.UNAVAILABLE and "behind" in (
            behind.value.details() or ""
        )


async def test_report_status_replicates_changed_endpoints_only_and_refuses_bad_ones(one: Coord) -> None:
    token = await make_token(one, reusable=True)
    a = await register(one, token, 1)
    b = await register(one, token, 2)
    host = common_pb2.CANDIDATE_TYPE_HOST
    async with one.channel() as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        watch_b = stub.WatchConfig(
            node_pb2.WatchConfigRequest(node_id=b.node_id), metadata=bearer(b.node_token)
        )
        await read(watch_b)
        report = node_pb2.ReportStatusRequest(
            node_id=a.node_id,
            endpoints=[common_pb2.Candidate(type=host, address="192.0.2.7:51820", priority=5)],
            peers=[node_pb2.PeerStatus(peer_id=b.node_id, path_type=common_pb2.PATH_TYPE_DIRECT)],
        )
        resp = await stub.ReportStatus(report, metadata=bearer(a.node_token), timeout=20.0)
        assert resp.next_report_in.seconds == 10, "sooner after a change"
        delta = (await read_until(watch_b, "delta")).delta
        assert [e.address for e in delta.upserted_peers[0].endpoints] == ["192.0.2.7:51820"]
        version = one.state.config_version
        resp = await stub.ReportStatus(report, metadata=bearer(a.node_token), timeout=20.0)
        assert resp.next_report_in.seconds == 30 and one.state.config_version == version, (
            "unchanged: no write"
        )
        assert one.node_api.reports[a.node_id].peers[0].peer_id == b.node_id

        before = requests_count("ReportStatus", "INVALID_ARGUMENT")
        bad = node_pb2.ReportStatusRequest(
            node_id=a.node_id, endpoints=[common_pb2.Candidate(type=host, address="not-an-address")]
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReportStatus(bad, metadata=bearer(a.node_token), timeout=20.0)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not-an-address" in (refused.value.details() or "")
        assert one.state.config_version == version
        assert requests_count("ReportStatus", "INVALID_ARGUMENT") == before + 1
        watch_b.cancel()


async def test_retried_register_is_idempotent_and_a_csr_gets_a_client_certificate(one: Coord) -> None:
    token = await make_token(one)  # single use
    key = pki.new_private_key()
    first = await register(one, token, 1, csr_der=pki.create_node_csr(key))
    again = await register(one, token, 1)  # the response was "lost": same token, same key
    assert (again.node_id, list(again.mesh_addresses)) == (first.node_id, list(first.mesh_addresses))
    assert again.node_token != first.node_token
    assert one.state.node_count == 1
    assert one.state.get_join_token(token.token_id).uses == 1  # type: ignore[union-attr]
    cas = x509.load_pem_x509_certificates(first.ca_certificates_pem)
    pki.verify_node_certificate(  # raises unless it is for this key, names this node and chains to the CA
        first.client_certificate_chain_pem, key, cas, mesh_id=first.mesh_id, node_id=first.node_id
    )
    async with one.channel() as ch:  # only the latest node token is valid
        stub = node_pb2_grpc.NodeServiceStub(ch)
        req = node_pb2.WatchConfigRequest(node_id=first.node_id)
        with pytest.raises(grpc.aio.AioRpcError) as old:
            await read(stub.WatchConfig(req, metadata=bearer(first.node_token)))
        assert old.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = stub.WatchConfig(req, metadata=bearer(again.node_token))
        assert (await read(call)).HasField("snapshot")
        call.cancel()


async def test_bad_requests_are_refused_with_the_right_code_counted_and_change_nothing(one: Coord) -> None:
    single = await make_token(one)
    used = await register(one, single, 1)
    revoked = await make_token(one, reusable=True)
    async with one.admin() as admin:
        await admin.revoke_join_token(revoked.token_id)
    expired = await make_token(one, ttl=1.0)
    tagged = await make_token(one, tags=("tag:ci",))
    good = await make_token(one, reusable=True)
    unknown = tokens.JoinToken.new(one.node_api.ca_fingerprint)
    other_ca = tokens.JoinToken(good.token_id, good.secret, "sha256:" + "ab" * 32)
    other = await register(one, good, 2)
    await asyncio.sleep(1.2)  # let `expired` expire

    register_cases: list[tuple[str, tokens.JoinToken | str, dict[str, Any], grpc.StatusCode, str]] = [
        ("malformed", "tmj_not-a-token", {}, grpc.StatusCode.UNAUTHENTICATED, "malformed join token"),
        ("unknown", unknown, {}, grpc.StatusCode.UNAUTHENTICATED, "not valid in this mesh"),
        ("other CA", other_ca, {}, grpc.StatusCode.UNAUTHENTICATED, "another mesh"),
        ("used up", single, {}, grpc.StatusCode.UNAUTHENTICATED, "used up"),
        ("revoked", revoked, {}, grpc.StatusCode.UNAUTHENTICATED, "revoked"),
        ("expired", expired, {}, grpc.StatusCode.UNAUTHENTICATED, "expired"),
        ("short key", good, {"key": b"\x01" * 31}, grpc.StatusCode.INVALID_ARGUMENT, "32-byte"),
        ("bad name", good, {"name": "Not_A_Label"}, grpc.StatusCode.INVALID_ARGUMENT, "DNS label"),
        ("bad CSR", good, {"csr_der": b"junk"}, grpc.StatusCode.INVALID_ARGUMENT, "CSR"),
        ("tags", tagged, {"tags": ["tag:prod"]}, grpc.StatusCode.PERMISSION_DENIED, "not granted"),
    ]
    for what, token, kw, code, text in register_cases:
        nodes, uses = one.state.node_count, {t.token_id: t.uses for t in one.state.join_tokens()}
        before = requests_count("Register", code.name)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await register(one, token, 9, **kw)
        assert refused.value.code() == code, what
        assert text in (refused.value.details() or ""), (what, refused.value.details())
        assert one.state.node_count == nodes, f"{what}: no node added"
        assert {t.token_id: t.uses for t in one.state.join_tokens()} == uses, f"{what}: no token use consumed"
        assert requests_count("Register", code.name) == before + 1, f"{what}: counted"

    wrong_secret = str(tokens.NodeToken(used.node_id, "0" * 40))
    watch_cases = [
        ("no credential", used.node_id, (), grpc.StatusCode.UNAUTHENTICATED, "no node credential"),
        ("malformed", used.node_id, bearer("tmn_garbage"), grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        ("wrong secret", used.node_id, bearer(wrong_secret), grpc.StatusCode.UNAUTHENTICATED, "not valid"),
        (
            "another node",
            other.node_id,
            bearer(used.node_token),
            grpc.StatusCode.PERMISSION_DENIED,
            "may not",
        ),
    ]
    async with one.channel() as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        for what, node_id, md, code, text in watch_cases:
            version = one.state.config_version
            before = requests_count("WatchConfig", code.name)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await read(stub.WatchConfig(node_pb2.WatchConfigRequest(node_id=node_id), metadata=md))
            assert refused.value.code() == code, what
            assert text in (refused.value.details() or ""), (what, refused.value.details())
            assert requests_count("WatchConfig", code.name) == before + 1, f"{what}: counted"
            report = node_pb2.ReportStatusRequest(
                node_id=node_id,
                endpoints=[common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address="192.0.2.1:1")],
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ReportStatus(report, metadata=md, timeout=20.0)
            assert refused.value.code() == code, f"ReportStatus {what}"
            assert one.state.config_version == version, f"{what}: nothing replicated"
    assert one.node_api.watched_nodes() == []


def proof_refusals(reason: str) -> float:
    value = REGISTRY.get_sample_value("tunnelmesh_node_api_key_proof_refused_total", {"reason": reason})
    return value or 0.0


async def test_register_needs_a_proof_of_the_private_key_so_a_token_holder_cannot_take_over_a_node(
    one: Coord,
) -> None:
    token = await make_token(one, reusable=True)  # a fleet token: the attacker holds it too
    victim = await register(one, token, 1, name="victim")
    async with one.channel() as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        info = await stub.GetServerInfo(node_pb2.GetServerInfoRequest(), timeout=20.0)
    me = info.coordinator
    assert me.id == one.node_api.coordinator_id and me.api_address == one.api
    assert me.relay_public_key == bytes(relay.load_relay_key(one.data_dir).public_key)
    assert info.mesh_id == victim.mesh_id and abs(info.server_time.seconds - time.time()) < 60

    attacker = nacl.public.PrivateKey.generate()
    now = time.time_ns()

    def proof(private: nacl.public.PrivateKey, **kw: Any) -> bytes:
        fields: dict[str, Any] = {
            "public_key": pubkey(1),
            "join_token_id": token.token_id,
            "coordinator_id": me.id,
            "now_ns": now,
        }
        fields.update(kw)
        return keyproof.make(bytes(private), me.relay_public_key, **fields)

    other_coordinator = "00000000000000ff"
    cases: list[tuple[str, dict[str, Any], grpc.StatusCode, str, str]] = [
        ("no proof", {}, grpc.StatusCode.INVALID_ARGUMENT, "prove it holds", "missing"),
        (
            "proof for another coordinator",
            {
                "key_proof": proof(keypair(1), coordinator_id=other_coordinator),
                "coordinator_id": other_coordinator,
            },
            grpc.StatusCode.FAILED_PRECONDITION,
            "call GetServerInfo on the coordinator you register with",
            "wrong_coordinator",
        ),
        (
            "stale",
            {"key_proof": proof(keypair(1), now_ns=now - 600 * 10**9), "coordinator_id": me.id},
            grpc.StatusCode.UNAUTHENTICATED,
            "clock",
            keyproof.STALE,
        ),
        (
            "takeover: victim's key, attacker's private key",
            {"key_proof": proof(attacker), "coordinator_id": me.id},
            grpc.StatusCode.UNAUTHENTICATED,
            "not made with the private key",
            keyproof.FORGED,
        ),
        (
            "proof bound to another join token",
            {"key_proof": proof(keypair(1), join_token_id="0" * 12), "coordinator_id": me.id},
            grpc.StatusCode.UNAUTHENTICATED,
            "another public key, join token or coordinator",
            keyproof.WRONG_BINDING,
        ),
        (
            "malformed",
            {"key_proof": b"\x00" * 7, "coordinator_id": me.id},
            grpc.StatusCode.UNAUTHENTICATED,
            f"{keyproof.PROOF_LEN} bytes",
            keyproof.MALFORMED,
        ),
    ]
    async with one.channel() as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        for what, fields, code, text, reason in cases:
            nodes, uses = one.state.node_count, {t.token_id: t.uses for t in one.state.join_tokens()}
            hashes = {n.node_id: n.node_token_hash for n in one.state.nodes()}
            before, refused_before = requests_count("Register", code.name), proof_refusals(reason)
            req = node_pb2.RegisterRequest(
                join_token=str(token), public_key=pubkey(1), hostname="attacker.lan", **fields
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Register(req, timeout=20.0)
            assert refused.value.code() == code, what
            assert text in (refused.value.details() or ""), (what, refused.value.details())
            assert one.state.node_count == nodes, f"{what}: no node added"
            assert {t.token_id: t.uses for t in one.state.join_tokens()} == uses, f"{what}: no use consumed"
            assert {n.node_id: n.node_token_hash for n in one.state.nodes()} == hashes, (
                f"{what}: no new token"
            )
            assert requests_count("Register", code.name) == before + 1, f"{what}: counted"
            assert proof_refusals(reason) == refused_before + 1, f"{what}: counted by reason"
        # The victim is untouched: its node token still opens its config stream.
        call = stub.WatchConfig(
            node_pb2.WatchConfigRequest(node_id=victim.node_id), metadata=bearer(victim.node_token)
        )
        assert (await read(call)).snapshot.self.name == "victim"
        call.cancel()

    again = await register(one, token, 1)  # the legitimate retry (same key, same token, valid proof)
    assert again.node_id == victim.node_id and again.node_token != victim.node_token
    assert one.state.node_count == 1


async def test_liveness_batch_marks_streaming_nodes_online_and_departed_ones_offline(one: Coord) -> None:
    # Liveness is state, not config: `tunnelmesh nodes list` (AdminService) shows it, and watchers get no
    # delta for it (as config it resent a third of a 1,000-node mesh to every watcher each round).
    token = await make_token(one, reusable=True)
    a = await register(one, token, 1)
    b = await register(one, token, 2)
    interval = 0.5

    def deltas_sent() -> float:
        return REGISTRY.get_sample_value("tunnelmesh_config_updates_sent_total", {"kind": "delta"}) or 0.0

    async def node_info(admin: client.Client, node_id: str) -> Any:
        return await admin.get_node(node_id)

    async with one.channel() as ch, one.admin() as admin:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        watch_a = stub.WatchConfig(
            node_pb2.WatchConfigRequest(node_id=a.node_id), metadata=bearer(a.node_token)
        )
        watch_b = stub.WatchConfig(
            node_pb2.WatchConfigRequest(node_id=b.node_id), metadata=bearer(b.node_token)
        )
        await read(watch_a)
        await read(watch_b)
        assert [(s.node_id, s.online) for s in one.node_api.seen_batch()] == sorted(
            [(a.node_id, True), (b.node_id, True)]
        )
        version, deltas = one.state.config_version, deltas_sent()
        one.node_api.seen_interval = interval  # the server's loop sleeps 30 s: run a fast one next to it
        liveness = asyncio.create_task(one.node_api.liveness_loop())
        try:
            await _until("b online", lambda: one.state.get_node(b.node_id).online, 20.0)  # type: ignore[union-attr]
            info = await node_info(admin, b.node_id)
            age = time.time() - info.last_seen.ToNanoseconds() / 1e9
            assert info.online and -1.0 < age < interval + 5.0, (info.online, age)  # refreshed every interval
            refreshed = info.last_seen.ToNanoseconds()
            await _until(
                "b's last_seen refreshed by a later round",
                lambda: one.state.get_node(b.node_id).last_seen > refreshed,  # type: ignore[union-attr]
                20.0,
            )
            watch_b.cancel()
            await _until(
                "b offline after its stream ended",
                lambda: not one.state.get_node(b.node_id).online,  # type: ignore[union-attr]
                20.0,
            )
            assert not (await node_info(admin, b.node_id)).online
            assert (await node_info(admin, a.node_id)).online
            assert one.node_api.watched_nodes() == [a.node_id]
            await _until(
                "the offline report to be done with (it is sent once)",
                lambda: all(s.online for s in one.node_api.seen_batch()),
                10.0,
            )
            assert one.state.config_version == version, "liveness moved the config version"
            assert deltas_sent() == deltas, "liveness sent a delta"

            # A node another coordinator reported online, and then that coordinator died: the leader's sweep
            # marks it offline once nobody has reported it for STALE_INTERVALS intervals.
            c = await register(one, token, 3)
            seen = state_pb2.NodeSeen(
                node_id=c.node_id, online=True, last_seen=ns_to_timestamp(time.time_ns())
            )
            body = state_pb2.RecordNodesSeen(nodes=[seen])
            await one.coord.write(
                encode_command(body, proposed_at=time.time_ns(), actor="coordinator:gone"), 10.0
            )
            assert one.state.get_node(c.node_id).online  # type: ignore[union-attr]
            await _until(
                "the leader's sweep to mark c offline",
                lambda: not one.state.get_node(c.node_id).online,  # type: ignore[union-attr]
                20.0,
            )
            # c's registration reached a as a peer, without an online flag (liveness is not in the view).
            delta = (await read_until(watch_a, "delta")).delta
            assert [(p.node_id, p.online) for p in delta.upserted_peers] == [(c.node_id, False)]
        finally:
            liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await liveness
        watch_a.cancel()


async def test_a_stream_resumes_on_another_coordinator_of_a_three_member_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three coordinators in one process: keep their relay hubs' metrics out of the one default registry.
    monkeypatch.setattr(relay, "RelayHub", functools.partial(relay.RelayHub, registry=None))
    c1 = await start_coord(tmp_path, "c1")
    others: list[Coord] = []
    try:
        token = await make_token(c1, reusable=True)
        z = await register(c1, token, 0)
        async with c1.channel() as ch:  # a node watching while coordinators join sees the list grow
            stub = node_pb2_grpc.NodeServiceStub(ch)
            md = bearer(z.node_token)
            watch_z = stub.WatchConfig(node_pb2.WatchConfigRequest(node_id=z.node_id), metadata=md)
            assert [c.api_address for c in (await read(watch_z)).snapshot.coordinators] == [c1.api]
            for name in ("c2", "c3"):
                others.append(await start_coord(tmp_path, name, seed=c1))
            await _until("3 voters", lambda: len(c1.coord.driver.conf_state.voters) == 3)
            c2, c3 = others
            while True:
                delta = (await read_until(watch_z, "delta", timeout=30.0)).delta
                listed = sorted(c.api_address for c in delta.coordinators.coordinators)
                if listed == sorted(x.api for x in (c1, c2, c3)):
                    break
            assert all(c.relay_public_key for c in delta.coordinators.coordinators), "relay keys copied"
            watch_z.cancel()
        a = await register(c2, token, 1)  # through a follower (forwarded to the leader)
        async with c2.channel() as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            call = stub.WatchConfig(
                node_pb2.WatchConfigRequest(node_id=a.node_id), metadata=bearer(a.node_token)
            )
            snap = (await read(call)).snapshot
            assert sorted(c.api_address for c in snap.coordinators) == sorted(x.api for x in (c1, c2, c3))
            call.cancel()
        await c2.stop()  # the coordinator the node used goes away
        b = await register(c1, token, 2)
        async with c3.channel() as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            req = node_pb2.WatchConfigRequest(node_id=a.node_id, resume_from_version=snap.version)
            call = stub.WatchConfig(req, metadata=bearer(a.node_token))
            first = await read(call)
            if first.WhichOneof("update") == "heartbeat":  # c3 had not applied b yet: nothing new at resume
                assert first.heartbeat.version == snap.version
                first = await read(call)
            assert first.WhichOneof("update") == "delta", "versions are Raft indexes: any coordinator resumes"
            assert first.delta.base_version == snap.version
            assert b.node_id in [p.node_id for p in first.delta.upserted_peers]
            call.cancel()
    finally:
        for c in [*others, c1]:
            await c.stop()
