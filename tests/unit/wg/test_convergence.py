"""Whitepaper §6 ("stateless UX"): whatever the loss and reordering, the pair converges to a working session
once the network heals, and the index tables never grow beyond a handful of live entries."""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnelmesh.node.wg.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT

from .harness import A_TUNNEL, B_TUNNEL, Net, ipv4_packet

# Each example simulates minutes in milliseconds; raise this for a soak run.
EXAMPLES = int(os.environ.get("TM_WG_CONVERGENCE_EXAMPLES", "25"))


@settings(
    max_examples=int(__import__("os").environ.get("TM_WG_CONVERGENCE_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32 - 1), loss=st.floats(0.0, 0.7), minutes=st.integers(1, 8))
def test_6_pair_converges_after_arbitrary_loss_and_reordering(seed: int, loss: float, minutes: int) -> None:
    chaos = random.Random(seed)
    net = Net(seed=seed % 1000, a_keepalive=chaos.choice([0.0, 25.0]))
    net.lose = lambda direction, data: chaos.random() < loss
    sent = 0
    # Runs of seconds to minutes of simulated time with random loss, reordering and traffic both ways.
    t_end = net.now + minutes * 60
    while net.now < t_end:
        for _ in range(chaos.randrange(4)):
            net.send(net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"a%d" % sent))
            sent += 1
        for _ in range(chaos.randrange(3)):
            net.send(net.b, ipv4_packet(B_TUNNEL, A_TUNNEL))
        if chaos.random() < 0.2:
            chaos.shuffle(net.in_flight)  # reordering
        net.advance(chaos.uniform(0.1, 12.0), step=0.25)
        for dev in (net.a, net.b):
            assert len(dev.index_table) <= 4  # previous, current, next + one handshake in progress
    # The network heals: within a few REKEY_TIMEOUTs both directions work again.
    net.lose = lambda direction, data: False
    net.advance(KEEPALIVE_TIMEOUT + 3 * REKEY_TIMEOUT, step=0.1)
    for dev, packet in (
        (net.a, ipv4_packet(A_TUNNEL, B_TUNNEL, b"final")),
        (net.b, ipv4_packet(B_TUNNEL, A_TUNNEL)),
    ):
        before = len(net.delivered(net.peer_of(dev)))
        net.send(dev, packet)
        net.advance(3 * REKEY_TIMEOUT, step=0.1)
        assert net.delivered(net.peer_of(dev))[before:] == [packet] or packet in net.delivered(
            net.peer_of(dev)
        )
