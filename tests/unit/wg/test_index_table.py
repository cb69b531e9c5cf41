"""Whitepaper §5.4.2: sender/receiver indexes are random 32-bit values, unique among live sessions."""

from __future__ import annotations

import random

from tunnelmesh.node.wg.index_table import IndexTable

from .harness import Net


class RiggedRandom(random.Random):
    """Returns the same 32-bit value a few times before moving on: forces collisions."""

    def __init__(self, values: list[int]) -> None:
        super().__init__(0)
        self.values = values

    def getrandbits(self, k: int) -> int:
        return self.values.pop(0) if self.values else super().getrandbits(k)


def test_5_4_2_new_indexes_never_collide_with_live_ones() -> None:
    net = Net()
    peer = net.a.peers[net.b.public_key]
    table = IndexTable(RiggedRandom([7, 7, 7, 9]))
    assert table.new_index_for_handshake(peer) == 7
    assert table.new_index_for_handshake(peer) == 9
    table.delete(7)
    assert 7 not in table and 9 in table


def test_5_4_2_indexes_come_from_the_injected_rng_and_are_handed_to_the_keypair() -> None:
    first, second = Net(seed=5), Net(seed=5)
    for net in (first, second):
        net.handshake()
    assert first.a.index_table.indexes() == second.a.index_table.indexes()  # deterministic
    keypair = first.a.peers[first.b.public_key].keypairs.current
    assert keypair is not None
    entry = first.a.index_table.lookup(keypair.local_index)
    assert entry is not None and entry.keypair is keypair
    # The responder's local index is what the initiator sends to, and vice versa.
    keypair_b = first.b.peers[first.a.public_key].keypairs.current
    assert keypair_b is not None
    assert (keypair.remote_index, keypair_b.remote_index) == (keypair_b.local_index, keypair.local_index)
