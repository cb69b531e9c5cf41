"""NAT traversal: endpoint candidates, authenticated path probes, hole punching and path selection.

Theory of operation
-------------------
Every node has *candidates*: host candidates (its own non-loopback IPv4 addresses with the data-plane port)
and reflexive ones (its address as a coordinator's reflector saw it, ``0x20``/``0x21`` sent from the data
plane's socket so the NAT mapping is the tunnel's). The agent reports them; coordinators hand each node its
peers' candidates in the config stream. A peer's candidates appearing or changing reaches both ends at about
the same moment, and that is the signal to punch: both sides *burst* probes at all the other's candidates
(every ``burst_interval`` for ``burst_duration``), which opens both NATs' mappings at once.

Probes (``0x22 PROBE``) and replies (``0x23 PROBE_REPLY``) are NaCl ``Box``es between the two nodes' static
X25519 keys (the data plane's private key and the peer's public key)::

    type(1) 0 0 0 | sender public key (32) | nonce (24) | Box ciphertext
    PROBE plaintext:  type(1) direction(1) flags(1) txid(12) counter(8, BE) zero padding to 40 bytes
    REPLY plaintext:  type(1) direction(1) flags(1) txid(12) family(1: 4|6) port(2, BE) address(4|16)

``type`` inside the box stops a probe from being passed off as a reply; ``direction`` (1 if the sender's key
sorts below the receiver's) stops a datagram from being reflected back to its sender, since a Box key is the
same in both directions. A probe's counter (the sender's nanosecond clock, strictly increasing) goes through
a sliding replay window per peer; a reply is accepted once, for a txid we sent and that has not expired.
Probes are padded so a reply is never larger than its probe. A path (an endpoint) is only used after an
authenticated reply from it: nothing an unauthenticated packet says moves traffic. An authenticated probe
from an address we did not know is a *peer-reflexive* candidate (the peer's NAT mapping towards us) and is
probed in turn.

Each path (a direct candidate, or the relay client's loopback endpoint for the peer, over "udp" or "ws")
keeps its probe results: RTT (EWMA), loss over a sliding ``window``, a streak of consecutive replies, and a
CUSUM loss detector fed in send order (a loss adds ln(loss_bad/loss_good), a reply subtracts
ln((1-loss_good)/(1-loss_bad)), floored at 0). A probe is lost after ``timeout_rtts`` x the path's RTT,
clamped to [``probe_timeout_min``, ``probe_timeout``]. A path is:

* ``unknown`` until it answers; **up** after ``up_streak`` consecutive replies with window loss at most
  ``up_loss`` (one reply for a relay path: its endpoint is our own relay client's);
* **dead** when its CUSUM reaches ``cusum_limit``, when nothing answered for ``silence`` seconds (with probes
  lost), or when a burst ends unanswered. A dead direct path is retried after ``retry_initial`` seconds,
  doubling up to ``retry_max``; a retry is a new burst, and its probes over the relay carry ``FLAG_PUNCH`` so
  the peer bursts back at the same time.

The path in use is probed every ``active_interval`` (``suspect_interval`` for ``suspect_hold`` after a loss),
other working paths every ``standby_interval``. A blackholed path is dead within ``detection_bound``
(1.35 s by default); for 30-64 % loss see the table in docs/nat-traversal.md. Selection: the best-RTT working
direct path (another direct path replaces the current one only if its RTT is below ``switch_ratio`` of it),
then the UDP relay, then the WebSocket relay; an unverified relay beats nothing once no direct candidate is
being probed. Every choice other than direct carries a reason.

``PeerPaths`` (one peer's paths and the selection) and the codec are pure: time comes in as ``now``, txids,
nonces and counters from the caller. ``PathManager`` is the asyncio shell: it takes datagrams from the data
plane's rx thread (``set_raw_handler``), sends with ``send_raw``, runs reflection against the coordinators,
and calls ``dataplane.update_peer(pk, endpoint=...)`` when a peer's path changes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import ipaddress
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

import nacl.exceptions
import nacl.public
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from tunnelmesh.api.v1 import common_pb2
from tunnelmesh.api.v1.common_pb2 import Candidate, CoordinatorInfo
from tunnelmesh.config import split_host_port
from tunnelmesh.coord import relay as relay_wire
from tunnelmesh.errors import ProtocolError
from tunnelmesh.metrics import by_label, counter_family, gauge_family
from tunnelmesh.node.errors import DataplaneError

if TYPE_CHECKING:
    from tunnelmesh.node.dataplane import DataPlane

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
_K = TypeVar("_K")

__all__ = [
    "Candidate",
    "NatError",
    "NatTiming",
    "PathInfo",
    "PathKind",
    "PathManager",
    "PeerPaths",
]

# -- wire format -------------------------------------------------------------------------------------------

PROBE: Final = 0x22
PROBE_REPLY: Final = 0x23
FLAG_PUNCH: Final = 0x01  # "I am bursting at your direct candidates now: burst back"
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
TXID_LEN: Final = 12
HEADER_LEN: Final = 4 + KEY_LEN + NONCE_LEN
_MAC_LEN: Final = 16
PROBE_PLAINTEXT_LEN: Final = 40  # padded: a reply (at most 3 + 12 + 3 + 16 = 34 bytes) is never larger
PROBE_LEN: Final = HEADER_LEN + _MAC_LEN + PROBE_PLAINTEXT_LEN
_REPLY_MIN: Final = 3 + TXID_LEN + 3 + 4


class NatError(ProtocolError):
    """A probe datagram that is malformed, unauthenticated or replayed. ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Probe:
    txid: bytes
    counter: int
    flags: int


@dataclass(frozen=True, slots=True)
class ProbeReply:
    txid: bytes
    observed: Endpoint
    flags: int


def _direction(sender: bytes, receiver: bytes) -> int:
    return 1 if sender < receiver else 0


def encode_probe(
    box: nacl.public.Box, sender: bytes, receiver: bytes, txid: bytes, counter: int, flags: int, nonce: bytes
) -> bytes:
    """A PROBE from ``sender`` to ``receiver`` (public keys); ``box`` is between their static keys."""
    if len(txid) != TXID_LEN or len(nonce) != NONCE_LEN or len(sender) != KEY_LEN:
        raise ValueError("probe: bad txid, nonce or key length")
    pt = bytes((PROBE, _direction(sender, receiver), flags)) + txid + counter.to_bytes(8, "big")
    sealed = box.encrypt(pt.ljust(PROBE_PLAINTEXT_LEN, b"\0"), nonce).ciphertext
    return bytes((PROBE, 0, 0, 0)) + sender + nonce + sealed


