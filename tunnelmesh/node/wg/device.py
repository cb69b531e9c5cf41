"""The sans-I/O WireGuard device: datagrams, IP packets and ``now`` in; actions out.

The I/O shell owns the UDP socket, the TUN device and the clock, and calls:

* :meth:`Device.receive` with every UDP datagram (``now``, source address, bytes);
* :meth:`Device.send` / :meth:`Device.send_many` with IP packets read from TUN, after picking the peer with
  :meth:`Device.route` (cryptokey routing by destination address);
* :meth:`Device.tick` whenever :meth:`Device.next_deadline` is reached (or simply every ~100 ms);

and carries out the returned actions (``SendDatagram``, ``DeliverPacket``) and logs or counts the events
(``Drop``, ``EndpointChanged``, ``HandshakeCompleted``, ``KeysZeroed``, ``HandshakeGaveUp``). Per-packet work
is a dict lookup and one :class:`~.keypair.Keypair` call; a batching shell may call ``Keypair.encrypt`` /
``Keypair.decrypt`` itself for the bulk and hand the device one packet per batch for the bookkeeping.

Set :attr:`Device.under_load` when the shell's handshake queue backs up: handshake messages without a valid
mac2 are then answered with cookie replies and cost no Diffie-Hellman.

Nothing here reads a clock or the OS RNG: randomness comes from the ``rng`` passed in (use
``random.SystemRandom()`` in production: it makes keys, indexes and cookie secrets), timer jitter from
``jitter_rng`` (defaults to ``rng``; needs no secrecy, so production passes a plain ``random.Random()`` and
saves a ``getrandom`` syscall per data packet sent after a reply) and TAI64N timestamps from ``timestamp``
(wall clock in production, ``lambda: TAI64N(time.time())``).
"""

from __future__ import annotations

import enum
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from cryptography.exceptions import InvalidTag

from tunnelmesh.errors import ProtocolError

from .actions import (
    Action,
    DeliverPacket,
    Drop,
    DropReason,
    Endpoint,
    EndpointChanged,
    HandshakeCompleted,
    HandshakeGaveUp,
    HandshakeRejected,
    KeysZeroed,
    SendDatagram,
)
from .allowed_ips import AllowedIPs, Network
from .constants import (
    KEEPALIVE_TIMEOUT,
    KEY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_RESPONSE_TYPE,
    MESSAGE_TRANSPORT_MIN_SIZE,
    MESSAGE_TRANSPORT_TYPE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
)
from .cookie import CookieChecker
from .crypto import clamp_private_key
from .index_table import IndexTable
from .keypair import Keypair, KeypairExhausted, ReplayedCounter
from .messages import MessageCookieReply, MessageInitiation, MessageResponse, parse
from .noise import (
    Handshake,
    StaticIdentity,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_keys,
)
from .peer import Peer
from .ratelimiter import RateLimiter
from .timers import TimerAction

_HEAD: Final = struct.Struct("<II")  # type, receiver (transport) — read without building a message object
_U16: Final = struct.Struct(">H")
# wireguard-go: the last-minute rehandshake of an initiator that keeps receiving on an ageing session.
_REKEY_ON_RECEIVE_AGE: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT


class _Unchanged(enum.Enum):
    UNCHANGED = "unchanged"


UNCHANGED: Final = _Unchanged.UNCHANGED  # "leave this setting as it is" in Device.update_peer


