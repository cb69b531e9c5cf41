"""The per-peer timer state machine (whitepaper §6, wireguard-go ``timers.go``).

Timers are deadlines (float seconds on the caller's monotonic clock, or None when not armed). Protocol events
arm and disarm them through the ``on_*`` methods, named after wireguard-go's ``timers*`` hooks; :meth:`poll`
takes ``now`` and returns what has become due, as :class:`TimerAction` values the device carries out:

====================  ===========================================================================
retransmit handshake  REKEY_TIMEOUT (+ jitter) after an initiation with no response: send another,
                      or after MAX_TIMER_HANDSHAKES tries (REKEY_ATTEMPT_TIME) give up
send keepalive        KEEPALIVE_TIMEOUT after receiving data we had nothing to answer with
new handshake         KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (+ jitter) after sending data if nothing comes back
zero key material     3 × REJECT_AFTER_TIME after the last session was derived
persistent keepalive  the configured interval after the last authenticated packet either way
====================  ===========================================================================

Jitter comes from the injected RNG so runs are reproducible.
"""

from __future__ import annotations

import enum
import random

from .constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)


class TimerAction(enum.Enum):
    SEND_HANDSHAKE_INITIATION = "send_handshake_initiation"  # a new handshake (not a retry)
    RETRY_HANDSHAKE_INITIATION = "retry_handshake_initiation"  # retransmission after REKEY_TIMEOUT
    SEND_KEEPALIVE = "send_keepalive"
    ZERO_KEYS = "zero_keys"
    GIVE_UP = "give_up"  # flush packets waiting for a session


