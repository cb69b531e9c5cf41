"""Discovery: how coordinators find each other — mDNS on a LAN, seed lists across regions.

The coordinator process uses one object::

    d = Discovery(name="coord-a", port=7400, member_id="m1f3c2", api="10.0.0.5:7443",
                  seeds=["coord-b.example.net:7400"], mdns=True, interfaces=None)
    await d.start()                                # opens UDP 5353, browses, announces (~2 s of probing)
    found = await d.find_members(timeout=3.0)      # list[Candidate], best first, never longer than timeout
    await d.update_announcement(cluster_id="c7a0", member_id="m1f3c2")   # after bootstrapping or joining
    d.peers()                                      # the live mDNS table, every cluster, for status pages
    await d.stop()                                 # goodbye packets, sockets closed; idempotent

* ``Candidate(address="10.0.0.6:7400", cluster_id, member_id, source="mdns"|"seed", api, origin)``: one
  address to try. From mDNS, ``address`` is the Raft/peer port (SRV) and ``api`` the TXT ``api=``; from a
  seed, both are the seed's resolved address (``tunnelmesh coord --seed`` takes API addresses), so
  ``c.api`` is the API address whatever the source. A seed name that resolves to three addresses gives
  three candidates; an mDNS peer with two addresses gives two, the one on a subnet of ours first. The
  caller tries them in order and must check the cluster id of whoever answers: a seed's cluster is
  unknown (None) until asked.
* ``find_members`` returns the coordinators that are *members of a cluster*: mDNS peers whose TXT
  ``cluster=`` equals ours (when we have one; every cluster when we have none — the caller must then refuse
  to choose if more than one cluster id appears), followed by the seeds' addresses. Never ourselves, never
  a coordinator that is not in a cluster yet, never a coordinator of another cluster (those stay in
  ``peers()`` and are logged as ``event=discovery_foreign_cluster``). It returns once the table has been
  quiet for ``QUIET_SECONDS`` with at least one member, or at ``timeout`` (then possibly ``[]``).
* ``on_change(PeerEvent)``, optional, is called in the event loop for every table change
  (added / updated / removed, with the reason: ``goodbye``, ``expired``, ``invalid``).
* Errors are ``DiscoveryError`` (bad seed or TXT value, interface not found, UDP 5353 cannot be opened, a
  name conflict on the LAN). Nothing blocks without a deadline; network trouble during ``find_members``
  (an unresolvable seed, a silent peer) is logged and never raised.
* Not thread-safe: call every method from the event loop that ran ``start()`` (zeroconf's sockets are
  opened there, in that thread's network namespace).

Theory of operation (mDNS, RFC 6762 / DNS-SD, RFC 6763, via ``zeroconf``'s asyncio API):

* We register ``<name>-<member id>._tunnelmesh-coord._tcp.local.`` (a random suffix until we have a member
  id): SRV -> our host record and Raft/peer port; A -> our IPv4 addresses on the chosen interfaces; TXT
  ``v=1``, ``member=``, ``api=``, ``cluster=`` (absent while not in a cluster). No secrets in TXT: it is
  readable by anyone on the LAN. The service name ``tunnelmesh-coord`` is 16 characters, one more than
  RFC 6335 allows, so zeroconf registers it only with ``strict=False`` (other mDNS stacks: not tested).
* A browser turns PTR records into names; each name is resolved (SRV, TXT, A, with a deadline) into a
  ``Peer`` in ``self._table``. A goodbye (TTL 0) removes the peer at once. zeroconf raises every received
  PTR TTL to 1125 s and never expires SRV records on its own account, so a peer that vanished without a
  goodbye (crash, cable cut) is found here: the table holds a peer only while its SRV record is alive in
  the cache. Records are announced with TTL ``ttl`` (default 120 s) and refreshed as RFC 6762 §5.2 says:
  queries at 80, 85, 90 and 95 % of the TTL; a peer that answers none of them is removed at 100 %. Its PTR
  stays in zeroconf's cache, so the browser would not report it when it comes back: we ask for a lost peer
  ourselves after 1, 2, 4 ... s, then every minute, until it answers or its PTR goes.
* Binding: ``interfaces=None`` (or empty) listens on every IPv4 interface and announces every non-loopback
  IPv4 address; a list of interface names or IPv4 addresses restricts both. ``mdns=False``: seeds only, no
  socket is opened. IPv4 only (mDNS over IPv6 is not
  needed on the LANs we serve; seeds may be IPv6).
* Seeds are ``host:port`` (``[v6]:port`` for IPv6 literals), resolved on every ``find_members`` call with the
  call's deadline, every address kept; resolution runs concurrently with the mDNS wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import ifaddr
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)

# Re-exported by ``zeroconf`` but not listed in its ``__all__``: imported from where they live.
from zeroconf._dns import DNSQuestion, DNSService
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf._utils.net import InterfacesType
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from tunnelmesh.errors import TunnelMeshError

log = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_tunnelmesh-coord._tcp.local."
TXT_VERSION: Final = "1"
MDNS_PORT: Final = 5353
DEFAULT_TTL: Final = 120  # seconds, RFC 6762 §10 for records carrying a host name
MIN_TTL: Final = 2
REFRESH_PERCENTS: Final = (80, 85, 90, 95)  # RFC 6762 §5.2
QUIET_SECONDS: Final = 0.5  # find_members: return once the table has not changed for this long
RESOLVE_TIMEOUT: Final = 3.0  # one peer's SRV/TXT/A
START_TIMEOUT: Final = 10.0  # probing and announcing take ~2 s
STOP_TIMEOUT: Final = 5.0
TICK: Final = 0.25  # how often TTLs are checked
LOST_QUERY_FIRST: Final = 1.0  # an expired peer is asked for after 1 s, 2 s, 4 s ... then every minute
LOST_QUERY_MAX: Final = 60.0
MAX_TXT_VALUE: Final = 200  # bytes; a TXT string is at most 255 with its key
MAX_LABEL: Final = 63  # bytes in one DNS label (the instance name)

# DNS constants (RFC 1035), spelled as there.
_TYPE_A: Final = 1
_TYPE_TXT: Final = 16
_TYPE_SRV: Final = 33
_CLASS_IN: Final = 1
_FLAGS_QUERY: Final = 0x0000

Source = Literal["mdns", "seed"]


class DiscoveryError(TunnelMeshError):
    """Discovery cannot start or was given a bad seed, interface or announcement value."""


# --- host:port ------------------------------------------------------------------------------------

_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed ``host:port``; ``host`` is a DNS name, an IPv4 address or an IPv6 address (no brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def is_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def format_hostport(host: str, port: int) -> str:
    """``10.0.0.1:7400``, ``[fd00::1]:7400`` or ``coord.example.net:7400``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str, *, what: str = "address") -> HostPort:
    """Parse ``host:port`` strictly; raises ``DiscoveryError`` naming ``what`` (e.g. "seed") and the fix."""
    s = text.strip()
    example = "e.g. coord-1.example.net:7400, 10.0.0.5:7400 or [fd00::5]:7400"
    if not s:
        raise DiscoveryError(f"{what} is empty: expected host:port, {example}")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise DiscoveryError(f"{what} {text!r}: '[' without ']': expected [IPv6]:port, {example}")
        host, rest = s[1:end], s[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DiscoveryError(f"{what} {text!r}: {host!r} in brackets is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise DiscoveryError(f"{what} {text!r} has no port: expected [IPv6]:port, {example}")
        port_text = rest[1:]
    else:
        if s.count(":") > 1:
            raise DiscoveryError(
                f"{what} {text!r}: an IPv6 address needs brackets, e.g. [{s.rsplit(':', 1)[0]}]:7400"
            )
        host, sep, port_text = s.partition(":")
        if not sep:
            raise DiscoveryError(f"{what} {text!r} has no port: expected host:port, {example}")
        _check_host(host, text, what)
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise DiscoveryError(f"{what} {text!r}: port {port_text!r} is not a number from 1 to 65535")
    return HostPort(host, int(port_text))


def _check_host(host: str, text: str, what: str) -> None:
    if not host:
        raise DiscoveryError(f"{what} {text!r} has no host before the ':'")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise DiscoveryError(f"{what} {text!r}: {host!r} is not a valid IPv4 address") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL_RE.match(label) for label in name.split(".")):
        raise DiscoveryError(
            f"{what} {text!r}: {host!r} is not a valid host name (letters, digits, '-', dot-separated labels "
            "of at most 63 characters)"
        )


def parse_seeds(seeds: str | Iterable[str]) -> list[HostPort]:
    """Parse a seed list: one string with commas (``--seed a:1,b:2``) or several (repeated ``--seed``).

    Duplicates are dropped, order is kept. Raises ``DiscoveryError`` naming the bad entry.
    """
    items = [seeds] if isinstance(seeds, str) else list(seeds)
    out: list[HostPort] = []
    for item in items:
        for part in item.split(","):
            if not part.strip():
                raise DiscoveryError(f"seed list {item!r} has an empty entry: write host:port[,host:port...]")
            hp = parse_hostport(part, what="seed")
            if hp not in out:
                out.append(hp)
    return out


# --- TXT ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announcement:
    """What a coordinator says about itself in TXT. Nothing secret: anyone on the LAN can read it."""

    cluster_id: str | None = None
    member_id: str | None = None
    api: str | None = None  # host:port of the node/admin API
    version: str = TXT_VERSION


def _check_value(key: str, value: str) -> None:
    raw = value.encode()
    if not raw or len(raw) > MAX_TXT_VALUE:
        raise DiscoveryError(f"TXT {key}= must be 1 to {MAX_TXT_VALUE} bytes, got {len(raw)}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise DiscoveryError(f"TXT {key}={value!r} contains control characters")


def encode_txt(a: Announcement) -> dict[str, str]:
    """TXT key/value pairs for ``a`` (``cluster`` and ``member`` left out when None); checks every value."""
    txt = {"v": a.version}
    if a.cluster_id is not None:
        _check_value("cluster", a.cluster_id)
        txt["cluster"] = a.cluster_id
    if a.member_id is not None:
        _check_value("member", a.member_id)
        txt["member"] = a.member_id
    if a.api is not None:
        _check_value("api", a.api)
        parse_hostport(a.api, what="TXT api")
        txt["api"] = a.api
    _check_value("v", a.version)
    return txt


def parse_txt(properties: Mapping[bytes, bytes | None]) -> Announcement:
    """Parse TXT key/values as zeroconf hands them over. Keys are case-insensitive (RFC 6763 §6.4); a key
    without ``=`` or with an empty value counts as absent; unknown keys are ignored (forward compatible).

    Raises only ``DiscoveryError``: missing or unsupported ``v``, values that are not UTF-8 or not valid.
    """
    values: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        try:
            key = raw_key.decode("ascii").lower()
        except (UnicodeDecodeError, AttributeError):
            continue  # RFC 6763 §6.4: keys are printable ASCII; anything else is not ours
        if key in values or raw_value is None or raw_value == b"":
            continue
        try:
            value = raw_value.decode("utf-8")
        except (UnicodeDecodeError, AttributeError):
            raise DiscoveryError(f"TXT {key}= is not UTF-8 text") from None
        values[key] = value
    version = values.get("v")
    if version is None:
        raise DiscoveryError("TXT has no v= key: not a TunnelMesh coordinator announcement")
    if version != TXT_VERSION:
        raise DiscoveryError(
            f"TXT v={version[:20]!r} is not supported (this coordinator understands v={TXT_VERSION}): "
            "run the same TunnelMesh version on every coordinator"
        )
    a = Announcement(
        cluster_id=values.get("cluster"),
        member_id=values.get("member"),
        api=values.get("api"),
        version=version,
    )
    encode_txt(a)  # the same checks as on the sending side
    return a


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """One address to try: the Raft/peer port (mDNS) or the seed as resolved; ``api``: the API address."""

    address: str
    cluster_id: str | None
    member_id: str | None
    source: Source
    api: str | None = None
    origin: str = ""  # the mDNS instance name, or the seed as written


@dataclass(frozen=True, slots=True)
class Peer:
    """A coordinator seen by mDNS. ``addresses`` are host:port, preferred (same subnet as ours) first."""

    instance: str
    cluster_id: str | None
    member_id: str | None
    api: str | None
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PeerEvent:
    kind: Literal["added", "updated", "removed"]
    peer: Peer
    reason: str = ""


Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> IP address strings; the default is the system's getaddrinfo."""


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolve_seeds(
    seeds: Sequence[HostPort],
    timeout: float,  # noqa: ASYNC109 - a budget shared by concurrent look-ups, not a cancel scope
    resolver: Resolver | None = None,
) -> list[Candidate]:
    """One candidate per address of every seed, in seed order, within ``timeout`` seconds overall.

    A seed that does not resolve in time or at all is logged (``event=seed_unresolved``) and skipped.
    """
    resolve = resolver or system_resolver

    async def one(seed: HostPort) -> list[str]:
        if seed.is_literal:
            return [seed.host]
        try:
            async with asyncio.timeout(timeout):
                found = await resolve(seed.host, seed.port)
        except TimeoutError:
            log.warning("event=seed_unresolved seed=%s error=%r", seed, f"no answer within {timeout:g}s")
            return []
        except (OSError, UnicodeError) as exc:
            log.warning("event=seed_unresolved seed=%s error=%r", seed, str(exc))
            return []
        if not found:
            log.warning("event=seed_unresolved seed=%s error=%r", seed, "no addresses")
        return found

    results = await asyncio.gather(*(one(s) for s in seeds))
    out: list[Candidate] = []
    seen: set[str] = set()
    for seed, addresses in zip(seeds, results, strict=True):
        for ip in addresses:
            address = format_hostport(ip.split("%", 1)[0], seed.port)
            if address not in seen:
                seen.add(address)
                out.append(Candidate(address, None, None, "seed", api=address, origin=str(seed)))
    return out


# --- interfaces -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Binding:
    listen: list[str] | None  # IPv4 addresses for zeroconf, None = all
    announce: list[str]  # the addresses in our A records
    networks: list[ipaddress.IPv4Network]  # ours, to prefer peers' addresses on a shared subnet


def _select_interfaces(wanted: Sequence[str] | None) -> _Binding:
    """Map interface names / IPv4 addresses to what zeroconf binds and what we announce."""
    v4: list[tuple[str, ipaddress.IPv4Interface]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                v4.append((adapter.nice_name, ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}")))
    if wanted is None:
        chosen = [i for _, i in v4 if not i.ip.is_loopback]
    else:
        chosen = []
        for item in wanted:
            matches = [i for name, i in v4 if item in (name, str(i.ip))]
            if not matches:
                have = ", ".join(f"{name} ({i.ip})" for name, i in v4) or "none"
                raise DiscoveryError(
                    f"mDNS interface {item!r} is neither an interface with an IPv4 address nor an IPv4 "
                    f"address of this host (have: {have}); fix the interface list or leave it empty for all"
                )
            chosen.extend(m for m in matches if m not in chosen)
    if not chosen:
        raise DiscoveryError(
            "no non-loopback IPv4 address to announce over mDNS: bring up a network interface, "
            "or use --seed instead of --mdns"
        )
    return _Binding(
        listen=None if wanted is None else [str(i.ip) for i in chosen],
        announce=[str(i.ip) for i in chosen],
        networks=[i.network for i in chosen],
    )


def _prefer_local(addresses: Iterable[str], networks: Sequence[ipaddress.IPv4Network]) -> list[str]:
    def rank(ip: str) -> int:
        addr = ipaddress.ip_address(ip)
        return 0 if any(addr in n for n in networks if addr.version == n.version) else 1

    unique = list(dict.fromkeys(addresses))
    return sorted(unique, key=rank)  # stable: the peer's order within a rank


def _instance_label(name: str, suffix: str) -> str:
    """``<name>-<suffix>`` as one DNS-SD instance label (<= 63 bytes, no dots); the name is shortened."""
    clean = re.sub(r"[\x00-\x1f\x7f.]", "-", name).strip() or "coordinator"
    suffix = re.sub(r"[\x00-\x1f\x7f.]", "-", suffix)  # a dot would split the label
    room = MAX_LABEL - len(suffix.encode()) - 1
    if room < 1:
        raise DiscoveryError(
            f"member id {suffix!r} is too long for an mDNS name (at most {MAX_LABEL - 2} bytes)"
        )
    clean = clean.encode()[:room].decode("utf-8", "ignore")
    return f"{clean}-{suffix}"


def _host_label(instance: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", instance.lower()).strip("-")
    return (label or "coordinator")[:MAX_LABEL].strip("-")


class _Keep(enum.Enum):
    KEEP = 0


KEEP: Final = _Keep.KEEP


@dataclass(slots=True)
class _Entry:
    peer: Peer
    last_refresh_ms: float = 0.0


class Discovery:
    """Announces this coordinator and finds the others (mDNS and seeds). See the module comment."""

    def __init__(
        self,
        *,
        name: str,
        port: int,
        cluster_id: str | None = None,
        member_id: str | None = None,
        api: str | None = None,
        seeds: str | Iterable[str] = (),
        mdns: bool = True,
        interfaces: Sequence[str] | None = None,
        ttl: int = DEFAULT_TTL,
        on_change: Callable[[PeerEvent], None] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        if not 1 <= port <= 65535:
            raise DiscoveryError(f"discovery port {port} is not from 1 to 65535")
        if not MIN_TTL <= ttl <= 4500:
            # Below 2 s the refresh queries (at 80 % of the TTL) would fall inside the responder's
            # one-second rate limit (RFC 6762 §6) and live peers would flap.
            raise DiscoveryError(f"mDNS ttl {ttl} must be from {MIN_TTL} to 4500 seconds")
        self.name = name
        self.port = port
        self.mdns = mdns
        self.ttl = ttl
        self.seeds = parse_seeds(seeds)
        self._announcement = Announcement(cluster_id, member_id, api)
        encode_txt(self._announcement)
        self._nonce = secrets.token_hex(4)
        _instance_label(name, member_id or self._nonce)  # fail now, not in start()
        self._interfaces = list(interfaces) if interfaces else None
        self._on_change = on_change
        self._resolver = resolver
        self._state: Literal["new", "running", "stopped"] = "new"
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._registered: AsyncServiceInfo | None = None  # what we announce now
        self._own: set[str] = set()  # every instance name (lower case) we ever announced
        self._binding: _Binding | None = None
        self._table: dict[str, _Entry] = {}
        self._lost: dict[str, _Lost] = {}
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._resolving: set[str] = set()
        self._again: set[str] = set()
        self._runner: asyncio.Task[None] | None = None
        self._last_change = 0.0

    # -- properties --------------------------------------------------------------------------------

    @property
    def cluster_id(self) -> str | None:
        return self._announcement.cluster_id

    @property
    def member_id(self) -> str | None:
        return self._announcement.member_id

    @property
    def instance(self) -> str | None:
        """Our mDNS instance name while announced (``<name>-<member id>``), else None."""
        if self._registered is None:
            return None
        return self._registered.name[: -len(SERVICE_TYPE) - 1]

    @property
    def addresses(self) -> list[str]:
        """The IPv4 addresses we announce (empty before ``start`` or without mDNS)."""
        return [] if self._binding is None else list(self._binding.announce)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the mDNS sockets, browse, and announce. Raises ``DiscoveryError`` within START_TIMEOUT."""
        if self._state != "new":
            raise DiscoveryError(f"discovery was already started (state {self._state})")
        self._state = "running"
        self._last_change = time.monotonic()
        if not self.mdns:
            log.info("event=discovery_started mdns=off seeds=%d", len(self.seeds))
            return
        try:
            self._binding = _select_interfaces(self._interfaces)
            try:
                listen: InterfacesType = InterfaceChoice.All
                if self._binding.listen is not None:
                    listen = list(self._binding.listen)
                self._azc = AsyncZeroconf(interfaces=listen, ip_version=IPVersion.V4Only)
            except OSError as exc:
                raise DiscoveryError(
                    f"cannot open mDNS on UDP port {MDNS_PORT} ({exc.strerror or exc}): check that the "
                    "interfaces exist and that nothing holds the port without SO_REUSEADDR"
                ) from exc
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
            )
            self._runner = asyncio.create_task(self._run(), name="discovery")
            await self._register(self._announcement)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "event=discovery_started mdns=on instance=%r addresses=%s port=%d cluster=%s member=%s seeds=%d",
            self.instance,
            ",".join(self._binding.announce),
            self.port,
            self.cluster_id or "-",
            self.member_id or "-",
            len(self.seeds),
        )

    async def stop(self) -> None:
        """Send goodbyes, close the sockets, end the background task. Idempotent; at most STOP_TIMEOUT."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        azc, self._azc = self._azc, None
        if azc is not None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    if self._browser is not None:
                        await self._browser.async_cancel()
                    await azc.async_close()  # unregisters everything: goodbye packets, then closes
            except TimeoutError:
                log.warning("event=discovery_stop_slow seconds=%g", STOP_TIMEOUT)
                azc.zeroconf.close()
        self._browser = None
        self._registered = None
        self._table.clear()
        self._lost.clear()
        log.info("event=discovery_stopped")

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- announcing --------------------------------------------------------------------------------

    async def update_announcement(
        self,
        *,
        cluster_id: str | _Keep | None = KEEP,
        member_id: str | _Keep | None = KEEP,
        api: str | _Keep | None = KEEP,
    ) -> None:
        """Change what we announce (after bootstrapping or joining a cluster, or leaving one).

        A changed member id changes the instance name: the old name says goodbye, the new one is probed
        and announced (~2 s). Other changes re-announce the TXT record under the same name.
        """
        old = self._announcement
        new = Announcement(
            cluster_id=old.cluster_id if isinstance(cluster_id, _Keep) else cluster_id,
            member_id=old.member_id if isinstance(member_id, _Keep) else member_id,
            api=old.api if isinstance(api, _Keep) else api,
        )
        encode_txt(new)
        _instance_label(self.name, new.member_id or self._nonce)
        if new == old:
            return
        self._announcement = new
        log.info(
            "event=discovery_announcement_updated cluster=%s member=%s api=%s",
            new.cluster_id or "-",
            new.member_id or "-",
            new.api or "-",
        )
        if self._state == "running" and self._azc is not None:
            await self._register(new)

    def _service_info(self, a: Announcement) -> AsyncServiceInfo:
        assert self._binding is not None
        instance = _instance_label(self.name, a.member_id or self._nonce)
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            port=self.port,
            properties=encode_txt(a),
            server=f"{_host_label(instance)}.local.",
            host_ttl=self.ttl,
            other_ttl=self.ttl,
            parsed_addresses=self._binding.announce,
        )

    async def _register(self, a: Announcement) -> None:
        assert self._azc is not None
        info = self._service_info(a)
        old = self._registered
        try:
            async with asyncio.timeout(START_TIMEOUT):
                if old is not None and old.key == info.key:
                    await (await self._azc.async_update_service(info))
                    self._registered = info
                    return
                if old is not None:
                    await (await self._azc.async_unregister_service(old))  # goodbye under the old name
                    self._registered = None
                self._own.add(info.key)
                await (await self._azc.async_register_service(info, strict=False))
                self._registered = info
        except NonUniqueNameException:
            raise DiscoveryError(
                f"another coordinator on this LAN already announces {info.name!r}: two coordinators share "
                f"member id {a.member_id!r}; a coordinator whose data directory was wiped must join as a new "
                "member (remove the old one with `tunnelmesh cluster remove`)"
            ) from None
        except TimeoutError:
            raise DiscoveryError(
                f"announcing {info.name!r} over mDNS took longer than {START_TIMEOUT:g}s"
            ) from None

    # -- finding -----------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """Every coordinator mDNS sees now, of every cluster (ours, others, none), sorted by instance."""
        return sorted((e.peer for e in self._table.values()), key=lambda p: p.instance)

    async def find_members(self, timeout: float) -> list[Candidate]:  # noqa: ASYNC109 - a wait budget
        """Addresses of our cluster's members (see the module comment), within ``timeout`` seconds."""
        if self._state != "running":
            raise DiscoveryError(f"find_members() needs a started discovery (state {self._state})")
        if timeout < 0:
            raise DiscoveryError(f"find_members timeout must be >= 0, got {timeout}")
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            seeds = tg.create_task(resolve_seeds(self.seeds, timeout, self._resolver))
            if self.mdns:
                tg.create_task(self._wait_quiet(started + timeout))
        found = self._merge(self._mdns_candidates(), seeds.result())
        log.debug(
            "event=discovery_find_done cluster=%s candidates=%d mdns=%d seed=%d seconds=%.2f",
            self.cluster_id or "-",
            len(found),
            sum(c.source == "mdns" for c in found),
            sum(c.source == "seed" for c in found),
            time.monotonic() - started,
        )
        return found

    async def _wait_quiet(self, deadline: float) -> None:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            members = any(self._is_member(e.peer) for e in self._table.values())
            if members and not self._resolving and now - self._last_change >= QUIET_SECONDS:
                return
            await asyncio.sleep(min(0.05, deadline - now))

    def _is_member(self, peer: Peer) -> bool:
        if peer.cluster_id is None:
            return False
        if self.member_id is not None and peer.member_id == self.member_id:
            return False
        return self.cluster_id is None or peer.cluster_id == self.cluster_id

    def _mdns_candidates(self) -> list[Candidate]:
        return [
            Candidate(address, p.cluster_id, p.member_id, "mdns", p.api, p.instance)
            for p in self.peers()
            if self._is_member(p)
            for address in p.addresses
        ]

    def _merge(self, mdns: list[Candidate], seeds: list[Candidate]) -> list[Candidate]:
        """mDNS first (it knows cluster and member), then seeds not already listed (as a peer's Raft or API
        address); a seed that mDNS knows as a non-member (another cluster, none, ourselves) is dropped."""
        out = list(mdns)
        listed = {a for c in mdns for a in (c.address, c.api) if a}  # a seed may name the Raft or API port
        known = {a: p for p in self.peers() for a in (*p.addresses, p.api) if a}
        for c in seeds:
            if c.address in listed:
                continue
            peer = known.get(c.address)
            if peer is not None and not self._is_member(peer):
                log.warning(
                    "event=seed_skipped seed=%s address=%s instance=%r cluster=%s reason=%s",
                    c.origin,
                    c.address,
                    peer.instance,
                    peer.cluster_id or "-",
                    "not in a cluster" if peer.cluster_id is None else "another cluster or ourselves",
                )
                continue
            listed.add(c.address)
            out.append(c)
        return out

    # -- the live table ----------------------------------------------------------------------------

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        key = name.lower()
        if key in self._own or self._state != "running":
            return
        if state_change is ServiceStateChange.Removed:
            self._remove(key, "goodbye")
        else:
            self._pending.put_nowait(name)

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._maintain())
            while True:
                name = await self._pending.get()
                key = name.lower()
                if key in self._resolving:
                    self._again.add(key)
                else:
                    self._resolving.add(key)
                    tg.create_task(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        key = name.lower()
        try:
            while True:
                self._again.discard(key)
                await self._resolve_once(name)
                if key not in self._again:
                    return
        finally:
            self._resolving.discard(key)

    async def _resolve_once(self, name: str) -> None:
        assert self._azc is not None and self._binding is not None
        zc = self._azc.zeroconf
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zc, RESOLVE_TIMEOUT * 1000):
            log.debug("event=discovery_resolve_timeout instance=%r seconds=%g", name, RESOLVE_TIMEOUT)
            return
        key = name.lower()
        if zc.cache.current_entry_with_name_and_alias(SERVICE_TYPE, name) is None:
            return  # said goodbye while we were resolving
        instance = name[: -len(SERVICE_TYPE) - 1]
        try:
            a = parse_txt(info.properties)
        except DiscoveryError as exc:
            if key in self._table:
                self._remove(key, "invalid")
            log.info("event=discovery_peer_ignored instance=%r error=%r", instance, str(exc))
            return
        ips = info.parsed_addresses(IPVersion.V4Only)
        if not ips or info.port is None:
            return
        addresses = tuple(format_hostport(ip, info.port) for ip in _prefer_local(ips, self._binding.networks))
        peer = Peer(instance, a.cluster_id, a.member_id, a.api, addresses)
        old = self._table.get(key)
        if old is not None and old.peer == peer:
            return
        self._table[key] = _Entry(peer, old.last_refresh_ms if old else 0.0)
        self._changed("updated" if old else "added", peer)

    def _remove(self, key: str, reason: str) -> None:
        entry = self._table.pop(key, None)
        if entry is not None:
            self._changed("removed", entry.peer, reason)

    def _changed(self, kind: Literal["added", "updated", "removed"], peer: Peer, reason: str = "") -> None:
        self._last_change = time.monotonic()
        foreign = (
            peer.cluster_id is not None and self.cluster_id is not None and peer.cluster_id != self.cluster_id
        )
        log.info(
            "event=discovery_peer_%s instance=%r cluster=%s member=%s addresses=%s api=%s%s",
            kind,
            peer.instance,
            peer.cluster_id or "-",
            peer.member_id or "-",
            ",".join(peer.addresses),
            peer.api or "-",
            f" reason={reason}" if reason else "",
        )
        if kind == "added" and foreign:
            log.info(
                "event=discovery_foreign_cluster instance=%r cluster=%s ours=%s",
                peer.instance,
                peer.cluster_id,
                self.cluster_id,
            )
        if kind != "removed" and self.member_id is not None and peer.member_id == self.member_id:
            log.warning(
                "event=discovery_duplicate_member instance=%r member=%s: another process announces our "
                "member id",
                peer.instance,
                peer.member_id,
            )
        if self._on_change is not None:
            try:
                self._on_change(PeerEvent(kind, peer, reason))
            except Exception:
                log.exception("event=discovery_on_change_failed kind=%s instance=%r", kind, peer.instance)

    async def _maintain(self) -> None:
        """RFC 6762 §5.2 cache maintenance: refresh queries, then expiry; and a watch on lost peers."""
        assert self._azc is not None
        zc = self._azc.zeroconf
        while True:
            await asyncio.sleep(TICK)
            now = current_time_millis()
            for key, entry in list(self._table.items()):
                name = f"{entry.peer.instance}.{SERVICE_TYPE}"
                srv = _live_srv(zc, name, now)
                if srv is None:
                    self._remove(key, "expired")
                    # Its PTR outlives it in zeroconf's cache (1125 s at least), so the browser will not
                    # report it again when it comes back: we ask for it ourselves, backing off.
                    self._lost[key] = _Lost(name, now + LOST_QUERY_FIRST * 1000, LOST_QUERY_FIRST)
                    continue
                due = [t for t in (srv.get_expiration_time(p) for p in REFRESH_PERCENTS) if t <= now]
                if due and entry.last_refresh_ms < max(due):
                    entry.last_refresh_ms = now
                    _send_query(zc, name, srv.server)
                    log.debug("event=discovery_refresh_query instance=%r", entry.peer.instance)
            for key, lost in list(self._lost.items()):
                if (
                    key in self._table
                    or zc.cache.current_entry_with_name_and_alias(SERVICE_TYPE, lost.name) is None
                ):
                    del self._lost[key]  # back already, or its PTR is gone (goodbye or expiry): the browser
                    continue  # reports it as new when it returns
                if _live_srv(zc, lost.name, now) is not None:
                    del self._lost[key]
                    self._pending.put_nowait(lost.name)
                elif now >= lost.next_ms:
                    lost.interval = min(lost.interval * 2, LOST_QUERY_MAX)
                    lost.next_ms = now + lost.interval * 1000
                    _send_query(zc, lost.name, None)


@dataclass(slots=True)
class _Lost:
    name: str
    next_ms: float
    interval: float


def _live_srv(zc: Zeroconf, name: str, now: float) -> DNSService | None:
    """The freshest unexpired SRV record for ``name`` in zeroconf's cache."""
    srvs = [
        r
        for r in zc.cache.get_all_by_details(name, _TYPE_SRV, _CLASS_IN)
        if isinstance(r, DNSService) and not r.is_expired(now)
    ]
    return max(srvs, key=lambda r: r.get_expiration_time(100)) if srvs else None


def _send_query(zc: Zeroconf, name: str, server: str | None) -> None:
    """One multicast QM query for an instance's SRV and TXT (and its host's A record, if known)."""
    out = DNSOutgoing(_FLAGS_QUERY)
    out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
    out.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
    if server is not None:
        out.add_question(DNSQuestion(server, _TYPE_A, _CLASS_IN))
    zc.async_send(out)
