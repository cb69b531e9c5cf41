"""The node daemon: join a mesh, then drive the data plane from the coordinators' config stream.

Theory of operation
-------------------
``join_mesh`` (``tunnelmesh join``) is the one-time part: parse the join token, fetch the mesh CA from a
coordinator and accept it only if its SHA-256 matches the token's pin, create the node key (0600) unless the
state directory has one, ``Register`` over TLS (the key's public half, a proof that this node holds its
private half, a CSR for a TLS client certificate), and write the state directory (``state_dir.py``).
Register is idempotent per key, so joining again with the same state directory returns the same node.

``Agent.run`` (``tunnelmesh node``, or ``join`` without ``--no-start``) is the daemon. It starts the data
plane (``DataPlane``: its own threads; the agent is asyncio and only calls its thread-safe methods) with the
node key, the mesh addresses and the MTU, and applies the cached ``config.pb`` **before** talking to any
coordinator: a restart with every coordinator down still forwards. Then, under one ``TaskGroup``:

* **watch**: ``WatchConfig`` on one coordinator (node token as bearer). Each snapshot or delta is merged
  (``config_apply.merge``), diffed against the peers the data plane has (``config_apply.plan``) and applied
  live: ``add_peer`` / ``update_peer`` / ``remove_peer``, so one peer's change never disturbs another's
  session; then the merged config is persisted (atomic ``config.pb``). A delta whose ``base_version`` is not
  the current version ends the stream; the next one resumes from the current version. The stream is dead
  after an error or ``heartbeat_timeout`` (default 45 s = 3 heartbeats) without a message; the agent then
  fails over.
* **report**: ``ReportStatus`` right after connecting (peers need this node's endpoints), when the local
  candidates change, and every ``next_report_in``.
* optional parts, wired when their modules exist: the relay client (``relay_client.RelayClient``), path
  selection (``nat.PathManager``: it picks each peer's endpoint and measures RTT) and mesh DNS
  (``dns.MeshResolver``). Without a PathManager a peer's endpoint is its first host or reflexive candidate.

Failover and backoff policy: the coordinator list is the config's (``ConfigSnapshot.coordinators``) followed
by the addresses given at join. After a failed or ended stream the agent tries the next coordinator in the
list after ``backoff_delay(attempt)``: capped exponential backoff with equal jitter, ``d = min(retry_max,
retry_base * 2**attempt)``, sleep ``d/2 + uniform(0, d/2)``; ``attempt`` resets once a stream delivers a
message. So a healthy cluster is re-joined within a fraction of a second, and a dead one is polled at most
every ``retry_max`` (default 10 s), with jitter so that a thousand nodes do not reconnect in lockstep. While
no coordinator answers, the data plane keeps forwarding on the last config. ``NOT_FOUND`` /
``UNAUTHENTICATED`` (node removed, credential revoked) from three consecutive coordinators stop the agent:
the interface goes down and ``config.pb`` is deleted; the node must join again.

Local status: the data plane's control socket (``control.py``, ``<run dir>/<iface>.sock``) answers ``show``
with the data plane's status plus an ``agent`` section (node, coordinator, config version, per-peer name,
mesh IPs, path, RTT); ``tunnelmesh status`` prints it. Metrics: the data plane's collector plus the agent's
(``tunnelmesh_agent_*``) on ``metrics_listen``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import logging
import platform
import random
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from cryptography.hazmat.primitives import serialization
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from tunnelmesh import __version__, keyproof, pki, sdnotify
from tunnelmesh.api.v1 import common_pb2, node_pb2, node_pb2_grpc
from tunnelmesh.client import open_channel
from tunnelmesh.config import split_host_port
from tunnelmesh.errors import ProtocolError, TunnelMeshError
from tunnelmesh.identity import load_or_create, load_private_key
from tunnelmesh.metrics import by_label, counter_family, gauge_family
from tunnelmesh.node import control
from tunnelmesh.node.config_apply import DesiredPeer, OutOfSync, desired_peers, merge, plan
from tunnelmesh.node.dataplane import (
    DEFAULT_MTU,
    WARM_TICK,
    DataPlane,
    InterfaceConfig,
    PeerConfig,
    key_b64,
    short,
)
from tunnelmesh.node.errors import DataplaneError
from tunnelmesh.node.state_dir import NodeState, StateDir, StateDirError
from tunnelmesh.tokens import JoinToken

log = logging.getLogger(__name__)

AGENT_VERSION: Final = __version__
DEFAULT_INTERFACE: Final = "tunnelmesh0"  # as config.py's node.interface
DEFAULT_LISTEN_PORT: Final = 51820
DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9465"
HEARTBEAT_INTERVAL: Final = 15.0  # the server's promise (node.proto Heartbeat)
CONNECT_TIMEOUT: Final = 10.0  # first message of a stream; a coordinator that is behind waits up to 5 s
RPC_TIMEOUT: Final = 10.0
REPORT_DEFAULT: Final = 30.0
REPORT_MIN, REPORT_MAX = 1.0, 300.0
CANDIDATE_CHECK: Final = 5.0  # how often local candidates are re-read between reports
RESYNC_AFTER: Final = 300.0  # every coordinator refusing our version this long: accept a fresh snapshot
REJECTIONS_TO_STOP: Final = 3
HANDSHAKE_FRESH: Final = 180.0  # a session older than this (REJECT_AFTER_TIME) is no path


class AgentError(TunnelMeshError):
    """The agent cannot join or run; the message says why and what to do."""


class NodeRefusedError(AgentError):
    """A coordinator refused the registration for good (bad, expired, revoked or used-up token; bad name)."""


class NodeRemovedError(AgentError):
    """Coordinators say this node no longer exists (or its credential was revoked)."""


# -- join ----------------------------------------------------------------------------------------------------


def _cluster_id(ca_pem: bytes) -> str:
    from tunnelmesh.client import cluster_id_of

    return cluster_id_of(ca_pem) or ""


async def fetch_ca(coordinators: list[str], token: JoinToken, *, within: float = 10.0) -> tuple[str, bytes]:
    """The first coordinator that serves the pinned CA, and the CA (PEM). Tries each address in turn."""
    errors = []
    for address in coordinators:
        try:
            host, port = split_host_port(address)
        except ValueError as exc:
            raise AgentError(f"coordinator address {address!r}: {exc}") from None
        try:
            async with asyncio.timeout(within):
                cert = await asyncio.to_thread(
                    pki.fetch_pinned_ca, host, port, token.ca_fingerprint, timeout=within
                )
        except TimeoutError:
            errors.append(f"{address}: no answer within {within:.0f} s")
            continue
        except pki.PkiError as exc:
            errors.append(str(exc))
            continue
        return address, cert.public_bytes(serialization.Encoding.PEM)
    raise AgentError("cannot fetch the mesh CA from any coordinator: " + "; ".join(errors))


async def join_mesh(
    coordinators: list[str],
    token_text: str,
    state: StateDir,
    *,
    name: str = "",
    tags: tuple[str, ...] = (),
    interface: str = DEFAULT_INTERFACE,
    listen_port: int = DEFAULT_LISTEN_PORT,
    within: float = 30.0,
) -> NodeState:
    """Register this node (or re-register it: idempotent per key) and write the state directory.

    Nothing is written before a coordinator proved it holds the pinned CA, and a key created by a join that
    the mesh then refused is removed again: a bad token changes nothing on disk.
    """
    if not coordinators:
        raise AgentError("give at least one coordinator address (host:port)")
    token = JoinToken.parse(token_text)
    deadline = time.monotonic() + within
    first, ca_pem = await fetch_ca(coordinators, token, within=min(10.0, within))
    existed = state.path.exists()
    state.ensure()
    identity, created = load_or_create(state.key_path)
    log.info("event=node_key key=%s created=%s path=%s", identity.fingerprint, created, state.key_path)
    tls_key = pki.new_private_key()
    request = node_pb2.RegisterRequest(
        join_token=str(token),
        public_key=identity.public_key_bytes,
        name=name,
        hostname=socket.gethostname(),
        tags=list(tags),
        csr_der=pki.create_node_csr(tls_key),
        agent_version=AGENT_VERSION,
        platform=f"{platform.system().lower()}/{platform.machine()}",
    )
    order = [first] + [c for c in coordinators if c != first]
    try:
        response = await _register(order, ca_pem, request, bytes(identity.private_key), deadline)
    except NodeRefusedError:
        if created:  # never registered under this key: leave the directory as it was
            state.key_path.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    state.path.rmdir()
        raise
    pinned = pki.verify_pinned_ca(response.ca_certificates_pem or ca_pem, token.ca_fingerprint)
    pinned_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in pinned)
    if not response.node_id or not response.node_token or not response.mesh_addresses:
        raise AgentError(f"{order[0]}: the registration answer lacks a node id, node token or mesh address")
    for a in response.mesh_addresses:
        try:
            ipaddress.ip_interface(a)
        except ValueError:
            raise AgentError(f"the coordinator assigned an invalid mesh address {a!r}") from None
    addresses = [c.api_address for c in response.coordinators if c.api_address]
    addresses += [c for c in coordinators if c not in addresses]
    try:
        old = state.read_state() if state.joined() else None
    except StateDirError:
        old = None  # a damaged node.json is replaced below
    if old is None or old.mesh_id != response.mesh_id:
        state.forget_config()  # another mesh's config must never be applied to this one
    node = NodeState(
        node_id=response.node_id,
        name=response.name,
        mesh_id=response.mesh_id,
        mesh_addresses=tuple(response.mesh_addresses),
        mesh_domain=response.mesh_domain,
        coordinators=tuple(addresses),
        node_token=response.node_token,
        ca_fingerprint=token.ca_fingerprint,
        cluster_id=_cluster_id(pinned_pem),
        interface=interface,
        listen_port=listen_port,
    )
    state.write_ca(pinned_pem)
    key_pem = tls_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    state.write_tls(key_pem, bytes(response.client_certificate_chain_pem))
    state.write_state(node)
    log.info(
        "event=node_registered node_id=%s name=%s mesh_id=%s addresses=%s coordinators=%d",
        node.node_id,
        node.name,
        node.mesh_id,
        ",".join(node.mesh_addresses),
        len(node.coordinators),
    )
    return node


async def _register(
    order: list[str],
    ca_pem: bytes,
    request: node_pb2.RegisterRequest,
    node_private: bytes,
    deadline: float,
) -> node_pb2.RegisterResponse:
    """Register through the first coordinator that answers; UNAVAILABLE (no leader, down) moves on to the
    next with backoff until ``deadline``; a refusal (bad token, bad name ...) is final. Each attempt asks
    the coordinator for its id and relay key (GetServerInfo) and proves the node key to it, on one channel:
    a proof is valid only on the coordinator it was made for."""
    errors: list[str] = []
    attempt = 0
    while True:
        for address in order:
            left = deadline - time.monotonic()
            if left <= 0.25:
                raise AgentError("registration failed: " + ("; ".join(errors[-len(order) :]) or "deadline"))
            channel = open_channel(address, ca_pem=ca_pem)
            try:
                stub = node_pb2_grpc.NodeServiceStub(channel)
                log.info("event=register_sent coordinator=%s", address)
                return await keyproof.register(stub, request, node_private, timeout=min(RPC_TIMEOUT, left))
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                # UNAVAILABLE includes a just-bootstrapped cluster whose mesh is not initialized yet.
                if code not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise NodeRefusedError(
                        f"{address} refused the registration: {code.name}: {exc.details()}"
                    ) from None
                errors.append(f"{address}: {code.name}: {exc.details()}")
                log.warning("event=register_retry coordinator=%s code=%s", address, code.name)
            except ProtocolError as exc:  # a coordinator that cannot take a key proof: try the others
                errors.append(f"{address}: {exc}")
                log.warning("event=register_retry coordinator=%s reason=%r", address, str(exc))
            finally:
                await channel.close()
        await asyncio.sleep(backoff_delay(attempt, base=0.25, cap=2.0))
        attempt += 1


def backoff_delay(
    attempt: int, *, base: float = 0.25, cap: float = 10.0, rng: random.Random | None = None
) -> float:
    """Capped exponential backoff with equal jitter: ``d = min(cap, base * 2**attempt)``; in [d/2, d]."""
    d = min(cap, base * float(2 ** min(attempt, 30)))
    jitter: float = (rng or random).uniform(0, d / 2)
    return d / 2 + jitter


# -- the daemon ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentOptions:
    interface: str = DEFAULT_INTERFACE
    listen_port: int = DEFAULT_LISTEN_PORT
    metrics_listen: str = DEFAULT_METRICS_LISTEN  # "" disables the metrics server
    heartbeat_timeout: float = 3 * HEARTBEAT_INTERVAL
    connect_timeout: float = CONNECT_TIMEOUT
    retry_base: float = 0.25
    retry_max: float = 10.0
    offloads: bool = True
    low_power: bool = False  # no warm wake-ups of the packet threads (InterfaceConfig.warm_tick 0)
    relay: bool = True  # use relay_client.RelayClient when it is installed
    nat: bool = True  # use nat.PathManager when it is installed
    dns: bool = True  # use dns.MeshResolver when it is installed
    dns_listen: str = ""  # "" = the resolver's default


@dataclass(slots=True)
class _Counters:
    updates: dict[str, int] = field(default_factory=lambda: {"snapshot": 0, "delta": 0, "heartbeat": 0})
    rejected: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    reports: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


_PATH_NAMES: Final = {
    common_pb2.PATH_TYPE_UNSPECIFIED: "unknown",
    common_pb2.PATH_TYPE_NONE: "none",
    common_pb2.PATH_TYPE_DIRECT: "direct",
    common_pb2.PATH_TYPE_RELAY_UDP: "relay-udp",
    common_pb2.PATH_TYPE_RELAY_WS: "relay-ws",
}


def _optional(module: str, name: str) -> Any | None:
    """A class from a part of the node that may not be installed (relay, NAT, DNS): the seam between them."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(mod, name, None)


