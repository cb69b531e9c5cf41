"""The coordinator process: data dir, bootstrap or join, the Raft port and the public API port.

Data dir layout (``--data-dir D``)::

    D/ca.crt, D/ca.key         cluster CA (every coordinator holds it; see pki.py)
    D/coord.crt, D/coord.key   this coordinator's certificate (URI SAN tunnelmesh://cluster/<c>/coord/<m>)
    D/join-secret              the cluster join secret (0600)
    D/admin-token              the bootstrap admin API token, tma_... (0600; only on the bootstrapping member)
    D/bootstrap-pending.json   InitializeMesh + CreateApiToken until applied (0600; see coord/bootstrap.py)
    D/api-address              this coordinator's advertised public API address (for local clients)
    D/relay.key                relay key (X25519, 0600): nodes seal their relay hellos to it (coord/relay.py)
    D/raft/                    SqliteStorage: Raft log, hard state, snapshots, identity (cluster, member,
                               storage id)

Starting:

* ``D/raft`` exists: restart as the member recorded there (``--bootstrap`` and seeds are ignored).
* ``--bootstrap``: a new cluster with this coordinator as its only voter (refused if ``D`` holds a cluster).
* otherwise: join. The join secret (``--join-secret`` / ``TUNNELMESH_JOIN_SECRET``) opens the cluster
  credentials bundle fetched from a seed's public API port (``ClusterJoinService.GetJoinBundle``) or from
  a coordinator found by mDNS; this coordinator picks a new random member id, issues its own certificate
  with the cluster CA, creates its store and calls ``Raft.Join`` on a member (forwarded to the leader),
  which adds it as a learner; the leader promotes it to voter once it has caught up.
* no data, no ``--bootstrap``, no seeds and nobody found: refuse, and say what to do (two clusters must never
  be formed by accident).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import secrets
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nacl.public
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tunnelmesh import client, fsutil, hostaddr, pki, sdnotify
from tunnelmesh.api.raft.v1 import raft_pb2, raft_pb2_grpc
from tunnelmesh.api.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    kv_pb2,
    kv_pb2_grpc,
    node_pb2,
)
from tunnelmesh.coord import auth, bootstrap, discovery, node_api, relay
from tunnelmesh.coord import http as coord_http
from tunnelmesh.coord.bootstrap import MeshOptions
from tunnelmesh.coord.raft.driver import Driver, DriverOptions, Registry, encode_snapshot
from tunnelmesh.coord.raft.messages import ConfState, HardState, Snapshot, SnapshotMetadata
from tunnelmesh.coord.raft.storage import DB_NAME, SqliteStorage, StorageIOError
from tunnelmesh.coord.raft.transport import member_label
from tunnelmesh.coord.service import (
    AdminServicer,
    ClusterJoinServicer,
    Coordinator,
    KvServicer,
    RequestFailed,
)
from tunnelmesh.coord.state import MeshState
from tunnelmesh.errors import TunnelMeshError

log = logging.getLogger(__name__)

JOIN_SECRET_FILE = "join-secret"
# Type=notify units: how long a coordinator waits to catch up with a quorum before it reports itself started
# anyway (under the units' start timeout, 120 s, and systemd's default, 90 s: so a unit never restarts in a
# loop while a majority is down).
READY_WAIT = 60.0
RAFT_DIR = "raft"
JOIN_SECRET_ENV = "TUNNELMESH_JOIN_SECRET"


class CoordError(TunnelMeshError):
    """The coordinator cannot start: the message says why and what to do."""


@dataclass(slots=True)
class CoordOptions:
    data_dir: Path
    listen: str = "0.0.0.0:8443"
    raft_listen: str = "0.0.0.0:8444"
    advertise_host: str | None = None
    seeds: list[str] = field(default_factory=list)
    mdns: bool = False
    bootstrap: bool = False
    join_secret: str | None = None
    cluster_id: str | None = None
    name: str = field(default_factory=socket.gethostname)
    max_voters: int = 5
    dead_voter_timeout: float = 300.0  # seconds (coord.dead_voter_timeout); 0: never replace a silent voter
    driver: DriverOptions = field(default_factory=DriverOptions)
    join_timeout: float = 60.0
    # Mesh settings proposed once by a bootstrapping coordinator (--mesh-domain, --mesh-prefix).
    mesh: MeshOptions = field(default_factory=MeshOptions)
    admin_token: str | None = field(default=None, repr=False)  # coord.admin_token; None: generate one
    # UDP reflector + blind relay, and HTTP (/metrics, /healthz, /readyz, /relay WebSocket); None disables.
    relay_listen: str | None = "0.0.0.0:8443"
    http_listen: str | None = "0.0.0.0:8080"


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


_WILDCARD = ("", "0.0.0.0", "::")


def _default_advertise_host(opts: CoordOptions) -> str:
    """The host advertised for listeners bound to a wildcard address: ``--advertise-host``, else the API
    listener's own host if it is specific (so relay and HTTP addresses follow it), else the address of the
    default route, else what the host name resolves to."""
    if opts.advertise_host:
        return opts.advertise_host
    host, _ = _split(opts.listen)
    if host not in _WILDCARD:
        return host
    return hostaddr.reachable_address() or socket.gethostbyname(socket.gethostname())


def _advertised(addr: str, advertise_host: str) -> str:
    host, port = _split(addr)
    if host in _WILDCARD:
        host = advertise_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ips(host: str) -> list[str]:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return []
    return [host]


def _write_secret(path: Path, secret: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())


def new_member_id() -> int:
    """A random member id: 63 bits, so ids are never reused in practice (a removed id is also refused)."""
    return random.SystemRandom().randrange(1, 1 << 63)


class CoordinatorProcess:
    """One coordinator: ``await run()`` until cancelled or SIGTERM."""

    def __init__(self, opts: CoordOptions) -> None:
        self.opts = opts
        self.data_dir = Path(opts.data_dir)
        host = _default_advertise_host(opts)
        self.api_address = _advertised(opts.listen, host)
        self.raft_address = _advertised(opts.raft_listen, host)
        self.relay_udp_address = _advertised(opts.relay_listen, host) if opts.relay_listen else ""
        self.relay_ws_url = f"ws://{_advertised(opts.http_listen, host)}/relay" if opts.http_listen else ""
        self._relay_key: nacl.public.PrivateKey | None = None
        self._join_members: list[str] = []
        self._needs_join = False

    # -- preparing the data dir ------------------------------------------------------------------------------

    async def _prepare(self) -> SqliteStorage:
        d = self.data_dir
        if (d / RAFT_DIR / DB_NAME).exists():
            if self.opts.bootstrap:
                log.warning("event=bootstrap_ignored reason='data dir already holds a cluster member'")
            storage = SqliteStorage.open(d / RAFT_DIR)
            ident = storage.identity
            if ident.cluster_id is None or ident.member_id is None:
                raise CoordError(
                    f"{d}: the Raft store has no cluster/member identity; wipe it and join again"
                )
            snap = storage.snapshot()
            if snap.is_empty() and storage.last_index() == 0:
                # Created but never reached by the leader (crashed during the join, or the join was refused):
                # ask again, with the same member and storage id (a repeated join is idempotent).
                self._needs_join = True
                if self.opts.seeds:
                    with contextlib.suppress(CoordError):
                        resp, _ = await self._fetch_bundle(list(self.opts.seeds))
                        self._join_members = [resp.raft_address, *resp.member_raft_addresses]
            return storage
        if self.opts.bootstrap:
            return self._bootstrap()
        seeds = list(self.opts.seeds)
        if not seeds and self.opts.mdns:
            seeds = await self._discover()
        if not seeds:
            raise CoordError(
                f"{d} holds no cluster and no coordinator to join was given or found.\n"
                "  To start a NEW cluster here:   tunnelmesh coord --data-dir ... --bootstrap\n"
                "  To join an existing cluster:   tunnelmesh coord --data-dir ... --seed <api host:port> "
                "--join-secret <secret printed at bootstrap>   (or --mdns on the same LAN)"
            )
        return await self._prepare_join(seeds)

    async def _discover(self) -> list[str]:
        _, port = _split(self.raft_address)
        disc = discovery.Discovery(name=self.opts.name, port=port, api=self.api_address, mdns=True)
        await disc.start()
        try:
            found = await disc.find_members(timeout=3.0)
        finally:
            await disc.stop()
        clusters = {c.cluster_id for c in found if c.cluster_id}
        if len(clusters) > 1:
            raise CoordError(f"mDNS found coordinators of several clusters {sorted(clusters)}; pass --seed")
        return [c.api for c in found if c.api]

    def _bootstrap(self) -> SqliteStorage:
        d = self.data_dir
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        cluster_id = self.opts.cluster_id or f"tm-{secrets.token_hex(4)}"
        if (d / pki.CA_KEY_FILE).exists():
            ca = pki.load_ca(d)  # a bootstrap that crashed before creating the store
            cluster_id = ca.cluster_id or cluster_id
        else:
            ca = pki.create_ca(cluster_id)
            pki.save_ca(ca, d)
        secret_path = d / JOIN_SECRET_FILE
        if not secret_path.exists():
            _write_secret(secret_path, self.opts.join_secret or secrets.token_urlsafe(32))
        try:  # before the store: a bootstrap that fails here can simply be run again
            token_path = bootstrap.prepare(d, self.opts.mesh, admin_token=self.opts.admin_token)
        except bootstrap.BootstrapError as exc:
            raise CoordError(str(exc)) from None
        member_id = new_member_id()
        storage = SqliteStorage.open(d / RAFT_DIR, create=True, cluster_id=cluster_id, member_id=member_id)
        me = self._member(member_id, storage.identity.storage_id)
        reg = Registry({member_id: me})
        conf = ConfState(voters=(member_id,))
        # As SqliteStorage.bootstrap, but the snapshot carries the founding member's addresses.
        storage.save(
            HardState(term=1, vote=0, commit=1),
            (),
            Snapshot(SnapshotMetadata(1, 1, conf), encode_snapshot(reg, b"")),
        )
        secret = secret_path.read_text().strip()
        log.info("event=cluster_bootstrapped cluster=%s member=%x", cluster_id, member_id)
        print(f"Admin API token (for the tunnelmesh CLI; keep it secret): {token_path}", flush=True)
        print(
            f"Bootstrapped cluster {cluster_id} (member {member_label(member_id)}).\n"
            f"Join secret (also in {secret_path}): {secret}\n"
            f"Add a coordinator: tunnelmesh coord --data-dir <dir> --seed {self.api_address} "
            f"--join-secret <secret>",
            flush=True,
        )
        return storage

    async def _prepare_join(self, seeds: list[str]) -> SqliteStorage:
        secret = self.opts.join_secret or os.environ.get(JOIN_SECRET_ENV)
        if not secret:
            raise CoordError(
                f"joining needs the cluster's join secret: pass --join-secret or set {JOIN_SECRET_ENV} (it "
                f"was "
                f"printed at bootstrap and is in <data-dir>/{JOIN_SECRET_FILE} on every coordinator)"
            )
        resp, served_ca_pem = await self._fetch_bundle(seeds)
        try:
            ca = pki.import_cluster_bundle(resp.bundle, secret)
        except pki.PkiError as exc:
            raise CoordError(f"cannot open the cluster bundle from {seeds}: {exc}") from None
        if ca.certificate_pem != served_ca_pem:
            raise CoordError(
                f"the cluster bundle from {seeds} holds CA {ca.fingerprint}, but the seed's TLS connection "
                f"was signed by {pki.ca_fingerprint(x509.load_pem_x509_certificate(served_ca_pem))}: "
                f"refusing (a machine in the middle, or a seed of another cluster)"
            )
        if ca.cluster_id is not None and ca.cluster_id != resp.cluster_id:
            raise CoordError(f"the bundle's CA belongs to cluster {ca.cluster_id}, not {resp.cluster_id}")
        d = self.data_dir
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (d / pki.CA_KEY_FILE).exists():
            pki.save_ca(ca, d)
        if not (d / JOIN_SECRET_FILE).exists():
            _write_secret(d / JOIN_SECRET_FILE, secret)
        member_id = new_member_id()
        storage = SqliteStorage.open(
            d / RAFT_DIR, create=True, cluster_id=resp.cluster_id, member_id=member_id
        )
        self._join_members = [resp.raft_address, *resp.member_raft_addresses]
        self._needs_join = True
        log.info("event=join_prepared cluster=%s member=%x", resp.cluster_id, member_id)
        return storage

    async def _fetch_bundle(self, seeds: list[str]) -> tuple[cluster_pb2.GetJoinBundleResponse, bytes]:
        """The join bundle and the CA certificate (PEM) of the TLS connection it came over.

        A joining coordinator has no CA yet: it takes the CA the seed serves (unverified), talks TLS with it,
        and :meth:`_prepare_join` accepts the result only if the CA inside the bundle, which only the join
        secret opens, is that same CA (the secret authenticates the CA after the fact)."""
        errors = []
        for seed in seeds:
            host, port = _split(seed)
            try:
                chain = await asyncio.to_thread(pki.fetch_server_chain, host, port)
                ca_pem = pki.served_ca(chain, seed).public_bytes(serialization.Encoding.PEM)
            except pki.PkiError as exc:
                errors.append(str(exc))
                continue
            async with client.open_channel(seed, ca_pem=ca_pem) as ch:
                stub = cluster_pb2_grpc.ClusterJoinServiceStub(ch)
                try:
                    resp: cluster_pb2.GetJoinBundleResponse = await stub.GetJoinBundle(
                        cluster_pb2.GetJoinBundleRequest(cluster_id=self.opts.cluster_id or ""), timeout=5.0
                    )
                    return resp, ca_pem
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{seed}: {exc.code().name} {exc.details()}")
        raise CoordError("no seed answered with the cluster bundle:\n  " + "\n  ".join(errors))

    def _member(self, member_id: int, storage_id: str) -> raft_pb2.Member:
        return raft_pb2.Member(
            member_id=member_id,
            name=self.opts.name,
            raft_address=self.raft_address,
            api_address=self.api_address,
            storage_id=storage_id,
            relay_udp_address=self.relay_udp_address,
            relay_ws_url=self.relay_ws_url,
            relay_public_key=bytes(self.relay_key().public_key),
        )

    def relay_key(self) -> nacl.public.PrivateKey:
        """``D/relay.key``, created on first use (the data dir exists by the time a member is described)."""
        if self._relay_key is None:
            self._relay_key = relay.load_relay_key(self.data_dir)
        return self._relay_key

    async def _start_relay(self, driver: Driver) -> contextlib.AsyncExitStack:
        """The UDP reflector/relay and the HTTP port, sharing one relay hub; closed with the returned stack.
        Relay hellos are accepted from registered nodes of the applied state only."""
        stack = contextlib.AsyncExitStack()
        if not (self.opts.relay_listen or self.opts.http_listen):
            return stack
        try:
            hub = relay.RelayHub(
                self.relay_key(), lambda key: driver.state.node_by_public_key(key) is not None
            )
            stack.callback(hub.close)
            if self.opts.relay_listen:
                udp = relay.RelayServer(hub, self.opts.relay_listen)
                with hostaddr.listening(
                    self.opts.relay_listen, "the UDP relay: --relay-listen, coord.relay_listen"
                ):
                    await udp.start()
                stack.push_async_callback(udp.stop)
            if self.opts.http_listen:
                web = coord_http.HttpServer(
                    self.opts.http_listen, hub=hub, ready=coord_http.driver_readiness(driver.status)
                )
                with hostaddr.listening(
                    self.opts.http_listen, "metrics, health: --http-listen, coord.http_listen"
                ):
                    await web.start()
                stack.push_async_callback(web.stop)
        except BaseException:
            await stack.aclose()
            raise
        return stack

    # -- joining ---------------------------------------------------------------------------------------------

    async def _join(self, driver: Driver, me: raft_pb2.Member) -> None:
        """Call Raft.Join on known members until one accepts (the member forwards it to the leader)."""
        targets = [a for a in dict.fromkeys(self._join_members) if a and a != self.raft_address]
        targets += [m.raft_address for m in driver.registry.members.values() if m.raft_address not in targets]
        if not targets:
            log.error("event=join_impossible reason='no member address known; restart with --seed'")
            return
        creds = driver.transport.channel_credentials
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.join_timeout
        attempt = 0
        while loop.time() < deadline:
            addr = targets[attempt % len(targets)]
            attempt += 1
            options = pki.coordinator_channel_options(driver.cluster_id)
            async with grpc.aio.secure_channel(addr, creds, options=options) as ch:
                stub = raft_pb2_grpc.RaftStub(ch)
                req = raft_pb2.JoinRequest(
                    header=raft_pb2.RaftHeader(cluster_id=driver.cluster_id, from_id=me.member_id, to_id=0),
                    member=me,
                )
                try:
                    resp: raft_pb2.JoinResponse = await stub.Join(req, timeout=10.0)
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "event=join_attempt_failed target=%s code=%s detail=%r",
                        addr,
                        exc.code().name,
                        exc.details(),
                    )
                    if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION):
                        raise CoordError(f"join refused by {addr}: {exc.details()}") from None
                    await asyncio.sleep(min(2.0, 0.2 * attempt))
                    continue
            # Know where the members are until the leader's snapshot brings the registry.
            for m in resp.members:
                driver.registry.members.setdefault(m.member_id, m)
            driver._sync_peers()
            log.info(
                "event=joined cluster=%s member=%x leader=%x conf_change_index=%d",
                driver.cluster_id,
                me.member_id,
                resp.leader_id,
                resp.conf_change_index,
            )
            return
        raise CoordError(f"could not join through {targets} within {self.opts.join_timeout:.0f}s")

    # -- running ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        storage = await self._prepare()
        try:
            await self._serve(storage)
        finally:
            storage.close()

    async def _serve(self, storage: SqliteStorage) -> None:
        ident = storage.identity
        assert ident.cluster_id is not None and ident.member_id is not None
        cluster_id, member_id = ident.cluster_id, ident.member_id
        raft_host, _ = _split(self.raft_address)
        creds = await asyncio.to_thread(
            pki.load_coordinator_credentials,
            self.data_dir,
            cluster_id=cluster_id,
            member_id=member_label(member_id),
            ip_addresses=_ips(raft_host),
        )
        secret_path = self.data_dir / JOIN_SECRET_FILE
        bundle: Callable[[], bytes] | None = None
        ca = creds.ca
        if ca is not None and secret_path.exists():
            secret = secret_path.read_text().strip()

            def bundle() -> bytes:
                return pki.export_cluster_bundle(ca, secret)

        driver = Driver(
            storage=storage,
            state=MeshState(),
            cluster_id=cluster_id,
            member_id=member_id,
            raft_listen=self.opts.raft_listen,
            credentials=creds,
            options=self.opts.driver,
        )
        if driver.removed.is_set():
            _report_removed(driver)  # exit status 0: a unit restarting on failure must not loop on it
            return
        me = self._member(member_id, ident.storage_id)
        coord = Coordinator(
            driver,
            self_member=me,
            join_bundle=bundle,
            max_voters=self.opts.max_voters,
            dead_voter_timeout=self.opts.dead_voter_timeout,
            ca_fingerprint=ca.fingerprint if ca is not None else "",
        )
        # For local clients (`--data-dir D`): where this coordinator's API is. Written first: a full disk
        # stops the start here, before anything listens.
        address_file = self.data_dir / client.API_ADDRESS_FILE
        try:
            fsutil.write_atomic(address_file, f"{self.api_address}\n".encode(), 0o644)
        except OSError as exc:
            raise CoordError(
                f"{address_file}: cannot write: {exc.strerror}; free space on the disk (or repair it), "
                "then start this coordinator again"
            ) from None
        async with contextlib.AsyncExitStack() as started:  # stopped in reverse, also if a later start fails
            await driver.start()
            started.push_async_callback(driver.transport.close)
            public = await self._start_public(coord, creds)
            started.push_async_callback(public.stop, 0.5)
            started.push_async_callback((await self._start_relay(driver)).aclose)
            announced: list[Any] = []
            started.push_async_callback(_stop_announcers, announced)
            await self._serve_started(driver, coord, me, announced)

    async def _serve_started(
        self, driver: Driver, coord: Coordinator, me: raft_pb2.Member, announced: list[Any]
    ) -> None:
        cluster_id, member_id = driver.cluster_id, driver.member_id
        log.info(
            "event=coordinator_started cluster=%s member=%x api=%s raft=%s",
            cluster_id,
            member_id,
            self.api_address,
            self.raft_address,
        )
        print(
            f"coordinator {member_label(member_id)} of cluster {cluster_id} serving on {self.api_address}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await self._run_tasks(driver, coord, me, stop, announced)
        except* TunnelMeshError as eg:
            raise _stopped_by(_first_leaf(eg)) from None

    async def _announce_when_member(self, driver: Driver, announced: list[Any]) -> None:
        """With ``--mdns``: announce once this coordinator is a member, so that nobody on the LAN tries to
        join through a coordinator that is not a member yet."""
        await until_member(driver)
        announcer = await self._announce(driver.cluster_id, driver.member_id)
        if announcer is not None:
            announced.append(announcer)

    async def _announce(self, cluster_id: str, member_id: int) -> Any:
        """With ``--mdns``: announce this member (cluster id, member id, API address) so that new coordinators
        on the LAN find it. Discovery failing (no multicast) is logged, never fatal."""
        if not self.opts.mdns:
            return None
        _, port = _split(self.raft_address)
        disc = discovery.Discovery(
            name=self.opts.name,
            port=port,
            cluster_id=cluster_id,
            member_id=member_label(member_id),
            api=self.api_address,
            mdns=True,
        )
        try:
            await disc.start()
        except TunnelMeshError as exc:
            log.warning("event=mdns_announce_failed error=%r", str(exc))
            return None
        return disc

    async def _run_tasks(
        self,
        driver: Driver,
        coord: Coordinator,
        me: raft_pb2.Member,
        stop: asyncio.Event,
        announced: list[Any],
    ) -> None:
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(driver.run(), name="raft-driver"),
                tg.create_task(coord.membership_loop(), name="membership"),
                tg.create_task(self.node_api.liveness_loop(), name="node-liveness"),
            ]
            if self._needs_join:
                tasks.append(tg.create_task(self._join(driver, me), name="join"))
            else:  # restarted with other addresses: the others must learn them
                tasks.append(tg.create_task(coord.advertise(me), name="advertise"))
            tasks.append(tg.create_task(notify_ready(driver, coord, self.api_address), name="ready"))
            if (interval := sdnotify.watchdog_interval()) is not None:  # WatchdogSec= in the unit
                tasks.append(tg.create_task(sdnotify.watchdog(interval), name="watchdog"))
            if self.opts.mdns:
                tasks.append(tg.create_task(self._announce_when_member(driver, announced), name="mdns"))
            if (self.data_dir / bootstrap.PENDING_FILE).exists():
                actor = f"coordinator:{member_label(me.member_id)}"
                pending = bootstrap.propose_pending(self.data_dir, coord.write, actor=actor)
                tasks.append(tg.create_task(pending, name="bootstrap-commands"))
            stopping = tg.create_task(stop.wait(), name="stop-signal")
            removed = tg.create_task(driver.removed.wait(), name="removed")
            await asyncio.wait([stopping, removed], return_when=asyncio.FIRST_COMPLETED)
            if removed.done():
                _report_removed(driver)
            log.info("event=coordinator_stopping")
            sdnotify.stopping(f"coordinator {member_label(driver.member_id)} stopping")
            if stopping.done():
                await coord.hand_over_leadership()
            for t in [*tasks, stopping, removed]:
                t.cancel()

    async def _start_public(self, coord: Coordinator, creds: pki.CoordinatorCredentials) -> grpc.aio.Server:
        # API tokens and roles for every service but the open ones (coord/auth.py); fail closed.
        authenticator = auth.ApiTokenAuthenticator(
            lambda: coord.driver.state, read_barrier=coord.read_barrier
        )
        protected = [
            kv_pb2.DESCRIPTOR.services_by_name["KvService"],
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
        ]
        interceptor = auth.ApiTokenInterceptor(authenticator, protected)
        server = grpc.aio.server(interceptors=[interceptor])
        kv_pb2_grpc.add_KvServiceServicer_to_server(KvServicer(coord, interceptor.authorize), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(coord), server)
        cluster_pb2_grpc.add_ClusterJoinServiceServicer_to_server(ClusterJoinServicer(coord), server)
        # NodeService authenticates its callers itself (join token, node token), so it is not in `protected`.
        self.node_api = node_api.NodeServicer(
            coord, ca=creds.ca, ca_pem=creds.trust_pem, relay_key=self.relay_key()
        )
        node_api.add_to_server(self.node_api, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = [
            kv_pb2.DESCRIPTOR.services_by_name["KvService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            cluster_pb2.DESCRIPTOR.services_by_name["ClusterJoinService"].full_name,
            node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
        # Server-authenticated TLS; the chain is leaf + CA so that a node can fetch the CA and check it
        # against its join token's pin (pki.fetch_pinned_ca). Clients authenticate with bearer tokens.
        tls = pki.server_credentials(creds.identity, require_client_auth=False)
        await pki.add_secure_port(server, self.opts.listen, tls, "the public API: --listen, coord.listen")
        await server.start()
        for n in ["", *names[:4]]:
            await health_servicer.set(n, health_pb2.HealthCheckResponse.SERVING)
        return server


async def until_member(driver: Driver) -> None:
    """Return once this coordinator is in its cluster's configuration (joining: its join committed)."""
    member_id = driver.member_id
    while True:
        changed = driver.applied_changed  # taken before the check: no change is missed in between
        cs = driver.conf_state
        if member_id in cs.voters or member_id in cs.learners:
            return
        await changed.wait()