def encode_reply(
    box: nacl.public.Box,
    sender: bytes,
    receiver: bytes,
    txid: bytes,
    observed: Endpoint,
    nonce: bytes,
    flags: int = 0,
) -> bytes:
    """A PROBE_REPLY carrying the address the probe came from."""
    ip = ipaddress.ip_address(observed[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    pt = (
        bytes((PROBE_REPLY, _direction(sender, receiver), flags))
        + txid
        + bytes((ip.version,))
        + observed[1].to_bytes(2, "big")
        + ip.packed
    )
    sealed = box.encrypt(pt, nonce).ciphertext
    return bytes((PROBE_REPLY, 0, 0, 0)) + sender + nonce + sealed


def peek(frame: bytes) -> tuple[int, bytes]:
    """(type, sender public key) of a probe or reply, unauthenticated; raises ``NatError`` if malformed."""
    if len(frame) < HEADER_LEN + _MAC_LEN or frame[0] not in (PROBE, PROBE_REPLY) or frame[1:4] != b"\0\0\0":
        raise NatError("malformed", f"{len(frame)}-byte datagram is no probe")
    return frame[0], bytes(frame[4 : 4 + KEY_LEN])


def _open(box: nacl.public.Box, frame: bytes, kind: int, sender: bytes, receiver: bytes) -> bytes:
    nonce = bytes(frame[4 + KEY_LEN : HEADER_LEN])
    try:
        pt = box.decrypt(bytes(frame[HEADER_LEN:]), nonce)
    except nacl.exceptions.CryptoError:
        raise NatError("auth_failed", "probe did not authenticate") from None
    if len(pt) < 3 or pt[0] != kind or frame[0] != kind:
        raise NatError("auth_failed", "authenticated type does not match the header")
    if pt[1] != _direction(sender, receiver):
        raise NatError("reflected", "our own datagram came back")
    return pt


def open_probe(box: nacl.public.Box, frame: bytes, sender: bytes, receiver: bytes) -> Probe:
    """Authenticate and parse a PROBE from ``sender`` (the key ``peek`` returned) to us (``receiver``)."""
    pt = _open(box, frame, PROBE, sender, receiver)
    if len(pt) != PROBE_PLAINTEXT_LEN:
        raise NatError("malformed", f"probe plaintext of {len(pt)} bytes")
    return Probe(pt[3 : 3 + TXID_LEN], int.from_bytes(pt[3 + TXID_LEN : 11 + TXID_LEN], "big"), pt[2])


def open_reply(box: nacl.public.Box, frame: bytes, sender: bytes, receiver: bytes) -> ProbeReply:
    pt = _open(box, frame, PROBE_REPLY, sender, receiver)
    if len(pt) < _REPLY_MIN:
        raise NatError("malformed", f"reply plaintext of {len(pt)} bytes")
    off = 3 + TXID_LEN
    family, port, raw = pt[off], int.from_bytes(pt[off + 1 : off + 3], "big"), pt[off + 3 :]
    if (family, len(raw)) not in ((4, 4), (6, 16)):
        raise NatError("malformed", f"reply address family {family} with {len(raw)} bytes")
    return ProbeReply(pt[3:off], (str(ipaddress.ip_address(raw)), port), pt[2])


class ReplayWindow:
    """Probe counters seen from one peer: a counter is accepted once, and only within ``span`` of the
    highest accepted (counters are the sender's nanosecond clock)."""

    def __init__(self, span: int = 30 * 10**9) -> None:
        self.span = span
        self.highest = 0
        self._seen: set[int] = set()

    def accept(self, counter: int) -> bool:
        if counter <= self.highest - self.span or counter in self._seen:
            return False
        self._seen.add(counter)
        if counter > self.highest:
            self.highest = counter
            if len(self._seen) > 4096:
                floor = self.highest - self.span
                self._seen = {c for c in self._seen if c > floor}
        return True


# -- path state (pure) ---------------------------------------------------------------------------------------


class PathKind(enum.StrEnum):
    NONE = "none"
    DIRECT = "direct"
    RELAY_UDP = "relay-udp"
    RELAY_WS = "relay-ws"


_PROTO_PATH: Final = {
    PathKind.NONE: common_pb2.PATH_TYPE_NONE,
    PathKind.DIRECT: common_pb2.PATH_TYPE_DIRECT,
    PathKind.RELAY_UDP: common_pb2.PATH_TYPE_RELAY_UDP,
    PathKind.RELAY_WS: common_pb2.PATH_TYPE_RELAY_WS,
}
RELAY_TRANSPORTS: Final = {PathKind.RELAY_UDP: "udp", PathKind.RELAY_WS: "ws"}


class PathState(enum.StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class NatTiming:
    """Every interval and threshold of probing and selection, in seconds (docs/nat-traversal.md)."""

    active_interval: float = 0.2  # the path in use
    suspect_interval: float = 0.05  # the path in use, for suspect_hold after a lost probe
    suspect_hold: float = 2.0
    standby_interval: float = 2.0  # working paths not in use, and relay paths
    burst_interval: float = 0.2
    burst_duration: float = 5.0
    # A probe unanswered for timeout_rtts x the path's smoothed RTT, clamped to [min, max], is lost.
    probe_timeout_min: float = 0.5
    probe_timeout: float = 2.0  # also the timeout before a path's first reply
    timeout_rtts: float = 3.0
    window: float = 3.0  # the loss ratio shown (and the up_loss check) covers probes sent this recently
    # Loss detection is a CUSUM test of "loss_bad" against "loss_good" on every resolved probe: each loss
    # adds ln(bad/good), each reply subtracts ln((1-good)/(1-bad)); the path is dead at cusum_limit.
    loss_good: float = 0.05
    loss_bad: float = 0.3
    cusum_limit: float = 8.0
    silence: float = 2.0  # no reply this long (and probes lost) kills a path
    up_streak: int = 3  # consecutive replies before a direct path is used
    up_loss: float = 0.2
    switch_ratio: float = 0.7  # another direct path must have RTT below this share of the current one
    retry_initial: float = 30.0
    retry_max: float = 120.0
    punch_cooldown: float = 10.0  # a FLAG_PUNCH starts a burst at most this often
    rtt_alpha: float = 0.2  # EWMA weight of a new RTT sample
    tick: float = 0.05  # how often the shell evaluates (bounds every timer above from below)

    @property
    def cusum_loss(self) -> float:
        return math.log(self.loss_bad / self.loss_good)

    @property
    def cusum_reply(self) -> float:
        return math.log((1 - self.loss_good) / (1 - self.loss_bad))

    @property
    def detection_bound(self) -> float:
        """Worst case from "replies stop" to "path dead" on the path in use (a blackhole), for a path whose
        RTT is under probe_timeout_min / timeout_rtts: the losses the CUSUM needs, each known one timeout
        after it was sent, plus one tick."""
        losses = math.ceil(self.cusum_limit / self.cusum_loss)
        return min((losses - 1) * self.active_interval + self.probe_timeout_min, self.silence) + self.tick


@dataclass(slots=True)
class Path:
    """One way to reach a peer, with its probe history."""

    kind: PathKind
    endpoint: Endpoint
    learned: bool = False  # a peer-reflexive candidate (from an authenticated probe), not from the config
    state: PathState = PathState.UNKNOWN
    results: deque[list[float | None]] = field(default_factory=deque)  # [sent_at, rtt or None]
    rtt: float | None = None
    last_reply: float | None = None
    last_sent: float = float("-inf")
    streak: int = 0
    cusum: float = 0.0
    unresolved: deque[list[float | None]] = field(default_factory=deque)  # in send order, for the CUSUM
    last_loss: float = float("-inf")
    burst_until: float = float("-inf")
    retry_at: float = float("inf")
    retry_delay: float = 0.0
    reason: str = ""
    observed: Endpoint | None = None  # our address as the peer saw it on this path

    def timeout(self, t: NatTiming) -> float:
        if self.rtt is None:
            return t.probe_timeout
        return min(max(self.rtt * t.timeout_rtts, t.probe_timeout_min), t.probe_timeout)

    def loss(self, now: float, t: NatTiming) -> tuple[int, int]:
        """(lost, resolved) probes over the window: a probe is resolved once answered or expired."""
        lost = resolved = 0
        floor = now - t.window
        timeout = self.timeout(t)
        for sent_at, rtt in self.results:
            assert sent_at is not None
            if sent_at < floor:
                continue
            if rtt is not None:
                resolved += 1
            elif now - sent_at >= timeout:
                resolved += 1
                lost += 1
        return lost, resolved

    def loss_ratio(self, now: float, t: NatTiming) -> float:
        lost, resolved = self.loss(now, t)
        return lost / resolved if resolved else 0.0

    def restart(self, now: float, timing: NatTiming) -> None:
        """A new burst: forget the old results (they described the path before it changed)."""
        self.results.clear()
        self.streak = 0
        self.cusum = 0.0
        self.unresolved.clear()
        self.burst_until = now + timing.burst_duration
        self.last_sent = float("-inf")


@dataclass(frozen=True, slots=True)
class PathInfo:
    """How a peer is reached right now (``PathManager.paths()``)."""

    path_type: PathKind
    endpoint: Endpoint | None
    rtt: float | None  # seconds, EWMA over probe round trips
    loss_ratio: float  # over the last window
    reason: str  # why not direct ("" when direct)

    @property
    def proto_path_type(self) -> int:
        """The ``tunnelmesh.v1.PathType`` value for ReportStatus."""
        return _PROTO_PATH[self.path_type]

    def to_json(self) -> dict[str, object]:
        return {
            "path_type": str(self.path_type),
            "endpoint": None if self.endpoint is None else f"{self.endpoint[0]}:{self.endpoint[1]}",
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "loss_ratio": round(self.loss_ratio, 3),
            "fallback_reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Switch:
    """A selection change the shell must apply (``endpoint`` None: no usable path; leave the data plane)."""

    old: PathKind
    new: PathKind
    endpoint: Endpoint | None
    reason: str


MAX_DIRECT: Final = 16  # direct candidates kept per peer (learned ones are evicted first)


class PeerPaths:
    """One peer's paths, probe bookkeeping and the selection among them. Pure: ``now`` comes in."""

    def __init__(self, timing: NatTiming | None = None) -> None:
        self.timing = timing or NatTiming()
        self.paths: dict[Endpoint, Path] = {}
        self.pending: dict[bytes, tuple[Path, list[float | None]]] = {}
        self.current: Path | None = None
        self.kind: PathKind = PathKind.NONE
        self.reason = "no path yet"
        # No data to or from the peer lately (the shell says): the path in use is probed like a standby one
        # until traffic resumes; a loss still switches to suspect probing.
        self.idle = False
        self.last_burst = float("-inf")

    # -- inputs ----------------------------------------------------------------------------------------------

    def set_candidates(self, now: float, endpoints: Sequence[Endpoint]) -> bool:
        """The peer's direct candidates from the config. Returns True if they changed (a burst started:
        the coordinator's "punch now")."""
        wanted = list(dict.fromkeys(endpoints))[:MAX_DIRECT]
        old = {ep for ep, p in self.paths.items() if p.kind is PathKind.DIRECT and not p.learned}
        if set(wanted) == old:
            return False
        for ep in old - set(wanted):
            self._drop(ep)
        for ep in wanted:
            p = self.paths.get(ep)
            if p is None:
                self.paths[ep] = Path(PathKind.DIRECT, ep)
            elif p.learned:
                p.learned = False
        self._trim()
        self.start_burst(now)
        return True

    def learn(self, now: float, endpoint: Endpoint) -> bool:
        """An authenticated probe arrived from ``endpoint``: a peer-reflexive candidate. True if new."""
        if endpoint in self.paths:
            return False
        self.paths[endpoint] = p = Path(PathKind.DIRECT, endpoint, learned=True)
        p.restart(now, self.timing)
        self._trim()
        return endpoint in self.paths

    def set_relay(self, now: float, kind: PathKind, endpoint: Endpoint | None) -> None:
        """The relay client's endpoint for this peer over one transport (None: not available)."""
        old = next((p for p in self.paths.values() if p.kind is kind), None)
        if old is not None and old.endpoint == endpoint:
            return
        if old is not None:
            self._drop(old.endpoint)
        if endpoint is not None:
            p = self.paths.get(endpoint)
            if p is not None:
                self._drop(endpoint)
            self.paths[endpoint] = Path(kind, endpoint)

    def start_burst(self, now: float) -> None:
        """Probe every direct path that is not up, fast, for a while; tell the peer (FLAG_PUNCH on relays)."""
        self.last_burst = now
        for p in self.paths.values():
            if p.kind is PathKind.DIRECT and p.state is not PathState.UP:
                p.restart(now, self.timing)
                p.state = PathState.UNKNOWN
                p.retry_at = float("inf")
            elif p.kind is not PathKind.DIRECT:
                p.last_sent = float("-inf")  # the punch flag goes out over the relay at once

    def on_punch(self, now: float) -> bool:
        """The peer asked us to burst back (FLAG_PUNCH). Rate-limited; True if a burst started."""
        if self.bursting(now) or now - self.last_burst < self.timing.punch_cooldown:
            return False
        if not any(p.kind is PathKind.DIRECT and p.state is not PathState.UP for p in self.paths.values()):
            return False
        self.start_burst(now)
        return True

    def bursting(self, now: float) -> bool:
        return any(p.kind is PathKind.DIRECT and now < p.burst_until for p in self.paths.values())

    # -- probes ----------------------------------------------------------------------------------------------

    def due(self, now: float) -> list[tuple[Path, int]]:
        """Paths to probe now, each with the flags for its probe. Call ``sent`` for each one sent."""
        t = self.timing
        punch = FLAG_PUNCH if self.bursting(now) else 0
        out: list[tuple[Path, int]] = []
        for p in self.paths.values():
            if p.kind is PathKind.DIRECT and p.state is PathState.DEAD and now >= p.retry_at:
                p.restart(now, t)  # a retry: a new burst on this path
                p.state = PathState.UNKNOWN
                p.retry_at = float("inf")
                self.last_burst = now
                punch = FLAG_PUNCH
            if now < p.burst_until:
                interval = t.burst_interval
            elif p is self.current:
                if now - p.last_loss < t.suspect_hold:
                    interval = t.suspect_interval
                else:
                    interval = t.standby_interval if self.idle else t.active_interval
            elif p.state is PathState.UP or p.kind is not PathKind.DIRECT:
                interval = t.standby_interval
            else:
                continue  # a dead direct path waits for its retry
            if now - p.last_sent >= interval - t.tick / 2:  # ticks are the clock's grain
                out.append((p, punch if p.kind is not PathKind.DIRECT else 0))
        return out

    def sent(self, now: float, path: Path, txid: bytes) -> None:
        entry: list[float | None] = [now, None]
        path.results.append(entry)
        path.unresolved.append(entry)
        path.last_sent = now
        self.pending[txid] = (path, entry)

    def replied(self, now: float, txid: bytes, observed: Endpoint | None = None) -> Path | None:
        """An authenticated reply for ``txid``; None if we are not waiting for it (replayed, expired or
        never sent)."""
        hit = self.pending.pop(txid, None)
        if hit is None:
            return None
        path, entry = hit
        sent_at = entry[0]
        assert sent_at is not None
        rtt = now - sent_at
        if rtt >= path.timeout(self.timing) or self.paths.get(path.endpoint) is not path:
            return None
        entry[1] = rtt
        a = self.timing.rtt_alpha
        path.rtt = rtt if path.rtt is None else (1 - a) * path.rtt + a * rtt
        path.last_reply = now
        path.streak += 1
        if observed is not None:
            path.observed = observed
        return path

    # -- evaluation ------------------------------------------------------------------------------------------

    def step(self, now: float) -> Switch | None:
        """Expire probes, judge every path, pick the best; a ``Switch`` when the choice changed."""
        t = self.timing
        for txid, (path, entry) in list(self.pending.items()):
            sent_at = entry[0]
            assert sent_at is not None
            if now - sent_at >= path.timeout(t):
                del self.pending[txid]
                path.streak = 0
        floor = now - t.window - t.probe_timeout
        for p in list(self.paths.values()):
            while p.results and (p.results[0][0] or 0.0) < floor:
                p.results.popleft()
            self._resolve(now, p)
            self._judge(now, p)
            if p.learned and p.state is PathState.DEAD:
                self._drop(p.endpoint)  # a peer-reflexive address that stopped working: an old mapping
        return self._select(now)

    def _resolve(self, now: float, p: Path) -> None:
        """Feed the CUSUM in send order: a reply that overtook an earlier probe waits for that probe's
        verdict, so early replies cannot wash out losses that are only known a timeout later."""
        t = self.timing
        timeout = p.timeout(t)
        q = p.unresolved
        while q:
            sent_at, rtt = q[0]
            if rtt is not None:
                p.cusum = max(0.0, p.cusum - t.cusum_reply)
            elif now - (sent_at or 0.0) >= timeout:
                p.cusum += t.cusum_loss
                p.last_loss = now
            else:
                break
            q.popleft()

    def _judge(self, now: float, p: Path) -> None:
        t = self.timing
        lost, resolved = p.loss(now, t)
        loss = lost / resolved if resolved else 0.0
        if p.state is PathState.UP:
            timeout = p.timeout(t)
            lost_since = sum(
                1
                for sent_at, rtt in p.results
                if rtt is None
                and (sent_at or 0.0) > (p.last_reply or 0.0)
                and now - (sent_at or 0.0) >= timeout
            )
            if p.last_reply is not None and now - p.last_reply >= t.silence and lost_since >= 2:
                self._kill(now, p, f"no reply for {now - p.last_reply:.1f}s")
            elif p.cusum >= t.cusum_limit:
                ago = "" if p.last_reply is None else f", last reply {now - p.last_reply:.1f}s ago"
                self._kill(now, p, f"lost {lost} of the last {resolved} probes{ago}")
            return
        needed = 1 if p.kind is not PathKind.DIRECT else t.up_streak
        if p.streak >= needed and loss <= t.up_loss:
            p.state = PathState.UP
            p.reason = ""
            p.retry_delay = 0.0
            p.retry_at = float("inf")
            return
        if p.kind is PathKind.DIRECT and p.state is PathState.UNKNOWN and now >= p.burst_until:
            if p.last_reply is not None and now - p.last_reply < p.timeout(t):
                return  # answering, but not yet reliably: give it until the replies stop
            why = "no reply" if p.last_reply is None else f"{loss:.0%} probe loss"
            self._kill(now, p, f"{why} within {t.burst_duration:g}s burst")
        elif p.kind is not PathKind.DIRECT and p.state is PathState.UNKNOWN and resolved >= 2 and loss >= 1.0:
            p.state = PathState.DEAD
            p.reason = "no reply"

    def _kill(self, now: float, p: Path, reason: str) -> None:
        t = self.timing
        p.state = PathState.DEAD
        p.reason = reason
        p.streak = 0
        p.cusum = 0.0
        p.unresolved.clear()
        p.burst_until = float("-inf")
        if p.kind is PathKind.DIRECT:
            p.retry_delay = t.retry_initial if not p.retry_delay else min(p.retry_delay * 2, t.retry_max)
            p.retry_at = now + p.retry_delay
        # Fresh results for the next verdict, or a relay path (probed on) would stay dead on old losses.
        p.results.clear()

    def _select(self, now: float) -> Switch | None:
        t = self.timing
        direct = [p for p in self.paths.values() if p.kind is PathKind.DIRECT]
        up = [p for p in direct if p.state is PathState.UP]
        chosen: Path | None
        reason = ""
        if up:
            best = min(up, key=lambda p: p.rtt if p.rtt is not None else float("inf"))
            cur = self.current
            if cur is not None and cur in up and cur is not best:
                better = best.rtt is not None and cur.rtt is not None and best.rtt < cur.rtt * t.switch_ratio
                best = best if better else cur
            chosen = best
        else:
            reason = self._direct_reason(now, direct)
            relays = [self._relay(k) for k in (PathKind.RELAY_UDP, PathKind.RELAY_WS)]
            ups = [r for r in relays if r is not None and r.state is PathState.UP]
            # An unverified relay only when no direct candidate is still being probed: it may not carry
            # this peer at all, and a handshake sent into it waits for WireGuard's 5 s retransmit.
            probing = any(p.state is PathState.UNKNOWN and now < p.burst_until for p in direct)
            unknown = [r for r in relays if r is not None and r.state is PathState.UNKNOWN and not probing]
            chosen = next(iter(ups or unknown), None)
            for k, r in zip((PathKind.RELAY_UDP, PathKind.RELAY_WS), relays, strict=True):
                if chosen is not None and r is chosen:
                    break
                reason += f"; {k}: " + ("unavailable" if r is None else (r.reason or "unverified"))
            if chosen is not None and chosen.state is PathState.UNKNOWN:
                reason += f"; {chosen.kind} unverified"
            if chosen is None:
                # Nothing works: leave the data plane's endpoint alone, report no path.
                self.reason = reason
                if self.kind is PathKind.NONE:
                    return None
                gone = self.kind
                self.kind = PathKind.NONE
                self.current = None
                return Switch(gone, PathKind.NONE, None, reason)
        self.reason = reason
        if chosen is self.current and chosen.kind is self.kind:
            return None
        old = self.kind
        self.current = chosen
        self.kind = chosen.kind
        return Switch(old, chosen.kind, chosen.endpoint, reason)

    def _direct_reason(self, now: float, direct: list[Path]) -> str:
        if not direct:
            return "direct: no candidates"
        probing = [p for p in direct if p.state is PathState.UNKNOWN and now < p.burst_until]
        if probing:
            last = next((p.reason for p in probing if p.reason), "")
            n = len(probing)
            return f"direct: probing {n} candidate{'s' if n > 1 else ''}" + (
                f" (last: {last})" if last else ""
            )
        dead = [p for p in direct if p.state is PathState.DEAD]
        if len(dead) == 1:
            return f"direct: {dead[0].reason}"
        if dead:
            reasons = sorted({p.reason for p in dead})
            detail = reasons[0] if len(reasons) == 1 else "; ".join(reasons[:3])
            return f"direct: {len(dead)} candidates dead ({detail})"
        return "direct: not verified yet"

    def _relay(self, kind: PathKind) -> Path | None:
        return next((p for p in self.paths.values() if p.kind is kind), None)

    def _drop(self, endpoint: Endpoint) -> None:
        p = self.paths.pop(endpoint, None)
        if p is None:
            return
        for txid in [x for x, (q, _) in self.pending.items() if q is p]:
            del self.pending[txid]
        if self.current is p:
            self.current = None  # the next step picks another and reports the switch

    def _trim(self) -> None:
        direct = [p for p in self.paths.values() if p.kind is PathKind.DIRECT]
        excess = len(direct) - MAX_DIRECT
        for p in sorted(direct, key=lambda p: (not p.learned, p.state is PathState.UP))[: max(0, excess)]:
            self._drop(p.endpoint)

    # -- reporting -------------------------------------------------------------------------------------------

    def info(self, now: float) -> PathInfo:
        p = self.current
        if p is None:
            return PathInfo(PathKind.NONE, None, None, 0.0, self.reason)
        return PathInfo(self.kind, p.endpoint, p.rtt, p.loss_ratio(now, self.timing), self.reason)


def classify_nat(host: Iterable[str], reflexive: Mapping[str, Endpoint], port: int) -> str:
    """What the reflections say about our NAT: "none" (a coordinator saw one of our own addresses and our
    port), "eim" (every coordinator saw the same mapping: endpoint-independent, punchable), "symmetric"
    (the mapping differs per destination: direct paths need the other side to be reachable), or "unknown"."""
    seen = set(reflexive.values())
    if not seen:
        return "unknown"
    if any(ep[0] in set(host) and ep[1] == port for ep in seen):
        return "none"
    if len(seen) > 1:
        return "symmetric"
    return "eim" if len(reflexive) > 1 else "unknown"


def parse_candidates(candidates: Iterable[Candidate]) -> tuple[list[Endpoint], list[str]]:
    """Direct endpoints (host, reflexive; highest priority first) and one error per unusable candidate.
    Relay candidates are skipped: relays come from our own relay client."""
    items: list[tuple[int, int, Endpoint]] = []
    errors: list[str] = []
    for i, c in enumerate(candidates):
        if c.type == common_pb2.CANDIDATE_TYPE_RELAY:
            continue
        if c.type not in (common_pb2.CANDIDATE_TYPE_HOST, common_pb2.CANDIDATE_TYPE_REFLEXIVE):
            errors.append(f"candidate {c.address!r}: unknown type {c.type}")
            continue
        try:
            host, port = split_host_port(c.address)
            ipaddress.ip_address(host)
        except ValueError as exc:
            errors.append(f"candidate {c.address!r}: {exc}")
            continue
        if not 0 < port < 65536:
            errors.append(f"candidate {c.address!r}: port out of range")
            continue
        items.append((-c.priority, i, (host, port)))
    return [ep for _, _, ep in sorted(items)], errors


def _fmt(ep: Endpoint | None) -> str:
    if ep is None:
        return "-"
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def _short(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")[:8]


# -- the asyncio shell ---------------------------------------------------------------------------------------

HOST_PRIORITY: Final = 200
REFLEXIVE_PRIORITY: Final = 100
REFLECT_INTERVAL: Final = 30.0  # re-discover the reflexive address (also keeps the mapping warm)
REFLECT_RETRY: Final = 1.0
REFLECT_TRIES: Final = 3
ADDRESS_POLL: Final = 5.0  # how often local interface addresses are checked for changes
RELAY_REFRESH: Final = 1.0  # relay availability and the data plane's endpoints are checked this often
IDLE_AFTER: Final = 10.0  # seconds without data packets before a peer's path is probed at the standby rate
RX_QUEUE: Final = 4096  # datagrams waiting for the event loop; beyond that they are dropped and counted


class RelayEndpoints(Protocol):
    """What the path manager needs of ``RelayClient`` (node/relay_client.py)."""

    def endpoint_for(self, peer_public_key: bytes, transport: str) -> tuple[str, int]: ...
    def release(self, peer_public_key: bytes) -> None: ...
    def available(self, transport: str) -> bool: ...


class _Peer:
    __slots__ = (
        "active_at",
        "box",
        "key",
        "paths",
        "raw_candidates",
        "relay_ep",
        "relay_kind",
        "replay",
        "traffic",
    )

    def __init__(self, key: bytes, box: nacl.public.Box, timing: NatTiming) -> None:
        self.key = key
        self.box = box
        self.paths = PeerPaths(timing)
        self.replay = ReplayWindow()
        self.relay_ep: Endpoint | None = None  # the relay client's virtual endpoint for this peer
        self.relay_kind: PathKind | None = None
        self.raw_candidates: tuple[tuple[int, str], ...] = ()
        self.traffic = (-1, -1)  # the data plane's (rx, tx) packet counts at the last look
        self.active_at = 0.0


class PathManager:
    """Finds, measures and chooses the path to every peer, and points the data plane at it.

    ``dataplane`` must be started; ``private_key`` is its static X25519 key; ``relay_client`` (optional) gives
    the relay fallbacks. ``host_addresses`` overrides how local IPv4 addresses are listed (default: netlink
    in the data plane's namespace). ``on_candidates`` is called (in the loop) when ``local_candidates()``
    changed, so the agent can report them.
    """

    def __init__(
        self,
        dataplane: DataPlane,
        private_key: bytes,
        relay_client: RelayEndpoints | None = None,
        *,
        timing: NatTiming | None = None,
        registry: CollectorRegistry | None = None,
        host_addresses: Callable[[], list[str]] | None = None,
        on_candidates: Callable[[list[Candidate]], None] | None = None,
        reflect_interval: float = REFLECT_INTERVAL,
    ) -> None:
        self.dataplane = dataplane
        self._private = nacl.public.PrivateKey(private_key)
        self.public_key = bytes(self._private.public_key)
        self.relay_client = relay_client
        self.timing = timing or NatTiming()
        self._registry = registry
        self._host_addresses = host_addresses
        self._on_candidates = on_candidates
        self._reflect_interval = reflect_interval
        self._peers: dict[bytes, _Peer] = {}
        self._coordinators: dict[str, Endpoint] = {}
        self._reflexive: dict[str, Endpoint] = {}
        self._reflected_at: dict[str, float] = {}
        self._reflect_failing: set[str] = set()
        self._reflect_pending: dict[bytes, tuple[str, float]] = {}
        self._hosts: list[str] = []
        self._candidates: list[Candidate] = []
        self._counter = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._enqueued = 0  # written by the rx thread only
        self._processed = 0  # written by the event loop only
        self.rx_queue_drops = 0
        self._rediscover = asyncio.Event()
        self._collector: _NatCollector | None = None
        # Plain counters, read by the Prometheus collector at scrape time.
        self.probes_sent: dict[str, int] = {}
        self.probes_received: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.rejected: dict[str, int] = {}  # config input (peers, candidates) refused
        self.switches: dict[tuple[str, str], int] = {}
        self.reflections: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._rediscover = asyncio.Event()
        self.dataplane.set_raw_handler(self._from_rx_thread)
        if self._registry is not None:
            self._collector = _NatCollector(self)
            self._registry.register(self._collector)
        await self._refresh_hosts()
        self._tasks = [
            asyncio.create_task(self._tick_loop(), name="nat-tick"),
            asyncio.create_task(self._discovery_loop(), name="nat-discovery"),
        ]
        for t in self._tasks:
            t.add_done_callback(self._task_done)
        log.info(
            "event=nat_started public_key=%s port=%d hosts=%s",
            _short(self.public_key),
            self.dataplane.listen_port,
            ",".join(self._hosts) or "-",
        )

    @staticmethod
    def _task_done(task: asyncio.Task[None]) -> None:
        # stop() awaits the tasks; this only makes a crash visible the moment it happens.
        if not task.cancelled() and task.exception() is not None:
            log.error("event=nat_task_failed task=%s error=%r", task.get_name(), task.exception())

    async def stop(self) -> None:
        self.dataplane.set_raw_handler(None)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # a crash was logged when it happened
        self._tasks = []
        if self._collector is not None and self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)
            self._collector = None
        for key in list(self._peers):
            self._release(key)
        self._peers.clear()
        log.info("event=nat_stopped")

    async def __aenter__(self) -> PathManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- inputs ----------------------------------------------------------------------------------------------

    def set_coordinators(self, coordinators: Iterable[CoordinatorInfo]) -> None:
        """Coordinators whose reflectors to ask (``relay_udp_address``); reflection re-runs on a change."""
        found: dict[str, Endpoint] = {}
        for c in coordinators:
            if not c.relay_udp_address:
                continue
            try:
                host, port = split_host_port(c.relay_udp_address)
                if not port:
                    raise ValueError("port 0")
            except ValueError as exc:
                log.warning(
                    "event=nat_bad_coordinator coordinator=%s address=%r error=%r",
                    c.id,
                    c.relay_udp_address,
                    str(exc),
                )
                continue
            found[c.id or c.relay_udp_address] = (host, port)
        if found != self._coordinators:
            self._coordinators = found
            self._reflexive = {k: v for k, v in self._reflexive.items() if k in found}
            self._rediscover.set()

    def set_peers(self, peers: Mapping[bytes, Sequence[Candidate]]) -> None:
        """The peers to manage and their candidates (from the config stream). A peer whose direct candidates
        changed is punched at once; peers left out are forgotten."""
        now = time.monotonic()
        for key in [k for k in self._peers if k not in peers]:
            self._release(key)
            del self._peers[key]
        for key, cands in peers.items():
            key = bytes(key)
            if len(key) != KEY_LEN or key == self.public_key:
                self._count(self.rejected, "bad_peer")
                log.warning("event=nat_peer_skipped peer=%r reason=%r", key[:8].hex(), "bad or own key")
                continue
            peer = self._peers.get(key)
            if peer is None:
                box = nacl.public.Box(self._private, nacl.public.PublicKey(key))
                peer = self._peers[key] = _Peer(key, box, self.timing)
            endpoints, errors = parse_candidates(cands)
            raw = tuple((c.type, c.address) for c in cands)
            if raw != peer.raw_candidates:
                # Once per change: the agent hands over the whole peer list on every config delta.
                peer.raw_candidates = raw
                for e in errors:
                    self._count(self.rejected, "bad_candidate")
                    log.warning("event=nat_bad_candidate peer=%s error=%r", _short(key), e)
            if peer.paths.set_candidates(now, endpoints):
                log.info(
                    "event=nat_punch peer=%s candidates=%s",
                    _short(key),
                    ",".join(_fmt(ep) for ep in endpoints) or "-",
                )
            self._refresh_relays(now, peer)

    # -- outputs ---------------------------------------------------------------------------------------------

    def local_candidates(self) -> list[Candidate]:
        """Host and reflexive candidates, highest priority first (what the agent reports)."""
        return [Candidate(type=c.type, address=c.address, priority=c.priority) for c in self._candidates]

    def paths(self) -> dict[bytes, PathInfo]:
        now = time.monotonic()
        return {k: p.paths.info(now) for k, p in self._peers.items()}

    def nat_type(self) -> str:
        return classify_nat(self._hosts, self._reflexive, self.dataplane.listen_port)

    def status(self) -> dict[str, object]:
        """JSON-ready: local candidates, NAT type, every peer's path (``tunnelmesh status`` shows these)."""
        return {
            "nat_type": self.nat_type(),
            "candidates": [
                {"type": common_pb2.CandidateType.Name(c.type), "address": c.address}
                for c in self._candidates
            ],
            "peers": {_short(k): v.to_json() for k, v in self.paths().items()},
        }

    # -- the loop --------------------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        last_refresh = 0.0
        while True:
            now = time.monotonic()
            refresh = now - last_refresh >= RELAY_REFRESH
            current = self._dataplane_endpoints(now) if refresh else {}
            for peer in list(self._peers.values()):
                try:
                    if refresh:
                        self._refresh_relays(now, peer)
                    for path, flags in peer.paths.due(now):
                        self._send_probe(now, peer, path, flags)
                    sw = peer.paths.step(now)
                    if sw is not None:
                        self._apply(peer, sw)
                    elif refresh:
                        self._reassert(peer, current)
                except Exception:  # one peer's trouble must not stop path selection for the others
                    log.exception("event=nat_peer_failed peer=%s", _short(peer.key))
            if refresh:
                last_refresh = now
            await asyncio.sleep(self.timing.tick)

    def _send_probe(self, now: float, peer: _Peer, path: Path, flags: int) -> None:
        txid = os.urandom(TXID_LEN)
        self._counter = max(self._counter + 1, time.time_ns())
        frame = encode_probe(
            peer.box, self.public_key, peer.key, txid, self._counter, flags, os.urandom(NONCE_LEN)
        )
        peer.paths.sent(now, path, txid)  # counted as lost if the send fails
        if self._send(path.endpoint, frame):
            self._count(self.probes_sent, str(path.kind))

    def _send(self, endpoint: Endpoint, frame: bytes) -> bool:
        try:
            self.dataplane.send_raw(endpoint, frame)
        except DataplaneError as exc:
            log.debug("event=nat_send_failed endpoint=%s error=%r", _fmt(endpoint), str(exc))
            return False
        return True

    def _apply(self, peer: _Peer, sw: Switch) -> None:
        self._count(self.switches, (str(sw.old), str(sw.new)))
        level = logging.INFO if sw.new is PathKind.DIRECT else logging.WARNING
        log.log(
            level,
            "event=nat_path_switch peer=%s from=%s to=%s endpoint=%s reason=%r",
            _short(peer.key),
            sw.old,
            sw.new,
            _fmt(sw.endpoint),
            sw.reason,
        )
        if sw.endpoint is not None:
            self._set_endpoint(peer, sw.endpoint)

    def _set_endpoint(self, peer: _Peer, endpoint: Endpoint) -> None:
        try:
            self.dataplane.update_peer(peer.key, endpoint=endpoint)
        except DataplaneError as exc:
            # Not in the data plane (yet): the next refresh re-asserts the choice.
            log.debug("event=nat_endpoint_failed peer=%s error=%r", _short(peer.key), str(exc))

    def _dataplane_endpoints(self, now: float) -> dict[bytes, Endpoint | None]:
        """The data plane's current endpoints; also marks peers without recent traffic idle."""
        out: dict[bytes, Endpoint | None] = {}
        for st in self.dataplane.peers():
            out[st.public_key] = st.endpoint
            peer = self._peers.get(st.public_key)
            if peer is None:
                continue
            counters = (st.rx_packets, st.tx_packets)
            if counters != peer.traffic:
                peer.traffic = counters
                peer.active_at = now
            peer.paths.idle = now - peer.active_at > IDLE_AFTER
        return out

    def _reassert(self, peer: _Peer, current: Mapping[bytes, Endpoint | None]) -> None:
        """WireGuard roams to wherever the last authenticated packet came from (e.g. the peer's relay while
        we chose direct); put the data plane back on our choice."""
        chosen = peer.paths.current
        if chosen is None or peer.key not in current or current[peer.key] == chosen.endpoint:
            return
        log.debug(
            "event=nat_reassert peer=%s roamed_to=%s chosen=%s",
            _short(peer.key),
            _fmt(current[peer.key]),
            _fmt(chosen.endpoint),
        )
        self._set_endpoint(peer, chosen.endpoint)

    def _refresh_relays(self, now: float, peer: _Peer) -> None:
        """The relay path: the relay client's one virtual endpoint per peer, on UDP while some coordinator
        acknowledges our UDP hello, else on WebSocket (the client switches the endpoint's transport)."""
        rc = self.relay_client
        kind: PathKind | None = None
        if rc is not None:
            try:
                kind = next((k for k, tr in RELAY_TRANSPORTS.items() if rc.available(tr)), None)
                if kind is not None and (kind is not peer.relay_kind or peer.relay_ep is None):
                    host, port = rc.endpoint_for(peer.key, RELAY_TRANSPORTS[kind])
                    peer.relay_ep = (str(host), int(port))
            except Exception as exc:  # a relay client problem must not stop path selection
                log.warning("event=nat_relay_error peer=%s error=%r", _short(peer.key), str(exc))
                kind = None
        if kind is not peer.relay_kind:
            log.info("event=nat_relay peer=%s path=%s", _short(peer.key), kind or "unavailable")
        peer.relay_kind = kind
        for k in RELAY_TRANSPORTS:
            if k is not kind:
                peer.paths.set_relay(now, k, None)
        if kind is not None:
            peer.paths.set_relay(now, kind, peer.relay_ep)

    def _release(self, key: bytes) -> None:
        if self.relay_client is not None:
            try:
                self.relay_client.release(key)
            except Exception as exc:
                log.debug("event=nat_relay_release_failed peer=%s error=%r", _short(key), str(exc))

    # -- receive ---------------------------------------------------------------------------------------------

    def _from_rx_thread(self, data: bytes, addr: Endpoint) -> None:
        """Runs on the data plane's rx thread: only enqueue."""
        loop = self._loop
        if loop is None or self._enqueued - self._processed >= RX_QUEUE:
            self.rx_queue_drops += 1
            return
        self._enqueued += 1
        # Stamped here: an RTT must not include the time the event loop took to get to it.
        loop.call_soon_threadsafe(self._received, data, addr, time.monotonic())

    def _received(self, data: bytes, addr: Endpoint, at: float) -> None:
        self._processed += 1
        src: Endpoint = (str(addr[0]), int(addr[1]))  # plain (host, port): UdpSocket unmaps IPv4 sources
        kind = data[0] if data else 0
        try:
            if kind == relay_wire.REFLECT_RESPONSE:
                self._on_reflection(data)
            elif kind in (PROBE, PROBE_REPLY):
                self._on_probe(data, src, at)
            else:
                raise NatError("unexpected_type", f"type 0x{kind:02x}")
        except (NatError, ProtocolError) as exc:
            reason = exc.reason if isinstance(exc, NatError) else "malformed"
            self._count(self.dropped, reason)
            log.debug("event=nat_dropped source=%s reason=%s detail=%r", _fmt(src), reason, str(exc))

    def _on_probe(self, data: bytes, src: Endpoint, now: float) -> None:
        kind, sender = peek(data)
        peer = self._peers.get(sender)
        if peer is None:
            raise NatError("unknown_peer", f"from {_fmt(src)}")
        if kind == PROBE:
            probe = open_probe(peer.box, data, sender, self.public_key)
            if not peer.replay.accept(probe.counter):
                raise NatError("replay", f"probe counter {probe.counter} from {_short(sender)}")
            self._count(self.probes_received, "probe")
            reply = encode_reply(peer.box, self.public_key, sender, probe.txid, src, os.urandom(NONCE_LEN))
            self._send(src, reply)
            direct = not self._is_relay(peer, src) and not ipaddress.ip_address(src[0]).is_loopback
            if direct and peer.paths.learn(now, src):
                log.info("event=nat_learned_candidate peer=%s endpoint=%s", _short(sender), _fmt(src))
            if probe.flags & FLAG_PUNCH and peer.paths.on_punch(now):
                log.info("event=nat_punch peer=%s reason=%r", _short(sender), "peer asked (retry)")
        else:
            reply_msg = open_reply(peer.box, data, sender, self.public_key)
            path = peer.paths.replied(now, reply_msg.txid, reply_msg.observed)
            if path is None:
                raise NatError("replay", "reply for no outstanding probe (replayed or expired)")
            self._count(self.probes_received, "reply")

    @staticmethod
    def _is_relay(peer: _Peer, src: Endpoint) -> bool:
        return src == peer.relay_ep

    # -- reflection and local candidates ---------------------------------------------------------------------

    async def _discovery_loop(self) -> None:
        last_hosts = 0.0
        while True:
            self._rediscover.clear()
            await self._reflect_all()
            deadline = time.monotonic() + self._reflect_interval
            while time.monotonic() < deadline and not self._rediscover.is_set():
                if time.monotonic() - last_hosts >= ADDRESS_POLL:
                    last_hosts = time.monotonic()
                    if await self._refresh_hosts():
                        break  # addresses changed: the NAT mapping may have too
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(ADDRESS_POLL, max(0.0, deadline - time.monotonic()))):
                        await self._rediscover.wait()

    async def _reflect_all(self) -> None:
        coords = dict(self._coordinators)
        if not coords:
            self._update_candidates()
            return
        answered: set[str] = set()
        for _ in range(REFLECT_TRIES):
            now = time.monotonic()
            for cid, ep in coords.items():
                if cid in answered:
                    continue
                txid = os.urandom(relay_wire.TXID_LEN)
                self._reflect_pending[txid] = (cid, now)
                if self._send(ep, relay_wire.encode_reflect_request(txid)):
                    self._count(self.reflections, "sent")
            await asyncio.sleep(REFLECT_RETRY)
            answered = {cid for cid in coords if cid in self._reflexive and self._fresh(cid, now)}
            if len(answered) == len(coords):
                break
        cutoff = time.monotonic() - REFLECT_RETRY * REFLECT_TRIES
        self._reflect_pending = {t: v for t, v in self._reflect_pending.items() if v[1] > cutoff}
        for cid in coords:
            if cid not in answered:
                self._count(self.reflections, "timeout")
                # Warn once per outage (a UDP-blocked network would otherwise warn every 30 s).
                level = logging.DEBUG if cid in self._reflect_failing else logging.WARNING
                self._reflect_failing.add(cid)
                log.log(level, "event=nat_reflect_timeout coordinator=%s address=%s", cid, _fmt(coords[cid]))
            elif cid in self._reflect_failing:
                self._reflect_failing.discard(cid)
                log.info("event=nat_reflect_recovered coordinator=%s", cid)
        self._update_candidates()

    def _fresh(self, cid: str, since: float) -> bool:
        return self._reflected_at.get(cid, 0.0) >= since

    def _on_reflection(self, data: bytes) -> None:
        txid, observed = relay_wire.decode_reflect_response(data)
        hit = self._reflect_pending.pop(bytes(txid), None)
        if hit is None:
            raise NatError("unknown_txid", "reflect response for no request")
        cid, _ = hit
        self._count(self.reflections, "answered")
        if self._reflexive.get(cid) != observed:
            log.info("event=nat_reflexive coordinator=%s address=%s", cid, _fmt(observed))
        self._reflexive[cid] = observed
        self._reflected_at[cid] = time.monotonic()
        self._update_candidates()

    async def _refresh_hosts(self) -> bool:
        try:
            if self._host_addresses is not None:
                hosts = self._host_addresses()
            else:
                hosts = await asyncio.to_thread(self.dataplane.in_netns, self._netlink_addresses)
        except Exception as exc:  # netlink trouble: keep the last list
            log.warning("event=nat_addresses_failed error=%r", str(exc))
            return False
        hosts = sorted(set(hosts))
        if hosts == self._hosts:
            return False
        if self._hosts:
            log.info("event=nat_addresses_changed old=%s new=%s", ",".join(self._hosts), ",".join(hosts))
        self._hosts = hosts
        self._update_candidates()
        return True

    def _netlink_addresses(self) -> list[str]:
        """IPv4 addresses of this namespace's interfaces, minus loopback, link-local and the tunnel's own."""
        from pyroute2 import IPRoute

        skip = {ipaddress.ip_interface(a).ip for a in self.dataplane.config.addresses}
        out: list[str] = []
        with IPRoute() as ipr:
            for msg in ipr.get_addr(family=socket.AF_INET):
                ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                if msg.get_attr("IFA_LABEL") == self.dataplane.name or ip in skip:
                    continue
                if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                    continue
                out.append(str(ip))
        return out

    def _update_candidates(self) -> None:
        port = self.dataplane.listen_port
        cands = [
            Candidate(type=common_pb2.CANDIDATE_TYPE_HOST, address=f"{h}:{port}", priority=HOST_PRIORITY)
            for h in self._hosts
        ]
        seen = {c.address for c in cands}
        for ep in sorted(set(self._reflexive.values())):
            addr = _fmt(ep)
            if addr not in seen:
                seen.add(addr)
                cands.append(
                    Candidate(
                        type=common_pb2.CANDIDATE_TYPE_REFLEXIVE, address=addr, priority=REFLEXIVE_PRIORITY
                    )
                )
        if [c.SerializeToString() for c in cands] != [c.SerializeToString() for c in self._candidates]:
            self._candidates = cands
            log.info(
                "event=nat_candidates candidates=%s nat=%s",
                ",".join(c.address for c in cands),
                self.nat_type(),
            )
            if self._on_candidates is not None:
                self._on_candidates(self.local_candidates())

    @staticmethod
    def _count(table: dict[_K, int], key: _K) -> None:
        table[key] = table.get(key, 0) + 1


class _NatCollector(Collector):
    """Prometheus view of one path manager, computed at scrape time."""

    def __init__(self, pm: PathManager) -> None:
        self.pm = pm

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        pm = self.pm
        paths = [(base64.b64encode(key).decode("ascii"), info) for key, info in pm.paths().items()]
        yield gauge_family(
            "tunnelmesh_nat_peer_path",
            "1 for the path type in use to a peer",
            ["peer", "path"],
            [
                ((peer, str(kind)), 1.0 if info.path_type is kind else 0.0)
                for peer, info in paths
                for kind in PathKind
            ],
        )
        yield gauge_family(
            "tunnelmesh_nat_peer_rtt_seconds",
            "Smoothed probe RTT over the path in use",
            ["peer"],
            [((peer,), info.rtt) for peer, info in paths if info.rtt is not None],
        )
        yield gauge_family(
            "tunnelmesh_nat_peer_loss_ratio",
            "Probe loss over the last window on the path in use",
            ["peer"],
            [((peer,), info.loss_ratio) for peer, info in paths],
        )
        yield counter_family(
            "tunnelmesh_nat_probes_sent", "Probes sent, by path type", ["path"], by_label(pm.probes_sent)
        )
        yield counter_family(
            "tunnelmesh_nat_probes_received",
            "Authenticated probes and replies received",
            ["kind"],
            by_label(pm.probes_received),
        )
        queue_full = [(("queue_full",), pm.rx_queue_drops)] if pm.rx_queue_drops else []
        yield counter_family(
            "tunnelmesh_nat_probes_dropped",
            "Probe and reflection datagrams dropped, by reason",
            ["reason"],
            [*by_label(pm.dropped), *queue_full],
        )
        yield counter_family(
            "tunnelmesh_nat_path_switches",
            "Path changes, by old and new path type",
            ["from", "to"],
            [((a, b), n) for (a, b), n in sorted(pm.switches.items())],
        )
        yield counter_family(
            "tunnelmesh_nat_reflections",
            "Reflection requests sent, answered, timed out",
            ["result"],
            by_label(pm.reflections),
        )
        yield counter_family(
            "tunnelmesh_nat_config_rejected",
            "Peers and candidates from the config refused",
            ["reason"],
            by_label(pm.rejected),
        )
        t = pm.nat_type()
        yield gauge_family(
            "tunnelmesh_nat_type",
            "1 for the NAT type the reflections show",
            ["type"],
            [((name,), 1.0 if t == name else 0.0) for name in ("none", "eim", "symmetric", "unknown")],
        )