class Agent:
    """One node daemon. ``await Agent(StateDir(d), AgentOptions()).run()`` until ``stop()`` or a signal."""

    def __init__(self, state_dir: StateDir, options: AgentOptions | None = None) -> None:
        self.dir = state_dir
        self.options = options or AgentOptions()
        self.node = state_dir.read_state()
        self.ca_pem = state_dir.read_ca()
        self.identity = load_private_key(state_dir.key_path)
        self.config: node_pb2.ConfigSnapshot | None = None
        self.registry = CollectorRegistry()
        self.plane: DataPlane | None = None
        self.relay: Any = None
        self.paths: Any = None
        self.resolver: Any = None
        self.counters = _Counters()
        self._applied: dict[bytes, DesiredPeer] = {}
        self._chosen: dict[bytes, tuple[str, int] | None] = {}
        self._psk: bytes | None = None
        self._channel: grpc.aio.Channel | None = None
        self._coordinator: tuple[str, str] | None = None  # (address, id) of the live stream
        self._connected = asyncio.Event()
        self._report_now = asyncio.Event()
        self._stop = asyncio.Event()
        self._last_config_at = 0.0
        self._reported_candidates: list[tuple[int, str]] = []
        self._published: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next = 0
        self._stream_delivered = False
        self._dns_domain = ""
        self._dns_registration: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to stop (from the event loop's thread)."""
        self._stop.set()

    def _stop_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> None:
        """Run until stopped. Raises NodeRemovedError if the mesh removed this node."""
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, self._stop.set)
        self._load_cached_config()
        mtu = self.config.network.mtu if self.config is not None and self.config.network.mtu else DEFAULT_MTU
        iface = InterfaceConfig(
            private_key=self.identity.private_key.encode(),
            name=self.options.interface,
            listen_port=self.options.listen_port,
            addresses=self.node.mesh_addresses,
            mtu=mtu,
            offloads=self.options.offloads,
            warm_tick=0 if self.options.low_power else WARM_TICK,
        )
        self.plane = DataPlane(iface, registry=self.registry)
        self.registry.register(_AgentCollector(self))
        server = control.ControlServer(self.options.interface, self._control_status, self._stop_threadsafe)
        server.start()
        metrics = None
        try:
            # pyroute2's blocking API refuses to run on a thread with a running event loop.
            await asyncio.to_thread(self.plane.start)
            metrics = self._start_metrics()
            await self._start_optional()
            if self.config is not None:
                await self._apply(self.config, persist=False)
                log.info(
                    "event=cached_config_applied version=%d peers=%d", self.config.version, len(self._applied)
                )
            self._publish()
            up = (
                f"node {self.node.name} ({self.node.node_id}) up on {self.plane.name}: mesh address "
                f"{', '.join(self.node.mesh_addresses)}, UDP port {self.plane.listen_port}"
            )
            print(up, flush=True)
            # Type=notify: started once the interface forwards (with the cached config, if any), not once a
            # coordinator answers: with every coordinator down the node must still come up.
            sdnotify.ready(up)
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._watch_loop(), name="watch"),
                        tg.create_task(self._report_loop(), name="report"),
                        tg.create_task(self._housekeeping(), name="housekeeping"),
                    ]
                    if (interval := sdnotify.watchdog_interval()) is not None:  # WatchdogSec= in the unit
                        tasks.append(tg.create_task(sdnotify.watchdog(interval), name="watchdog"))
                    await self._stop.wait()
                    for t in tasks:
                        t.cancel()
            except* NodeRemovedError as eg:
                self.dir.forget_config()
                raise eg.exceptions[0] from None
            except* TunnelMeshError as eg:
                raise eg.exceptions[0] from None
        finally:
            sdnotify.stopping(f"node {self.node.name} stopping")
            await self._stop_optional()
            if self._channel is not None:
                await self._channel.close()
            server.close()
            if metrics is not None:
                metrics.shutdown()
            await asyncio.to_thread(self.plane.stop)
            log.info("event=agent_stopped node_id=%s", self.node.node_id)

    def _load_cached_config(self) -> None:
        try:
            self.config = self.dir.read_config()
        except StateDirError as exc:
            self.counters.reject("cached_config_unreadable")
            log.error("event=cached_config_unreadable error=%r", str(exc))
            self.config = None
        if (
            self.config is not None
            and self.config.self.node_id
            and self.config.self.node_id != self.node.node_id
        ):
            self.counters.reject("cached_config_other_node")
            log.error("event=cached_config_ignored reason=%r", "written for another node id")
            self.config = None

    def _start_metrics(self) -> Any:
        if not self.options.metrics_listen:
            return None
        from prometheus_client import start_http_server

        host, port = split_host_port(self.options.metrics_listen)
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise AgentError(
                f"metrics: cannot listen on {self.options.metrics_listen}: {exc.strerror}"
            ) from None
        log.info("event=metrics_listening address=%s", self.options.metrics_listen)
        return server

    async def _start_optional(self) -> None:
        """Relay client and path manager (H4/H5 parts, used when installed: the relay is only useful to a path
        manager), and the mesh DNS resolver. DNS failing to start is logged, never fatal: the mesh works
        without names."""
        assert self.plane is not None
        key = self.identity.private_key.encode()
        paths_cls = _optional("tunnelmesh.node.nat", "PathManager") if self.options.nat else None
        if paths_cls is not None:
            relay_cls = (
                _optional("tunnelmesh.node.relay_client", "RelayClient") if self.options.relay else None
            )
            if relay_cls is not None:
                self.relay = relay_cls(key, self.plane.listen_port, registry=self.registry)
                await self.relay.start()
            self.paths = paths_cls(
                self.plane, key, self.relay, registry=self.registry, on_candidates=self._candidates_changed
            )
            await self.paths.start()
        if self.options.dns:
            from tunnelmesh.node import dns as mesh_dns

            if self.options.dns_listen:
                listen = [split_host_port(self.options.dns_listen)]
            else:
                listen = mesh_dns.default_listen(self.node.mesh_addresses)
            try:
                resolver = mesh_dns.MeshResolver(listen, registry=self.registry)
                await resolver.start()
                self.resolver = resolver
            except (OSError, TunnelMeshError) as exc:
                log.error("event=dns_unavailable error=%r", str(exc))
        log.info(
            "event=agent_parts relay=%s nat=%s dns=%s",
            self.relay is not None,
            self.paths is not None,
            self.resolver is not None,
        )

    async def _register_dns(self, dns_config: node_pb2.DnsConfig) -> None:
        """Point systemd-resolved at the resolver for the mesh domain (once per domain; see docs/dns.md)."""
        domain = dns_config.settings.mesh_domain
        if self.resolver is None or not domain or domain == self._dns_domain or not self.resolver.addresses:
            return
        from tunnelmesh.node import resolved

        assert self.plane is not None
        if self._dns_registration is not None:
            await asyncio.to_thread(self._dns_registration.revert)
            self._dns_registration = None
        host, port = self.resolver.addresses[0]
        try:
            self._dns_registration = await asyncio.to_thread(
                resolved.register_with_resolved,
                self.plane.name,
                host,
                domain,
                port=port,
                search_domains=list(dns_config.settings.search_domains),
            )
        except TunnelMeshError as exc:
            log.warning("event=dns_registration_failed domain=%s error=%r", domain, str(exc))
        self._dns_domain = domain

    async def _stop_optional(self) -> None:
        if self._dns_registration is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._dns_registration.revert)
        for part in (self.resolver, self.paths, self.relay):
            if part is None:
                continue
            try:
                async with asyncio.timeout(5.0):
                    await part.stop()
            except Exception as exc:  # shutting down: log, keep stopping the rest
                log.warning("event=part_stop_failed part=%s error=%r", type(part).__name__, str(exc))

    # -- the config stream -----------------------------------------------------------------------------------

    def coordinator_addresses(self) -> list[str]:
        """Where to watch from: the config's coordinator list, then the addresses given at join."""
        out: list[str] = []
        if self.config is not None:
            out = [c.api_address for c in self.config.coordinators if c.api_address]
        out += [a for a in self.node.coordinators if a not in out]
        return out

    async def _watch_loop(self) -> None:
        attempt = 0
        rejections = 0
        refused_since: float | None = None
        while True:
            addresses = self.coordinator_addresses()
            address = addresses[self._next % len(addresses)]
            resume = self.config.version if self.config is not None else 0
            if refused_since is not None and time.monotonic() - refused_since > RESYNC_AFTER:
                log.warning(
                    "event=watch_resync reason=%r",
                    "every coordinator refused our version; asking for a snapshot",
                )
                resume = 0
            self._stream_delivered = False
            try:
                await self._watch_once(address, resume)
                reason = "stream ended"
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                reason = f"{code.name}: {exc.details()}"
                if code == grpc.StatusCode.UNAUTHENTICATED and self._reload_credential():
                    rejections = 0  # `tunnelmesh join` ran again meanwhile and got a fresh node token
                elif code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):
                    rejections += 1
                    if rejections >= REJECTIONS_TO_STOP:
                        raise NodeRemovedError(
                            f"coordinators refuse this node ({reason}): it was removed from the mesh or its "
                            f"credential was revoked. Join again with a new token: tunnelmesh join "
                            f"{','.join(self.node.coordinators)} --token TOKEN --state-dir {self.dir.path}"
                        ) from None
                else:
                    rejections = 0
                if code == grpc.StatusCode.UNAVAILABLE and "behind" in (exc.details() or ""):
                    refused_since = refused_since or time.monotonic()
            except TimeoutError:
                reason = "no message within the deadline"
            except OutOfSync as exc:
                self.counters.reject("delta_out_of_sync")
                reason = f"out of sync: {exc}"
            finally:
                await self._disconnect()
            if self._stream_delivered:
                attempt = 0
                rejections = 0
                refused_since = None
            self.counters.reconnects += 1
            self._next += 1
            delay = backoff_delay(attempt, base=self.options.retry_base, cap=self.options.retry_max)
            attempt += 1
            log.warning(
                "event=watch_disconnected coordinator=%s reason=%r retry_in=%.2fs next=%s",
                address,
                reason,
                delay,
                self.coordinator_addresses()[self._next % len(self.coordinator_addresses())],
            )
            self._publish()
            await asyncio.sleep(delay)

    def _reload_credential(self) -> bool:
        """Pick up a node token that a later `join` wrote to node.json; True if it changed."""
        try:
            fresh = self.dir.read_state()
        except StateDirError:
            return False
        if fresh.node_id != self.node.node_id or fresh.node_token == self.node.node_token:
            return False
        self.node = fresh
        log.info("event=node_token_reloaded node_id=%s", fresh.node_id)
        return True

    async def _watch_once(self, address: str, resume: int) -> None:
        """One WatchConfig stream until it ends or fails (``_stream_delivered``: did it deliver anything)."""
        channel = open_channel(address, ca_pem=self.ca_pem, token=self.node.node_token)
        self._channel = channel
        stub = node_pb2_grpc.NodeServiceStub(channel)
        request = node_pb2.WatchConfigRequest(
            node_id=self.node.node_id, resume_from_version=resume, agent_version=AGENT_VERSION
        )
        call = stub.WatchConfig(request)
        log.info("event=watch_start coordinator=%s resume_from_version=%d", address, resume)
        stream = call.__aiter__()
        timeout = self.options.connect_timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    response = await stream.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                call.cancel()
                raise
            timeout = self.options.heartbeat_timeout
            if not self._stream_delivered:
                self._stream_delivered = True
                self._coordinator = (address, "")
                self._connected.set()
                self._report_now.set()
                log.info("event=watch_connected coordinator=%s", address)
            await self._on_update(response, address)

    async def _on_update(self, response: node_pb2.WatchConfigResponse, address: str) -> None:
        kind = response.WhichOneof("update")
        if kind == "heartbeat":
            self.counters.updates["heartbeat"] += 1
            beat = response.heartbeat
            if beat.coordinator_id:
                self._coordinator = (address, beat.coordinator_id)
            if self.config is not None and beat.version > self.config.version:
                # "Nothing changed for you up to beat.version": the next delta is based on it.
                self.config.version = beat.version
                await asyncio.to_thread(self.dir.write_config, self.config)
            self._publish()
            return
        if kind is None:
            self.counters.reject("unknown_update_kind")
            return
        new = merge(self.config, response)  # raises OutOfSync: the stream is restarted
        assert new is not None
        if new.self.node_id and new.self.node_id != self.node.node_id:
            self.counters.reject("config_for_other_node")
            raise OutOfSync(f"config is for node {new.self.node_id}, this is {self.node.node_id}")
        started = time.monotonic()
        self.counters.updates[kind] += 1
        await self._apply(new, persist=True)
        log.info(
            "event=config_applied kind=%s version=%d peers=%d coordinator=%s apply_ms=%.1f",
            kind,
            new.version,
            len(self._applied),
            address,
            (time.monotonic() - started) * 1000,
        )

    async def _disconnect(self) -> None:
        self._connected.clear()
        self._coordinator = None
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    # -- applying a config -----------------------------------------------------------------------------------

    async def _apply(self, new: node_pb2.ConfigSnapshot, *, persist: bool) -> None:
        assert self.plane is not None
        desired, rejected = desired_peers(new, self.identity.public_key_bytes)
        for node_id, reason in rejected:
            self.counters.reject("bad_peer")
            log.warning("event=peer_rejected peer_id=%s reason=%r", node_id, reason)
        psk = bytes(new.network.preshared_key) or None
        if psk is not None and len(psk) != 32:
            self.counters.reject("bad_preshared_key")
            log.error("event=config_rejected reason=%r", f"preshared key is {len(psk)} bytes, expected 32")
            psk = self._psk
        if self.config is not None and new.network.mtu and new.network.mtu != self.plane.config.mtu:
            log.warning(
                "event=mtu_changed old=%d new=%d action=%r",
                self.plane.config.mtu,
                new.network.mtu,
                "restart the agent to apply",
            )
        steps = plan(self._applied, desired)
        psk_changed = psk != self._psk
        applied = await asyncio.to_thread(self._apply_peers, steps, desired, psk, psk_changed)
        self._applied = applied
        self._psk = psk
        self.config = new
        self._last_config_at = time.time()
        if self.paths is not None:
            self.paths.set_peers({k: p.candidate_protos() for k, p in applied.items()})
        coordinators = list(new.coordinators)
        if self.relay is not None:
            self.relay.set_coordinators(coordinators)
        if self.paths is not None:
            self.paths.set_coordinators(coordinators)
        if self.resolver is not None:
            try:
                self.resolver.update(new.dns)
            except (TunnelMeshError, ValueError) as exc:
                self.counters.reject("bad_dns_config")
                log.warning("event=dns_update_failed error=%r", str(exc))
            else:
                await self._register_dns(new.dns)
        if persist:
            await asyncio.to_thread(self.dir.write_config, new)
            listed = [c.api_address for c in coordinators if c.api_address]
            if listed and tuple(listed) != self.node.coordinators[: len(listed)]:
                self.node = self.node.with_coordinators(
                    listed + [a for a in self.node.coordinators if a not in listed]
                )
                await asyncio.to_thread(self.dir.write_state, self.node)
        self._publish()

    def _apply_peers(
        self,
        steps: Any,
        desired: dict[bytes, DesiredPeer],
        psk: bytes | None,
        psk_changed: bool,
    ) -> dict[bytes, DesiredPeer]:
        """Runs in a thread (route changes are netlink calls). Returns what is now applied."""
        assert self.plane is not None
        plane = self.plane
        applied = dict(self._applied)
        for key in steps.remove:
            try:
                plane.remove_peer(key)
            except DataplaneError as exc:
                log.warning("event=peer_remove_failed peer=%s error=%r", short(key), str(exc))
            applied.pop(key, None)
            self._chosen.pop(key, None)  # the PathManager releases its relay endpoint in set_peers
        for peer in steps.add:
            endpoint = peer.direct_endpoint()
            try:
                plane.add_peer(
                    PeerConfig(
                        public_key=peer.public_key,
                        allowed_ips=peer.allowed_ips,
                        endpoint=endpoint,
                        preshared_key=psk,
                        persistent_keepalive=peer.persistent_keepalive,
                    )
                )
            except DataplaneError as exc:
                self.counters.reject("peer_not_applied")
                log.warning("event=peer_add_failed peer_id=%s error=%r", peer.node_id, str(exc))
                continue
            applied[peer.public_key] = peer
            self._chosen[peer.public_key] = endpoint
        updated = []
        for peer in steps.update:
            try:
                plane.update_peer(
                    peer.public_key,
                    allowed_ips=peer.allowed_ips,
                    persistent_keepalive=peer.persistent_keepalive,
                )
            except DataplaneError as exc:  # stays as it was: the next config retries it
                self.counters.reject("peer_not_applied")
                log.warning("event=peer_update_failed peer_id=%s error=%r", peer.node_id, str(exc))
                continue
            updated.append(peer)
        for peer in (*steps.retarget, *updated):
            applied[peer.public_key] = peer
            if self.paths is not None:
                continue  # the PathManager picks endpoints
            endpoint = peer.direct_endpoint()
            if endpoint is not None and endpoint != self._chosen.get(peer.public_key):
                with contextlib.suppress(DataplaneError):
                    plane.update_peer(peer.public_key, endpoint=endpoint)
                self._chosen[peer.public_key] = endpoint
        for key, peer in desired.items():  # display fields (name) change without data-plane work
            current = applied.get(key)
            if current is not None and current.sessions_equal(peer):
                applied[key] = peer
        if psk_changed:
            for key in applied:
                with contextlib.suppress(DataplaneError):
                    plane.update_peer(key, preshared_key=psk)
        return applied

    # -- status reports --------------------------------------------------------------------------------------

    async def _local_candidates(self) -> list[common_pb2.Candidate]:
        if self.paths is not None:
            return list(self.paths.local_candidates())
        assert self.plane is not None
        port = self.plane.listen_port
        prefixes = [
            ipaddress.ip_network(p, strict=False)
            for p in (self.config.network.mesh_prefixes if self.config else ())
        ]
        prefixes += [ipaddress.ip_interface(a).network for a in self.node.mesh_addresses]
        ips = await asyncio.to_thread(host_addresses, {self.plane.name})
        out = []
        for i, ip in enumerate(ips):
            addr = ipaddress.ip_address(ip)
            if any(addr in n for n in prefixes):
                continue
            out.append(
                common_pb2.Candidate(
                    type=common_pb2.CANDIDATE_TYPE_HOST, address=f"{ip}:{port}", priority=max(1, 1000 - i)
                )
            )
        return out

    def _peer_rows(self) -> list[node_pb2.PeerStatus]:
        assert self.plane is not None
        paths = self._paths()
        rows = []
        for st in self.plane.peers():
            peer = self._applied.get(st.public_key)
            if peer is None:
                continue
            row = node_pb2.PeerStatus(peer_id=peer.node_id, rx_bytes=st.rx_bytes, tx_bytes=st.tx_bytes)
            info = paths.get(st.public_key)
            if info is not None:
                row.path_type = info["path_type_value"]
                row.endpoint = info["endpoint"] or ""
                if info["rtt"] is not None:
                    row.rtt.FromNanoseconds(int(info["rtt"] * 1e9))
                row.loss_ratio = info["loss"] or 0.0
                row.fallback_reason = info["reason"] or ""
            else:
                row.path_type = (
                    common_pb2.PATH_TYPE_DIRECT if _fresh(st.latest_handshake) else common_pb2.PATH_TYPE_NONE
                )
                if st.endpoint is not None:
                    row.endpoint = _fmt_ep(st.endpoint)
            if st.latest_handshake:
                row.last_handshake.FromNanoseconds(int(st.latest_handshake * 1e9))
            rows.append(row)
        return rows

    def _paths(self) -> dict[bytes, dict[str, Any]]:
        """The PathManager's view as plain values, or {} without one."""
        if self.paths is None:
            return {}
        out: dict[bytes, dict[str, Any]] = {}
        try:
            for key, info in dict(self.paths.paths()).items():
                value = int(getattr(info, "proto_path_type", common_pb2.PATH_TYPE_UNSPECIFIED))
                ep = getattr(info, "endpoint", None)
                out[key] = {
                    "path_type_value": value,
                    "path_type": _PATH_NAMES.get(value, "unknown"),  # type: ignore[call-overload]
                    "endpoint": _fmt_ep(ep) if isinstance(ep, tuple) else (str(ep) if ep else None),
                    "rtt": getattr(info, "rtt", None),
                    "loss": getattr(info, "loss_ratio", None),
                    "reason": getattr(info, "reason", ""),
                }
        except Exception as exc:  # a status view must not take the agent down
            log.warning("event=paths_unavailable error=%r", str(exc))
        return out

    def _candidates_changed(self, candidates: list[common_pb2.Candidate]) -> None:
        """The PathManager found new local candidates (e.g. a reflexive address): peers need them now."""
        log.info("event=candidates_changed candidates=%s", ",".join(c.address for c in candidates) or "-")
        self._report_now.set()

    async def _report_loop(self) -> None:
        interval = REPORT_DEFAULT
        while True:
            await self._connected.wait()
            channel = self._channel
            candidates = await self._local_candidates()
            request = node_pb2.ReportStatusRequest(
                node_id=self.node.node_id,
                endpoints=candidates,
                peers=self._peer_rows(),
                agent_version=AGENT_VERSION,
            )
            request.report_time.GetCurrentTime()
            if channel is not None:
                try:
                    stub = node_pb2_grpc.NodeServiceStub(channel)
                    resp = await stub.ReportStatus(request, timeout=RPC_TIMEOUT)
                    self.counters.reports["ok"] += 1
                    self._reported_candidates = _cand_key(candidates)
                    given = (
                        resp.next_report_in.ToTimedelta().total_seconds()
                        if resp.HasField("next_report_in")
                        else 0
                    )
                    interval = min(REPORT_MAX, max(REPORT_MIN, given or REPORT_DEFAULT))
                    log.info(
                        "event=status_reported candidates=%s peers=%d next_in=%.0fs",
                        ",".join(c.address for c in candidates) or "-",
                        len(request.peers),
                        interval,
                    )
                except grpc.aio.AioRpcError as exc:
                    self.counters.reports["failed"] += 1
                    interval = 5.0
                    log.warning("event=status_report_failed code=%s error=%r", exc.code().name, exc.details())
            self._report_now.clear()
            await self._wait_report(interval)

    async def _wait_report(self, interval: float) -> None:
        """Sleep ``interval``, or less if a report is asked for or the local candidates changed."""
        end = time.monotonic() + interval
        while (left := end - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, CANDIDATE_CHECK)):
                    await self._report_now.wait()
            if self._report_now.is_set():
                return
            if (
                self._connected.is_set()
                and _cand_key(await self._local_candidates()) != self._reported_candidates
            ):
                log.info("event=candidates_changed")
                return

    async def _housekeeping(self) -> None:
        assert self.plane is not None
        while True:
            await asyncio.sleep(1.0)
            if not self.plane.running:
                why = "; ".join(self.plane.errors) or "a thread exited"
                raise AgentError(f"data plane {self.plane.name} failed: {why}")
            self._publish()

    # -- local status ----------------------------------------------------------------------------------------

    def _publish(self) -> None:
        """Refresh the view the control socket and metrics read from other threads (one atomic swap)."""
        paths = self._paths()
        peers = {}
        for key, p in self._applied.items():
            info = paths.get(key, {})
            peers[key_b64(key)] = {
                "node_id": p.node_id,
                "name": p.name,
                "mesh_ips": list(p.mesh_ips),
                "candidates": [a for _, a, _, _ in p.candidates],
                "path_type": info.get("path_type"),
                "path_endpoint": info.get("endpoint"),
                "rtt_ms": None if info.get("rtt") is None else round(info["rtt"] * 1000, 3),
                "loss_ratio": info.get("loss"),
                "fallback_reason": info.get("reason") or "",
            }
        coordinator = None
        if self._coordinator is not None:
            address, ident = self._coordinator
            listed = [
                c for c in (self.config.coordinators if self.config else ()) if c.api_address == address
            ]
            coordinator = {
                "address": address,
                "id": ident or (listed[0].id if listed else ""),
                "name": listed[0].name if listed else "",
            }
        relay_status = nat_status = None
        if self.relay is not None:
            with contextlib.suppress(Exception):
                relay_status = self.relay.status()
        if self.paths is not None:
            with contextlib.suppress(Exception):
                nat_status = self.paths.status()
        self._published = {
            "node_id": self.node.node_id,
            "name": self.node.name,
            "mesh_id": self.node.mesh_id,
            "mesh_domain": self.node.mesh_domain,
            "mesh_addresses": list(self.node.mesh_addresses),
            "config_version": self.config.version if self.config is not None else 0,
            "last_config_at": self._last_config_at or None,
            "coordinator": coordinator,
            "coordinators": self.coordinator_addresses(),
            "peers": peers,
            "relay": relay_status,
            "nat": nat_status,
            "parts": {
                "relay": self.relay is not None,
                "nat": self.paths is not None,
                "dns": self.resolver is not None,
            },
            "counters": {
                "updates": dict(self.counters.updates),
                "rejected": dict(self.counters.rejected),
                "reconnects": self.counters.reconnects,
                "reports": dict(self.counters.reports),
            },
        }

    def _control_status(self) -> dict[str, Any]:
        """``show`` on the control socket (called on its thread): the data plane's status plus the agent's."""
        assert self.plane is not None
        status = self.plane.status()
        agent = self._published
        status["agent"] = agent
        rows: list[dict[str, Any]] = status.get("peers", [])  # type: ignore[assignment]
        for row in rows:
            meta = agent.get("peers", {}).get(row["public_key"], {})
            row.update(meta)
            if not meta.get("path_type"):
                row["path_type"] = "direct" if _fresh(row.get("latest_handshake")) else "none"
        return status