async def notify_ready(
    driver: Driver, coord: Coordinator, api_address: str, wait: float = READY_WAIT
) -> None:
    """Tell the service manager (``Type=notify``) this coordinator has started: once it is a member and has
    applied everything its cluster had committed (a read barrier through the leader), so that a rolling
    ``systemctl restart`` of one coordinator after another moves on only when the last one has caught up.
    Not caught up after ``wait`` seconds, it reports started anyway, saying so (it serves stale reads)."""
    me = f"coordinator {member_label(driver.member_id)} of cluster {driver.cluster_id}"
    where = f"{me} serving on {api_address}"
    try:
        async with asyncio.timeout(wait):
            await until_member(driver)
            index = await coord.read_barrier(wait)
    except (TimeoutError, RequestFailed):
        log.warning("event=coordinator_ready caught_up=false waited_seconds=%g", wait)
        sdnotify.ready(
            f"{where}; not caught up within {wait:g} s (no quorum, or no answer from the leader): stale "
            "reads only until it is"
        )
        return
    log.info("event=coordinator_ready caught_up=true index=%d", index)
    sdnotify.ready(f"{where}; caught up to index {index}")


def _report_removed(driver: Driver) -> None:
    msg = (
        f"coordinator {member_label(driver.member_id)} was removed from cluster {driver.cluster_id}; its "
        "data dir cannot serve again: to bring this machine back, wipe the data dir (or use a new one) and "
        "join with --seed as a new member"
    )
    log.warning("event=coordinator_removed detail=%r", msg)
    print(msg, flush=True)


def run_coordinator(opts: CoordOptions) -> None:
    asyncio.run(CoordinatorProcess(opts).run())


def _first_leaf(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception in ``eg`` that is not a group (task groups nest: the driver runs its own)."""
    first = eg.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _stopped_by(exc: BaseException) -> BaseException:
    """What the command reports for ``exc``: a failed Raft store (disk full, I/O error) says what to do."""
    if not isinstance(exc, StorageIOError):
        return exc
    log.error("event=coordinator_stopped reason=storage_failed error=%r", str(exc))
    return CoordError(
        f"{exc}. This coordinator stopped (its Raft store takes no more writes); the other coordinators "
        "carry on without it. Free space on the disk (or repair it), then start it again: it catches up."
    )


async def _stop_announcers(announced: list[Any]) -> None:
    for announcer in announced:
        await announcer.stop()