class Timers:
    __slots__ = (
        "handshake_attempts",
        "need_another_keepalive",
        "new_handshake_at",
        "persistent_keepalive_at",
        "persistent_keepalive_interval",
        "rearm_keepalive",
        "retransmit_handshake_at",
        "rng",
        "send_keepalive_at",
        "sent_last_minute_handshake",
        "zero_key_material_at",
    )

    def __init__(self, rng: random.Random, persistent_keepalive_interval: float = 0.0) -> None:
        self.rng = rng
        self.persistent_keepalive_interval = persistent_keepalive_interval
        self.retransmit_handshake_at: float | None = None
        self.send_keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_key_material_at: float | None = None
        self.persistent_keepalive_at: float | None = None
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.rearm_keepalive = False

    def _jitter(self) -> float:
        return self.rng.random() * REKEY_TIMEOUT_JITTER_MAX  # uniform(0, max), minus a Python frame

    # -- events (wireguard-go timers.go) ---------------------------------------------------------------------

    def on_data_sent(self, now: float) -> None:
        """An authenticated data packet was sent: expect something back within 15 s or rehandshake."""
        if self.new_handshake_at is None:
            self.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()

    def on_data_received(self, now: float) -> None:
        """An authenticated data packet arrived: answer within KEEPALIVE_TIMEOUT (a keepalive if need be)."""
        if self.send_keepalive_at is None:
            self.send_keepalive_at = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def on_any_authenticated_packet_sent(self, now: float) -> None:
        """Anything authenticated (keepalive, data, handshake) left: no passive keepalive is owed."""
        self.send_keepalive_at = None

    def on_any_authenticated_packet_received(self, now: float) -> None:
        """Anything authenticated arrived: the peer is alive, no rehandshake for lack of replies."""
        self.new_handshake_at = None

    def on_any_authenticated_packet_traversal(self, now: float) -> None:
        """Anything authenticated passed either way: restart the persistent-keepalive interval."""
        if self.persistent_keepalive_interval > 0:
            self.persistent_keepalive_at = now + self.persistent_keepalive_interval

    def on_transport_received(self, now: float, data: bool) -> None:
        """A transport message authenticated (``data``: not a keepalive): received + traversal hooks."""
        self.new_handshake_at = None
        if self.persistent_keepalive_interval > 0:
            self.persistent_keepalive_at = now + self.persistent_keepalive_interval
        if data:
            self.on_data_received(now)

    def on_transport_sent(self, now: float, data: bool) -> None:
        """Transport messages went out (``data``: not only keepalives): sent + traversal hooks."""
        self.send_keepalive_at = None
        if self.persistent_keepalive_interval > 0:
            self.persistent_keepalive_at = now + self.persistent_keepalive_interval
        if data:
            self.on_data_sent(now)

    def on_handshake_initiated(self, now: float) -> None:
        """An initiation was sent: retransmit if no response within REKEY_TIMEOUT (+ jitter)."""
        self.retransmit_handshake_at = now + REKEY_TIMEOUT + self._jitter()

    def on_handshake_complete(self, now: float) -> None:
        """A response was consumed, or the first data arrived under a responder's keypair."""
        self.retransmit_handshake_at = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def on_session_derived(self, now: float) -> None:
        """New transport keys exist: destroy everything if nothing new comes for 3 × REJECT_AFTER_TIME."""
        self.zero_key_material_at = now + REJECT_AFTER_TIME * 3

    def arm_persistent_keepalive_now(self) -> None:
        """A persistent keepalive was configured: send one at the next poll, as wireguard-go does on
        ``wg set`` (it opens the NAT mapping and, without a session, starts the handshake)."""
        if self.persistent_keepalive_interval > 0:
            self.persistent_keepalive_at = float("-inf")

    def stop(self) -> None:
        self.retransmit_handshake_at = self.send_keepalive_at = self.new_handshake_at = None
        self.zero_key_material_at = self.persistent_keepalive_at = None

    # -- expiry ----------------------------------------------------------------------------------------------

    def settle(self, now: float) -> None:
        """Call after carrying out :meth:`poll`'s actions (data received during the keepalive period)."""
        if self.rearm_keepalive:
            self.rearm_keepalive = False
            self.send_keepalive_at = now + KEEPALIVE_TIMEOUT

    def next_deadline(self) -> float | None:
        """The earliest armed deadline, for the shell to sleep until."""
        armed = [
            t
            for t in (
                self.retransmit_handshake_at,
                self.send_keepalive_at,
                self.new_handshake_at,
                self.zero_key_material_at,
                self.persistent_keepalive_at,
            )
            if t is not None
        ]
        return min(armed) if armed else None

    def poll(self, now: float) -> list[TimerAction]:
        """Disarm every timer due at ``now`` and return what to do, in wireguard-go's order."""
        actions: list[TimerAction] = []
        if self.retransmit_handshake_at is not None and now >= self.retransmit_handshake_at:
            self.retransmit_handshake_at = None
            if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
                self.send_keepalive_at = None
                actions.append(TimerAction.GIVE_UP)
                if self.zero_key_material_at is None:
                    self.zero_key_material_at = now + REJECT_AFTER_TIME * 3
            else:
                self.handshake_attempts += 1
                actions.append(TimerAction.RETRY_HANDSHAKE_INITIATION)
        if self.send_keepalive_at is not None and now >= self.send_keepalive_at:
            self.send_keepalive_at = None
            actions.append(TimerAction.SEND_KEEPALIVE)
            if self.need_another_keepalive:
                # Re-armed in settle(): sending the keepalive itself disarms send_keepalive_at.
                self.need_another_keepalive = False
                self.rearm_keepalive = True
        if self.new_handshake_at is not None and now >= self.new_handshake_at:
            self.new_handshake_at = None
            actions.append(TimerAction.SEND_HANDSHAKE_INITIATION)
        if self.zero_key_material_at is not None and now >= self.zero_key_material_at:
            self.zero_key_material_at = None
            actions.append(TimerAction.ZERO_KEYS)
        if self.persistent_keepalive_at is not None and now >= self.persistent_keepalive_at:
            self.persistent_keepalive_at = None
            if self.persistent_keepalive_interval > 0:
                actions.append(TimerAction.SEND_KEEPALIVE)
        return actions