# -- metrics -------------------------------------------------------------------------------------------------


class _AgentCollector(Collector):
    """``tunnelmesh_agent_*``, read at scrape time from the agent's published view (swapped atomically)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        view = self.agent._published
        c = self.agent.counters
        coord = view.get("coordinator")
        yield gauge_family(
            "tunnelmesh_agent_config_version",
            "Version of the config the node applied",
            (),
            [((), float(view.get("config_version", 0)))],
        )
        yield gauge_family(
            "tunnelmesh_agent_coordinator_connected",
            "1 while the config stream is connected to this coordinator",
            ["coordinator"],
            [((coord["address"],), 1.0)] if coord else [],
        )
        yield gauge_family(
            "tunnelmesh_agent_config_applied_timestamp_seconds",
            "Unix time of the last applied config update",
            (),
            [((), float(view.get("last_config_at") or 0.0))],
        )
        yield counter_family(
            "tunnelmesh_agent_config_updates",
            "Config stream messages received, by kind",
            ["kind"],
            by_label(c.updates),
        )
        yield counter_family(
            "tunnelmesh_agent_config_rejected",
            "Config input refused or skipped (malformed peer, out-of-sync delta ...), by reason",
            ["reason"],
            by_label(c.rejected),
        )
        yield counter_family(
            "tunnelmesh_agent_watch_reconnects",
            "Config streams that ended and were retried",
            (),
            [((), c.reconnects)],
        )
        yield counter_family(
            "tunnelmesh_agent_status_reports",
            "ReportStatus calls, by result",
            ["result"],
            by_label(c.reports),
        )
        handshakes = {
            key_b64(p.public_key): p.latest_handshake
            for p in (self.agent.plane.peers() if self.agent.plane else [])
        }
        peers = list(view.get("peers", {}).items())
        yield gauge_family(
            "tunnelmesh_agent_peer_path",
            "1 for the path type currently used to each peer",
            ["peer", "name", "path_type"],
            [
                (
                    (
                        key,
                        p["name"],
                        p.get("path_type") or ("direct" if _fresh(handshakes.get(key)) else "none"),
                    ),
                    1.0,
                )
                for key, p in peers
            ],
        )
        yield gauge_family(
            "tunnelmesh_agent_peer_rtt_seconds",
            "Smoothed RTT to a peer over its path",
            ["peer", "name"],
            [((key, p["name"]), p["rtt_ms"] / 1000) for key, p in peers if p.get("rtt_ms") is not None],
        )


# -- helpers -------------------------------------------------------------------------------------------------


def host_addresses(exclude_interfaces: set[str]) -> list[str]:
    """IPv4 addresses of this namespace's interfaces (not loopback, link-local or the mesh interface), for
    host candidates. Blocking (netlink)."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr(family=socket.AF_INET):
            if names.get(a["index"]) in exclude_interfaces:
                continue
            ip = a.get_attr("IFA_ADDRESS")
            if not ip:
                continue
            addr = ipaddress.ip_address(ip)
            if addr.is_loopback or addr.is_link_local or addr.is_multicast:
                continue
            out.append(str(addr))
    return out


def _fresh(latest_handshake: float | None) -> bool:
    return bool(latest_handshake) and time.time() - float(latest_handshake or 0) < HANDSHAKE_FRESH


def _fmt_ep(ep: tuple[str, int]) -> str:
    host, port = ep[0], ep[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cand_key(candidates: list[common_pb2.Candidate]) -> list[tuple[int, str]]:
    return sorted((int(c.type), c.address) for c in candidates)


__all__ = [
    "AGENT_VERSION",
    "Agent",
    "AgentError",
    "AgentOptions",
    "NodeRemovedError",
    "backoff_delay",
    "fetch_ca",
    "host_addresses",
    "join_mesh",
]
