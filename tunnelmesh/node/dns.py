"""Mesh DNS: the node-local resolver, authoritative for the mesh domain (``<node>.<mesh-domain>``).

Theory of operation. Two halves, as everywhere in TunnelMesh:

* A sans-I/O core: :func:`build_zone` turns the ``DnsConfig`` from the config stream into an immutable
  :class:`Zone`, and :func:`respond` turns one query's bytes and a zone into the reply's bytes (or nothing)
  plus the result it is counted under. Neither reads a clock or touches a socket.
* :class:`MeshResolver`, the asyncio UDP + TCP server around it. ``update()`` swaps the zone reference in one
  assignment, so every query sees either the old records or the new ones, never a mix.

Answers (RFC 1034/1035, RFC 2308 for negative answers): names are case-insensitive and answered in the case
they were asked; a known name with records of another type gets NODATA (NOERROR, no answer, the SOA in the
authority section); an unknown name inside the domain gets NXDOMAIN with the SOA; a name outside the domain
gets REFUSED: this resolver never recurses, and systemd-resolved sends it only the mesh domain (see
``resolved.py`` and docs/dns.md for the fallback). CNAMEs are followed inside the zone. A UDP answer larger
than 512 bytes (or the client's EDNS0 buffer, capped at 1232) is sent empty with the TC bit, and the client
retries over TCP, where the limit is 65535.

Malformed queries: FORMERR when the header could be read, otherwise dropped; responses (QR set) are never
answered, so the resolver cannot be used to reflect traffic at itself. All of it is counted in
``tunnelmesh_dns_queries_total{result}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from tunnelmesh.api.v1 import node_pb2
from tunnelmesh.errors import ConfigError
from tunnelmesh.metrics import by_label, counter_family
from tunnelmesh.node.dns_wire import (
    AAAA,
    CLASS_ANY,
    CLASS_IN,
    CNAME,
    MAX_MESSAGE,
    OPCODE_QUERY,
    PLAIN_UDP_SIZE,
    RCODE_BADVERS,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    SOA,
    TXT,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_AXFR,
    TYPE_CNAME,
    TYPE_IXFR,
    TYPE_OPT,
    TYPE_SOA,
    TYPE_TXT,
    A,
    DnsFormatError,
    Edns,
    Header,
    Message,
    Name,
    Question,
    RData,
    ResourceRecord,
    is_subdomain,
    name_from_text,
    name_key,
    name_to_text,
    parse,
    txt_strings,
)

log = logging.getLogger(__name__)

DEFAULT_TTL: Final = 5  # seconds; short so renames and removals show quickly (DnsSettings.ttl)
MAX_TTL: Final = 2**31 - 1  # RFC 2181 §8
DNS_PORT: Final = 53
EDNS_UDP_SIZE: Final = 1232  # what we accept and send over UDP with EDNS0 (DNS flag day 2020)
MAX_CNAME_CHAIN: Final = 8
TCP_IDLE_TIMEOUT: Final = 10.0  # seconds a TCP client may keep an idle connection (RFC 7766 §6.2.3)
MAX_TCP_CONNECTIONS: Final = 64
STOP_GRACE: Final = 2.0  # seconds stop() lets closed TCP connections' handlers finish before cancelling them
IP_FREEBIND: Final = 15  # not exported by Python's socket module
IPV6_FREEBIND: Final = 78

# Every value of tunnelmesh_dns_queries_total{result}, pre-set to 0 so dashboards see them all.
RESULTS: Final = ("noerror", "nodata", "nxdomain", "refused", "formerr", "notimp", "badvers", "dropped")

_RECORD_TYPES: Final = {
    node_pb2.DNS_RECORD_TYPE_A: TYPE_A,
    node_pb2.DNS_RECORD_TYPE_AAAA: TYPE_AAAA,
    node_pb2.DNS_RECORD_TYPE_CNAME: TYPE_CNAME,
    node_pb2.DNS_RECORD_TYPE_TXT: TYPE_TXT,
}
_U16: Final = struct.Struct(">H")


class DnsConfigError(ConfigError):
    """A DnsConfig the resolver cannot use at all (no or an invalid mesh domain); the previous zone stays."""


# -- the zone ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RRset:
    """All records of one (name, type)."""

    rtype: int
    ttl: int
    data: tuple[RData, ...]


@dataclass(frozen=True, slots=True)
class Zone:
    """What the resolver answers from; immutable, replaced whole by :meth:`MeshResolver.update`."""

    origin: Name  # folded to lowercase, like every key below
    ttl: int
    serial: int
    rrsets: Mapping[Name, Mapping[int, RRset]]
    names: frozenset[Name]  # every owner name, the apex and the empty non-terminals between them

    @property
    def domain(self) -> str:
        return name_to_text(self.origin).rstrip(".")

    def soa(self, owner: Name | None = None) -> ResourceRecord:
        # RFC 2308 §5: a negative answer is cached for min(SOA TTL, SOA MINIMUM); both are the zone TTL.
        host = (b"hostmaster", *self.origin)
        data = SOA(self.origin, host, self.serial, 3600, 600, 86400, self.ttl)
        return ResourceRecord(owner if owner is not None else self.origin, TYPE_SOA, CLASS_IN, self.ttl, data)

    def record_count(self) -> int:
        return sum(len(s.data) for types in self.rrsets.values() for s in types.values())


def _duration_seconds(d: object) -> int:
    seconds = getattr(d, "seconds", 0) + (1 if getattr(d, "nanos", 0) > 0 else 0)
    return max(0, min(MAX_TTL, int(seconds)))


def _record_data(rtype: int, values: Sequence[str]) -> tuple[RData, ...]:
    """Presentation-format values -> wire data; raises ValueError naming the bad value."""
    if rtype == TYPE_A:
        return tuple(A(ipaddress.IPv4Address(v)) for v in values)
    if rtype == TYPE_AAAA:
        return tuple(AAAA(ipaddress.IPv6Address(v)) for v in values)
    if rtype == TYPE_CNAME:
        if len(values) != 1:
            raise ValueError(f"a CNAME has exactly one target, got {len(values)}")
        return (CNAME(name_key(name_from_text(values[0]))),)
    return tuple(TXT(txt_strings(v.encode("utf-8"))) for v in values)


def build_zone(config: node_pb2.DnsConfig, serial: int) -> tuple[Zone, Counter[str]]:
    """The zone for ``config`` and how many records were rejected, by reason.

    A bad record (a name outside the domain, an address that does not parse, a CNAME next to other data) is
    skipped and logged; the rest of the zone is built. A missing or invalid mesh domain raises
    :class:`DnsConfigError`, because then nothing can be answered.
    """
    settings = config.settings
    try:
        origin = name_key(name_from_text(settings.mesh_domain))
    except ValueError as e:
        raise DnsConfigError(
            f"DnsSettings.mesh_domain {settings.mesh_domain!r} is not a DNS name: {e}"
        ) from None
    if not origin:
        raise DnsConfigError("DnsSettings.mesh_domain is empty: the resolver has no domain to answer for")
    zone_ttl = _duration_seconds(settings.ttl) if settings.HasField("ttl") else DEFAULT_TTL
    rejected: Counter[str] = Counter()
    merged: dict[tuple[Name, int], tuple[int, list[RData]]] = {}
    for rec in config.records:
        rtype = _RECORD_TYPES.get(rec.type)

        def reject(reason: str, detail: str, rec: node_pb2.DnsRecord = rec) -> None:
            rejected[reason] += 1
            log.warning(
                "event=dns_record_rejected name=%r type=%d reason=%s detail=%r",
                rec.name,
                rec.type,
                reason,
                detail,
            )

        if rtype is None:
            reject("unknown_type", "type is not A, AAAA, CNAME or TXT")
            continue
        try:
            owner = name_key(name_from_text(rec.name))
        except ValueError as e:
            reject("bad_name", str(e))
            continue
        if not is_subdomain(owner, origin):
            reject("outside_domain", f"not in {settings.mesh_domain}")
            continue
        if not rec.values:
            reject("no_values", "a record needs at least one value")
            continue
        try:
            data = _record_data(rtype, rec.values)
        except ValueError as e:
            reject("bad_value", str(e))
            continue
        ttl = _duration_seconds(rec.ttl) if rec.HasField("ttl") else zone_ttl
        key = (owner, rtype)
        if key in merged:  # the same (name, type) twice: one RRset, the shorter TTL (RFC 2181 §5.2)
            old_ttl, old = merged[key]
            if rtype == TYPE_CNAME:
                reject("cname_conflict", "two CNAME records for one name")
                continue
            data = tuple(d for d in data if d not in old)
            merged[key] = (min(old_ttl, ttl), [*old, *data])
        else:
            merged[key] = (ttl, list(dict.fromkeys(data)))
    rrsets: dict[Name, dict[int, RRset]] = {}
    for (owner, rtype), (ttl, values) in merged.items():
        rrsets.setdefault(owner, {})[rtype] = RRset(rtype, ttl, tuple(values))
    for owner, types in list(rrsets.items()):
        # RFC 1034 §3.6.2: a CNAME owner has no other data; at the apex the SOA is that other data.
        if TYPE_CNAME in types and (len(types) > 1 or owner == origin):
            del types[TYPE_CNAME]
            rejected["cname_conflict"] += 1
            log.warning(
                "event=dns_record_rejected name=%r type=CNAME reason=cname_conflict", name_to_text(owner)
            )
            if not types:
                del rrsets[owner]
    names = {origin}
    for owner in rrsets:
        names.update(owner[i:] for i in range(len(owner) - len(origin)))
    return Zone(origin, zone_ttl, serial, rrsets, frozenset(names)), rejected


# -- answering -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """What to do with one query: send ``payload`` (None: send nothing), counted under ``result``."""

    payload: bytes | None
    result: str
    truncated: bool = False


def _lookup(zone: Zone, question: Question) -> tuple[int, list[ResourceRecord], list[ResourceRecord], str]:
    """rcode, answers, authority and result for a question inside the zone (following CNAMEs in it)."""
    answers: list[ResourceRecord] = []
    owner = question.name  # answered in the case it was asked
    key = name_key(owner)
    seen: set[Name] = set()
    for _ in range(MAX_CNAME_CHAIN):
        if key not in zone.names:
            return RCODE_NXDOMAIN, answers, [zone.soa()], "nxdomain"
        seen.add(key)
        types = zone.rrsets.get(key, {})
        cname = types.get(TYPE_CNAME)
        if cname is not None and question.qtype not in (TYPE_CNAME, TYPE_ANY):
            target = cname.data[0]
            assert isinstance(target, CNAME)
            answers.append(ResourceRecord(owner, TYPE_CNAME, CLASS_IN, cname.ttl, target))
            if not is_subdomain(target.target, zone.origin) or target.target in seen:
                return RCODE_NOERROR, answers, [], "noerror"  # the client resolves it further
            owner = key = target.target
            continue
        found = [s for t, s in types.items() if question.qtype in (t, TYPE_ANY)]
        for rrset in found:
            answers.extend(ResourceRecord(owner, rrset.rtype, CLASS_IN, rrset.ttl, d) for d in rrset.data)
        if key == zone.origin and question.qtype in (TYPE_SOA, TYPE_ANY):
            answers.append(zone.soa(owner))
        if answers:
            return RCODE_NOERROR, answers, [], "noerror"
        return RCODE_NOERROR, answers, [zone.soa()], "nodata"
    return RCODE_NOERROR, answers, [], "noerror"  # chain too long: give what we have


def respond(data: bytes, zone: Zone | None, *, tcp: bool = False) -> Reply:
    """The reply to one query received over UDP (``tcp=False``) or TCP. Pure; never raises on bad input."""
    try:
        query = parse(data)
    except DnsFormatError as e:
        if e.header is None or e.header.qr:
            return Reply(None, "dropped")
        h = e.header
        header = Header(h.id, qr=True, opcode=h.opcode, rd=h.rd, rcode=RCODE_FORMERR)
        return Reply(Message(header).to_bytes(), "formerr")
    qh = query.header
    if qh.qr:
        return Reply(None, "dropped")
    header = Header(qh.id, qr=True, opcode=qh.opcode, rd=qh.rd, cd=qh.cd)
    if qh.opcode != OPCODE_QUERY:
        return Reply(Message(replace(header, rcode=RCODE_NOTIMP)).to_bytes(), "notimp")
    opts = query.opt_records()
    if (
        len(query.questions) != 1
        or query.answers
        or query.authority
        or len(opts) > 1
        or any(r.name != () for r in opts)  # RFC 6891 §6.1.2: one OPT, owned by the root
    ):
        return Reply(Message(replace(header, rcode=RCODE_FORMERR)).to_bytes(), "formerr")
    question = query.questions[0]
    edns = Edns.from_record(opts[0]) if opts else None
    our_opt = (Edns(EDNS_UDP_SIZE).to_record(),) if edns is not None else ()
    if edns is not None and edns.version > 0:
        opt = Edns(EDNS_UDP_SIZE, extended_rcode=RCODE_BADVERS >> 4).to_record()
        msg = Message(replace(header, rcode=RCODE_BADVERS & 0xF), (question,), additional=(opt,))
        return Reply(msg.to_bytes(), "badvers")
    if question.qtype == TYPE_OPT:
        return Reply(Message(replace(header, rcode=RCODE_FORMERR), additional=our_opt).to_bytes(), "formerr")

    key = name_key(question.name)
    if (
        zone is None
        or question.qclass not in (CLASS_IN, CLASS_ANY)
        or question.qtype in (TYPE_AXFR, TYPE_IXFR)
        or not is_subdomain(key, zone.origin)
    ):
        msg = Message(replace(header, rcode=RCODE_REFUSED), (question,), additional=our_opt)
        return Reply(msg.to_bytes(), "refused")
    rcode, answers, authority, result = _lookup(zone, question)
    msg = Message(
        replace(header, aa=True, rcode=rcode), (question,), tuple(answers), tuple(authority), our_opt
    )
    payload = msg.to_bytes()
    if tcp:
        limit = MAX_MESSAGE
    elif edns is not None:
        limit = max(PLAIN_UDP_SIZE, min(edns.udp_size, EDNS_UDP_SIZE))
    else:
        limit = PLAIN_UDP_SIZE
    if len(payload) <= limit:
        return Reply(payload, result)
    # Too big: the question alone with TC set; the client asks again over TCP (RFC 7766 §5).
    short = Message(replace(msg.header, tc=True), (question,), additional=our_opt)
    return Reply(short.to_bytes(), result, truncated=True)


# -- the server ----------------------------------------------------------------------------------------------


def default_listen(mesh_addresses: Iterable[str]) -> list[tuple[str, int]]:
    """Where the resolver listens by default: port 53 on each of the node's mesh addresses
    (``NodeSelf.mesh_addresses``, e.g. ``["100.64.0.5/10", "fd7a::5/48"]``), as Tailscale answers on its TUN
    address; so ``resolvectl dns <tun> <mesh ip>`` reaches it and nothing else on the host is disturbed."""
    return [(str(ipaddress.ip_interface(a).ip), DNS_PORT) for a in mesh_addresses]


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: MeshResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.resolver.handle(data, tcp=False)
        if reply.payload is not None and self.transport is not None:
            self.transport.sendto(reply.payload, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from earlier replies (a client that went away); nothing to do.
        log.debug("event=dns_udp_error error=%r", exc)


class MeshResolver:
    """The node-local mesh DNS server (UDP and TCP on every ``listen`` address).

    ``listen`` is a list of ``(ip, port)``; see :func:`default_listen`. Port 0 picks a free port (the same one
    for UDP and TCP; :attr:`addresses` says which). Sockets bind with IP_FREEBIND, so the resolver can start
    before the mesh address is up on the TUN device. ``registry``: where to export the metrics.

    Until the first :meth:`update` every query is REFUSED (the resolver knows no domain yet).
    """

    def __init__(
        self,
        listen: Iterable[tuple[str, int]],
        *,
        config: node_pb2.DnsConfig | None = None,
        registry: CollectorRegistry | None = None,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        max_tcp_connections: int = MAX_TCP_CONNECTIONS,
    ) -> None:
        self.listen = list(listen)
        if not self.listen:
            raise ConfigError("MeshResolver needs at least one listen address")
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.zone: Zone | None = None
        self.addresses: list[tuple[str, int]] = []
        self.queries: Counter[str] = Counter(dict.fromkeys(RESULTS, 0))
        self.truncated = 0
        self.tcp_refused = 0
        self.rejected_records: Counter[str] = Counter()
        self._serial = 0
        self._config: node_pb2.DnsConfig | None = None
        self._udp: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.Server] = []
        self._tcp: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._stopping = False
        self._registry = registry
        self._collector: _Collector | None = None
        if registry is not None:
            self._collector = _Collector(self)
            registry.register(self._collector)
        if config is not None:
            self.update(config)

    # -- lifecycle --

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.listen:
                udp_sock = _bind(host, port, socket.SOCK_DGRAM)
                bound_port = udp_sock.getsockname()[1]
                tcp_sock = _bind(host, bound_port, socket.SOCK_STREAM)
                transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp_sock)
                self._udp.append(transport)
                self._servers.append(
                    await asyncio.start_server(self._serve_tcp, sock=tcp_sock, limit=MAX_MESSAGE)
                )
                self.addresses.append((host, bound_port))
        except BaseException:
            await self.stop()
            raise
        log.info(
            "event=dns_started listen=%s domain=%s",
            ",".join(f"{h}:{p}" for h, p in self.addresses),
            self.zone.domain if self.zone else "-",
        )

    async def stop(self) -> None:
        """Close every socket and connection; idempotent."""
        for server in self._servers:
            server.close()
        for transport in self._udp:
            transport.close()
        # Closing a connection's transport ends its handler's read with EOF, so handlers return by themselves;
        # cancelling is only the fallback for one stuck elsewhere.
        self._stopping = True
        try:
            tasks = list(self._tcp)
            for writer in self._tcp.values():
                writer.close()
            if tasks:
                _, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE)
                for task in stuck:
                    task.cancel()
                if stuck:
                    await asyncio.wait(stuck)
        finally:
            self._stopping = False
        for server in self._servers:
            await server.wait_closed()
        was_running = bool(self._servers or self._udp)
        self._servers.clear()
        self._udp.clear()
        self.addresses.clear()
        if self._collector is not None and self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)
            self._collector = None
        if was_running:
            log.info("event=dns_stopped")

    async def __aenter__(self) -> MeshResolver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- records --

    def update(self, config: node_pb2.DnsConfig) -> Zone:
        """Replace every record at once with ``config``, a full DnsConfig (the agent applies deltas to its
        config with ``config_apply.apply_delta`` and passes the result's ``dns``). Bad records are skipped,
        logged and counted in ``tunnelmesh_dns_rejected_records_total{reason}``; a bad domain raises
        :class:`DnsConfigError` and leaves the current zone in place. Call it before :meth:`start` or from the
        event loop's thread."""
        if self.zone is not None and config == self._config:
            return self.zone  # the agent passes every config change here; most leave DNS alone
        try:
            zone, rejected = build_zone(config, self._serial + 1)
        except DnsConfigError:
            self.rejected_records["bad_domain"] += 1
            raise
        self._serial += 1
        self._config = node_pb2.DnsConfig()
        self._config.CopyFrom(config)
        self.rejected_records.update(rejected)
        self.zone = zone
        log.info(
            "event=dns_zone_updated domain=%s serial=%d names=%d records=%d rejected=%d ttl=%d",
            zone.domain,
            zone.serial,
            len(zone.rrsets),
            zone.record_count(),
            sum(rejected.values()),
            zone.ttl,
        )
        return zone

    def handle(self, data: bytes, *, tcp: bool) -> Reply:
        reply = respond(data, self.zone, tcp=tcp)
        self.queries[reply.result] += 1
        if reply.truncated:
            self.truncated += 1
        if reply.result in ("formerr", "dropped"):
            log.debug("event=dns_malformed result=%s size=%d tcp=%s", reply.result, len(data), tcp)
        return reply

    # -- TCP (RFC 1035 §4.2.2, RFC 7766): 2-byte length, then the message; several queries per connection --

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tcp) >= self.max_tcp_connections or self._stopping:
            self.tcp_refused += 1
            writer.close()
            return
        self._tcp[task] = writer
        try:
            while True:
                async with asyncio.timeout(self.tcp_idle_timeout):
                    (length,) = _U16.unpack(await reader.readexactly(2))
                    data = await reader.readexactly(length)
                reply = self.handle(data, tcp=True)
                if reply.payload is None:
                    break  # unparseable: the stream may be out of step, so drop the connection
                writer.write(_U16.pack(len(reply.payload)) + reply.payload)
                async with asyncio.timeout(self.tcp_idle_timeout):
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels us. Return normally: Python 3.11's stream callback logs a cancelled
            # handler as an error (it calls task.exception()).
            if not self._stopping:
                raise
        finally:
            self._tcp.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()