class Device:
    """One WireGuard interface: our static key, the peers, and the tables shared between them."""

    def __init__(
        self,
        private_key: bytes,
        *,
        rng: random.Random,
        timestamp: Callable[[], bytes],
        mtu: int = 1420,
        jitter_rng: random.Random | None = None,
    ) -> None:
        self.identity = StaticIdentity.from_private_key(private_key)
        self.rng = rng
        self.jitter_rng = rng if jitter_rng is None else jitter_rng
        self.timestamp = timestamp
        self.mtu = mtu
        self.under_load = False
        self.peers: dict[bytes, Peer] = {}
        self.index_table = IndexTable(rng)
        self.allowed_ips = AllowedIPs()
        self.cookie_checker = CookieChecker(self.identity.public_key)
        self.rate_limiter = RateLimiter()
        # Drop counters by reason: plain ints for the shell's Prometheus exporter.
        self.drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    # -- configuration ---------------------------------------------------------------------------------------

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        endpoint: Endpoint | None = None,
        allowed_ips: Iterable[str | Network] = (),
        persistent_keepalive: float = 0.0,
    ) -> Peer:
        if len(public_key) != KEY_SIZE:
            raise ValueError(f"a WireGuard public key is {KEY_SIZE} bytes, got {len(public_key)}")
        if public_key == self.identity.public_key:
            raise ValueError("a device cannot be its own peer")
        if public_key in self.peers:
            raise ValueError(f"peer {public_key.hex()} is already configured")
        peer = Peer(
            self.identity,
            public_key,
            rng=self.jitter_rng,
            preshared_key=preshared_key,
            endpoint=endpoint,
            persistent_keepalive=persistent_keepalive,
        )
        self.peers[public_key] = peer
        for network in allowed_ips:
            self.allowed_ips.insert(network, public_key)
        peer.timers.arm_persistent_keepalive_now()
        return peer

    def update_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | _Unchanged | None = UNCHANGED,
        endpoint: Endpoint | _Unchanged = UNCHANGED,
        allowed_ips: Iterable[str | Network] | _Unchanged = UNCHANGED,
        persistent_keepalive: float | _Unchanged = UNCHANGED,
    ) -> None:
        """Apply new configuration to a peer (like ``wg set``); sessions in progress are kept."""
        peer = self.peers[public_key]
        if not isinstance(preshared_key, _Unchanged):
            replacement = Handshake.for_peer(self.identity, public_key, preshared_key)
            peer.handshake.preshared_key = replacement.preshared_key
        if not isinstance(endpoint, _Unchanged):
            peer.endpoint = endpoint
        if not isinstance(allowed_ips, _Unchanged):
            self.allowed_ips.remove_peer(public_key)
            for network in allowed_ips:
                self.allowed_ips.insert(network, public_key)
        if not isinstance(persistent_keepalive, _Unchanged):
            peer.timers.persistent_keepalive_interval = persistent_keepalive
            if persistent_keepalive <= 0:
                peer.timers.persistent_keepalive_at = None
            peer.timers.arm_persistent_keepalive_now()

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key)
        self._zero_keys(peer)
        peer.timers.stop()
        self.allowed_ips.remove_peer(public_key)

    def route(self, ip_packet: bytes) -> bytes | None:
        """The peer (public key) whose allowed IPs hold ``ip_packet``'s destination, or None."""
        try:
            return self.allowed_ips.lookup_destination(ip_packet)
        except ProtocolError:
            return None

    # -- receiving -------------------------------------------------------------------------------------------

    def receive(self, now: float, src: Endpoint, datagram: bytes) -> list[Action]:
        """Process one UDP datagram from ``src``. Never raises for bad input: failures become ``Drop``."""
        actions: list[Action] = []
        if len(datagram) < 8:
            return self._drop(actions, DropReason.MALFORMED, None, f"{len(datagram)}-byte datagram")
        kind, receiver = _HEAD.unpack_from(datagram)
        if kind == MESSAGE_TRANSPORT_TYPE:
            self._receive_transport(now, src, datagram, receiver, actions)
        elif kind in (MESSAGE_INITIATION_TYPE, MESSAGE_RESPONSE_TYPE, MESSAGE_COOKIE_REPLY_TYPE):
            self._receive_handshake(now, src, bytes(datagram), actions)
        else:
            self._drop(actions, DropReason.MALFORMED, None, f"unknown message type 0x{kind:08x}")
        return actions

    def receive_many(self, now: float, datagrams: Iterable[tuple[Endpoint, bytes]]) -> list[Action]:
        """:meth:`receive` for a batch of ``(source, datagram)`` pairs (e.g. from ``recvmmsg``/GRO)."""
        actions: list[Action] = []
        for src, datagram in datagrams:
            actions += self.receive(now, src, datagram)
        return actions

    def _receive_transport(
        self, now: float, src: Endpoint, data: bytes, receiver: int, actions: list[Action]
    ) -> None:
        if len(data) < MESSAGE_TRANSPORT_MIN_SIZE:
            self._drop(actions, DropReason.MALFORMED, None, "transport message too short")
            return
        entry = self.index_table.lookup(receiver)
        if entry is None or entry.keypair is None:
            self._drop(actions, DropReason.UNKNOWN_INDEX, None, f"receiver index {receiver:#010x}")
            return
        keypair, peer = entry.keypair, entry.peer
        if now - keypair.created > REJECT_AFTER_TIME:
            self._drop(
                actions, DropReason.KEY_EXPIRED, peer.public_key, "keypair older than REJECT_AFTER_TIME"
            )
            return
        try:
            plaintext = keypair.decrypt(data)
        except InvalidTag:
            self._drop(actions, DropReason.DECRYPT_FAILURE, peer.public_key, "transport message")
            return
        except ReplayedCounter as e:
            self._drop(actions, DropReason.REPLAY, peer.public_key, f"counter {e.args[0]}")
            return

        # Authenticated from here on. The common case (current keypair, same endpoint, IPv4 from the right
        # source) is a handful of attribute reads and one Timers call.
        if peer.endpoint != src:
            self._set_endpoint(peer, src, actions)
        if keypair is peer.keypairs.next:
            self._confirm_keypair(now, peer, keypair, actions)
        if keypair.is_initiator and now - keypair.created > _REKEY_ON_RECEIVE_AGE:
            self._keep_key_fresh_receiving(now, peer, actions)
        peer.rx_bytes += len(data)
        size = len(plaintext)
        peer.timers.on_transport_received(now, size > 0)
        if not size:
            return  # keepalive

        version = plaintext[0] >> 4
        if version == 4 and size >= 20:
            length = _U16.unpack_from(plaintext, 2)[0]
            ok = 20 <= length <= size
            sender = self.allowed_ips.lookup_v4(int.from_bytes(plaintext[12:16], "big")) if ok else None
        elif version == 6 and size >= 40:
            length = _U16.unpack_from(plaintext, 4)[0] + 40
            ok = length <= size
            sender = self.allowed_ips.lookup_v6(int.from_bytes(plaintext[8:24], "big")) if ok else None
        else:
            ok, sender = False, None
        if not ok:
            self._drop(actions, DropReason.MALFORMED, peer.public_key, "inner packet is not valid IPv4/IPv6")
        elif sender != peer.public_key:
            self._drop(
                actions, DropReason.ALLOWED_IPS, peer.public_key, "inner source not in peer's allowed IPs"
            )
        else:
            actions.append(
                DeliverPacket(peer.public_key, plaintext if length == size else plaintext[:length])
            )

    def _confirm_keypair(self, now: float, peer: Peer, keypair: Keypair, actions: list[Action]) -> None:
        """The first transport message under a responder's *next* keypair: it becomes current (§5.4.3)."""
        confirmed, dropped = peer.keypairs.received_with(keypair)
        if not confirmed:
            return
        if dropped is not None:
            self.index_table.delete(dropped.local_index)
        peer.timers.on_handshake_complete(now)
        peer.last_handshake = now
        actions.append(HandshakeCompleted(peer.public_key, initiator=False))
        self._send_staged(now, peer, actions)

    def _receive_handshake(self, now: float, src: Endpoint, data: bytes, actions: list[Action]) -> None:
        try:
            msg = parse(data)
        except ProtocolError as e:
            self._drop(actions, DropReason.MALFORMED, None, str(e))
            return
        if isinstance(msg, MessageCookieReply):
            self._receive_cookie_reply(now, msg, actions)
            return
        assert isinstance(msg, MessageInitiation | MessageResponse)
        if not self.cookie_checker.check_mac1(data):
            self._drop(actions, DropReason.BAD_MAC1, None, "")
            return
        if self.under_load and not self.cookie_checker.check_mac2(data, src, now):
            reply = self.cookie_checker.create_reply(data, msg.sender, src, now, self.rng)
            actions.append(SendDatagram(src, reply.to_bytes()))
            self._drop(actions, DropReason.COOKIE_SENT, None, "under load, no valid mac2")
            return
        if self.under_load and not self.rate_limiter.allow(now, src[0]):
            self._drop(actions, DropReason.RATE_LIMITED, None, f"handshakes from {src[0]}")
            return
        if isinstance(msg, MessageInitiation):
            self._receive_initiation(now, src, msg, actions)
        else:
            self._receive_response(now, src, msg, actions)

    def _receive_initiation(
        self, now: float, src: Endpoint, msg: MessageInitiation, actions: list[Action]
    ) -> None:
        def lookup(static: bytes) -> Handshake | None:
            peer = self.peers.get(static)
            return None if peer is None else peer.handshake

        try:
            hs = consume_initiation(self.identity, msg, now, lookup)
        except HandshakeRejected as e:
            self._drop(actions, e.reason, None, str(e))
            return
        except ProtocolError as e:
            self._drop(actions, DropReason.DECRYPT_FAILURE, None, str(e))
            return
        peer = self.peers[hs.remote_static]
        self._set_endpoint(peer, src, actions)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_received(now)
        self._send_handshake_response(now, peer, actions)

    def _receive_response(
        self, now: float, src: Endpoint, msg: MessageResponse, actions: list[Action]
    ) -> None:
        entry = self.index_table.lookup(msg.receiver)
        if entry is None or entry.keypair is not None or entry.peer.handshake.local_index != msg.receiver:
            self._drop(actions, DropReason.UNKNOWN_INDEX, None, f"response to index {msg.receiver:#010x}")
            return
        peer = entry.peer
        try:
            consume_response(self.identity, peer.handshake, msg)
        except HandshakeRejected as e:
            self._drop(actions, e.reason, peer.public_key, str(e))
            return
        except ProtocolError as e:
            self._drop(actions, DropReason.DECRYPT_FAILURE, peer.public_key, str(e))
            return
        self._set_endpoint(peer, src, actions)
        timers = peer.timers
        timers.on_any_authenticated_packet_traversal(now)
        timers.on_any_authenticated_packet_received(now)
        self._begin_session(now, peer)
        timers.on_session_derived(now)
        timers.on_handshake_complete(now)
        peer.last_handshake = now
        actions.append(HandshakeCompleted(peer.public_key, initiator=True))
        # Key confirmation for the responder: send what is waiting, or else a keepalive.
        if not peer.staged:
            peer.stage(b"")
        self._send_staged(now, peer, actions)

    def _receive_cookie_reply(self, now: float, msg: MessageCookieReply, actions: list[Action]) -> None:
        entry = self.index_table.lookup(msg.receiver)
        if entry is None:
            self._drop(actions, DropReason.UNKNOWN_INDEX, None, f"cookie reply to index {msg.receiver:#010x}")
            return
        try:
            entry.peer.cookie.consume_reply(msg, now)
        except ProtocolError as e:
            self._drop(actions, DropReason.BAD_COOKIE, entry.peer.public_key, str(e))

    # -- sending ---------------------------------------------------------------------------------------------

    def send(self, now: float, peer_key: bytes, ip_packet: bytes) -> list[Action]:
        """Encrypt ``ip_packet`` for the peer, or queue it and start a handshake if there is no session."""
        return self.send_many(now, peer_key, (ip_packet,))

    def send_many(self, now: float, peer_key: bytes, ip_packets: Sequence[bytes]) -> list[Action]:
        """:meth:`send` for a batch of packets to one peer (timers are updated once)."""
        actions: list[Action] = []
        peer = self.peers[peer_key]
        for packet in ip_packets:
            if not peer.stage(packet):
                self._drop(actions, DropReason.STAGED_OVERFLOW, peer_key, "")
        self._send_staged(now, peer, actions)
        return actions

    def send_keepalive(self, now: float, peer_key: bytes) -> list[Action]:
        actions: list[Action] = []
        self._send_keepalive(now, self.peers[peer_key], actions)
        return actions

    def initiate_handshake(self, now: float, peer_key: bytes) -> list[Action]:
        """Start a handshake now (still at most one initiation per REKEY_TIMEOUT)."""
        actions: list[Action] = []
        self._send_handshake_initiation(now, self.peers[peer_key], actions, is_retry=False)
        return actions

    def _send_keepalive(self, now: float, peer: Peer, actions: list[Action]) -> None:
        if not peer.staged:
            peer.stage(b"")
        self._send_staged(now, peer, actions)

    def _send_staged(self, now: float, peer: Peer, actions: list[Action]) -> None:
        if not peer.staged:
            return
        keypair = peer.keypairs.current
        if (
            keypair is None
            or keypair.send_counter >= REJECT_AFTER_MESSAGES
            or now - keypair.created >= REJECT_AFTER_TIME
        ):
            self._send_handshake_initiation(now, peer, actions, is_retry=False)
            return
        endpoint = peer.endpoint
        if endpoint is None:  # cannot happen once a session exists, but never send into the void
            self._drop(actions, DropReason.NO_ENDPOINT, peer.public_key, "")
            return
        sent_data = False
        staged = peer.staged
        tx = 0
        while staged:
            packet = staged[0]
            try:
                data = keypair.encrypt(packet)
            except KeypairExhausted:
                self._send_handshake_initiation(now, peer, actions, is_retry=False)
                break
            staged.popleft()
            tx += len(data)
            sent_data = sent_data or bool(packet)
            actions.append(SendDatagram(endpoint, data))
        peer.tx_bytes += tx
        peer.timers.on_transport_sent(now, sent_data)
        self._keep_key_fresh_sending(now, peer, actions)

    def _send_handshake_initiation(
        self, now: float, peer: Peer, actions: list[Action], *, is_retry: bool
    ) -> None:
        if not is_retry:
            peer.timers.handshake_attempts = 0
        hs = peer.handshake
        if hs.last_sent_handshake is not None and now - hs.last_sent_handshake < REKEY_TIMEOUT:
            return
        hs.last_sent_handshake = now
        if peer.endpoint is None:
            self._drop(actions, DropReason.NO_ENDPOINT, peer.public_key, "handshake initiation")
        else:
            if hs.local_index:
                self.index_table.delete(hs.local_index)
            index = self._new_index(peer)
            try:
                msg = create_initiation(
                    self.identity,
                    hs,
                    ephemeral_private=self._new_ephemeral(),
                    timestamp=self.timestamp(),
                    local_index=index,
                )
            except ProtocolError as e:
                self.index_table.delete(index)
                self._drop(actions, DropReason.UNKNOWN_PEER, peer.public_key, str(e))
                return
            data = peer.cookie.add_macs(msg.to_bytes(), now)
            peer.timers.on_any_authenticated_packet_traversal(now)
            peer.timers.on_any_authenticated_packet_sent(now)
            actions.append(SendDatagram(peer.endpoint, data))
            peer.tx_bytes += len(data)
        peer.timers.on_handshake_initiated(now)

    def _send_handshake_response(self, now: float, peer: Peer, actions: list[Action]) -> None:
        hs = peer.handshake
        if hs.local_index:
            self.index_table.delete(hs.local_index)
        index = self._new_index(peer)
        try:
            msg = create_response(hs, ephemeral_private=self._new_ephemeral(), local_index=index)
        except ProtocolError as e:
            self.index_table.delete(index)
            hs.zero()
            self._drop(actions, DropReason.DECRYPT_FAILURE, peer.public_key, str(e))
            return
        data = peer.cookie.add_macs(msg.to_bytes(), now)
        self._begin_session(now, peer)
        peer.timers.on_session_derived(now)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_sent(now)
        assert peer.endpoint is not None  # just set from the initiation's source
        actions.append(SendDatagram(peer.endpoint, data))
        peer.tx_bytes += len(data)

    def _begin_session(self, now: float, peer: Peer) -> None:
        hs = peer.handshake
        local_index, remote_index = hs.local_index, hs.remote_index
        send_key, receive_key, is_initiator = derive_keys(hs)
        keypair = Keypair(
            send_key,
            receive_key,
            is_initiator=is_initiator,
            created=now,
            local_index=local_index,
            remote_index=remote_index,
            mtu=self.mtu,
        )
        self.index_table.swap_index_for_keypair(local_index, keypair)
        hs.local_index = hs.remote_index = 0
        for dropped in peer.keypairs.install(keypair):
            self.index_table.delete(dropped.local_index)

    def _keep_key_fresh_sending(self, now: float, peer: Peer, actions: list[Action]) -> None:
        keypair = peer.keypairs.current
        if keypair is None:
            return
        if keypair.send_counter > REKEY_AFTER_MESSAGES or (
            keypair.is_initiator and now - keypair.created > REKEY_AFTER_TIME
        ):
            self._send_handshake_initiation(now, peer, actions, is_retry=False)

    def _keep_key_fresh_receiving(self, now: float, peer: Peer, actions: list[Action]) -> None:
        if peer.timers.sent_last_minute_handshake:
            return
        keypair = peer.keypairs.current
        if keypair is not None and keypair.is_initiator and now - keypair.created > _REKEY_ON_RECEIVE_AGE:
            peer.timers.sent_last_minute_handshake = True
            self._send_handshake_initiation(now, peer, actions, is_retry=False)

    # -- timers ----------------------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Run every peer's timers that are due at ``now``."""
        actions: list[Action] = []
        for peer in list(self.peers.values()):
            due = peer.timers.poll(now)
            for what in due:
                if what is TimerAction.RETRY_HANDSHAKE_INITIATION:
                    self._send_handshake_initiation(now, peer, actions, is_retry=True)
                elif what is TimerAction.SEND_HANDSHAKE_INITIATION:
                    self._send_handshake_initiation(now, peer, actions, is_retry=False)
                elif what is TimerAction.SEND_KEEPALIVE:
                    self._send_keepalive(now, peer, actions)
                elif what is TimerAction.GIVE_UP:
                    self._flush_staged(peer, DropReason.HANDSHAKE_GAVE_UP, actions)
                    actions.append(HandshakeGaveUp(peer.public_key))
                elif what is TimerAction.ZERO_KEYS:
                    self._zero_keys(peer)
                    self._flush_staged(peer, DropReason.KEYS_ZEROED, actions)
                    actions.append(KeysZeroed(peer.public_key))
            if due:
                peer.timers.settle(now)
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: nothing armed)."""
        deadlines = [d for p in self.peers.values() if (d := p.timers.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    # -- helpers ---------------------------------------------------------------------------------------------

    def _zero_keys(self, peer: Peer) -> None:
        for keypair in peer.keypairs.clear():
            self.index_table.delete(keypair.local_index)
        if peer.handshake.local_index:
            self.index_table.delete(peer.handshake.local_index)
        peer.handshake.zero()

    def _flush_staged(self, peer: Peer, reason: DropReason, actions: list[Action]) -> None:
        while peer.staged:
            packet = peer.staged.popleft()
            if packet:
                self._drop(actions, reason, peer.public_key, "")

    def _new_index(self, peer: Peer) -> int:
        while True:
            index = self.index_table.new_index_for_handshake(peer)
            if index:  # 0 marks "no index" in Handshake.local_index
                return index
            self.index_table.delete(index)

    def _new_ephemeral(self) -> bytes:
        return clamp_private_key(self.rng.randbytes(KEY_SIZE))

    def _set_endpoint(self, peer: Peer, src: Endpoint, actions: list[Action]) -> None:
        if peer.endpoint != src:
            actions.append(EndpointChanged(peer.public_key, peer.endpoint, src))
            peer.endpoint = src

    def _drop(
        self, actions: list[Action], reason: DropReason, peer: bytes | None, detail: str
    ) -> list[Action]:
        self.drops[reason] += 1
        actions.append(Drop(reason, peer, detail))
        return actions