def _bind(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        # Freebind: the mesh address may not be on the TUN device yet when the agent starts the resolver.
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except OSError as e:
        sock.close()
        hint = " (port 53 needs root or CAP_NET_BIND_SERVICE)" if e.errno == errno.EACCES else ""
        raise ConfigError(
            f"mesh DNS cannot listen on {host}:{port}/{kind.name}: {e.strerror}{hint}"
        ) from None
    return sock


class _Collector(Collector):
    """Prometheus view of one resolver, read at scrape time from plain counters."""

    def __init__(self, resolver: MeshResolver) -> None:
        self.resolver = resolver

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        r = self.resolver
        yield counter_family(
            "tunnelmesh_dns_queries", "Mesh DNS queries received, by result", ["result"], by_label(r.queries)
        )
        yield CounterMetricFamily(
            "tunnelmesh_dns_truncated",
            "UDP answers sent truncated (TC) so the client retries over TCP",
            value=r.truncated,
        )
        yield CounterMetricFamily(
            "tunnelmesh_dns_tcp_refused",
            "TCP connections closed at once because the connection limit was reached",
            value=r.tcp_refused,
        )
        yield counter_family(
            "tunnelmesh_dns_rejected_records",
            "Records skipped from DNS config updates, by reason",
            ["reason"],
            by_label(r.rejected_records),
        )
        yield GaugeMetricFamily(
            "tunnelmesh_dns_records",
            "Records the resolver currently answers from",
            value=r.zone.record_count() if r.zone else 0,
        )
