"""Whitepaper §2 (cryptokey routing): allowed IPs with longest-prefix match, IPv4 and IPv6."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.errors import ProtocolError
from tunnelmesh.node.wg import allowed_ips
from tunnelmesh.node.wg.allowed_ips import AllowedIPs

from .harness import ipv4_packet, ipv6_packet

P1, P2, P3 = b"1" * 32, b"2" * 32, b"3" * 32


def test_2_longest_prefix_wins() -> None:
    table = AllowedIPs()
    table.insert("0.0.0.0/0", P1)
    table.insert("10.0.0.0/8", P2)
    table.insert("10.1.2.3/32", P3)
    assert table.lookup("10.1.2.3") == P3
    assert table.lookup("10.1.2.4") == P2
    assert table.lookup("192.168.1.1") == P1
    table.insert("::/0", P1)
    table.insert("fd00::/8", P2)
    table.insert("fd00::1/128", P3)
    assert table.lookup("fd00::1") == P3
    assert table.lookup("fd00::2") == P2
    assert table.lookup("2001:db8::1") == P1


def test_2_an_allowed_ip_belongs_to_one_peer_inserting_it_again_moves_it() -> None:
    table = AllowedIPs()
    table.insert("10.0.0.0/24", P1)
    table.insert("10.0.0.0/24", P2)
    assert table.lookup("10.0.0.9") == P2
    assert table.networks_of(P1) == []


def test_2_host_bits_are_ignored_and_removal_works() -> None:
    table = AllowedIPs()
    table.insert("10.0.0.77/24", P1)
    assert table.networks_of(P1) == [ipaddress.ip_network("10.0.0.0/24")]
    table.remove("10.0.0.0/24")
    assert table.lookup("10.0.0.1") is None
    table.insert("10.0.0.0/24", P1)
    table.insert("fd00::/64", P1)
    table.remove_peer(P1)
    assert table.lookup("10.0.0.1") is None and table.lookup("fd00::1") is None


def test_2_lookup_by_packet_destination_for_sending_and_source_for_receiving() -> None:
    table = AllowedIPs()
    table.insert("10.0.0.2/32", P2)
    table.insert("fd00::2/128", P2)
    assert table.lookup_destination(ipv4_packet("10.0.0.1", "10.0.0.2")) == P2
    assert table.lookup_source(ipv4_packet("10.0.0.2", "10.0.0.1")) == P2
    assert table.lookup_destination(ipv6_packet("fd00::1", "fd00::2")) == P2
    assert table.lookup_source(ipv6_packet("fd00::1", "fd00::2")) is None
    with pytest.raises(ProtocolError):
        table.lookup_destination(b"\x00" * 40)


networks = st.one_of(
    st.builds(
        lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, n: ipaddress.IPv6Network((a, n), strict=False),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
)


@settings(max_examples=200, database=None)
@given(
    st.lists(st.tuples(networks, st.sampled_from([P1, P2, P3])), max_size=20),
    st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32, 2**128 - 1)), max_size=20),
)
def test_2_lookup_matches_a_brute_force_longest_prefix_search(
    routes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, bytes]], probes: list[int]
) -> None:
    table = AllowedIPs()
    latest: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, bytes] = {}
    for net, peer in routes:
        table.insert(net, peer)
        latest[net] = peer
    # Probe both arbitrary addresses and addresses inside each route.
    addresses = [ipaddress.ip_address(p) if p >= 2**32 else ipaddress.IPv4Address(p) for p in probes]
    addresses += [net.network_address for net in latest] + [net.broadcast_address for net in latest]
    for address in addresses:
        matching = [n for n in latest if n.version == address.version and address in n]
        expected = latest[max(matching, key=lambda n: n.prefixlen)] if matching else None
        assert table.lookup(address) == expected
        assert table.lookup(address.packed) == expected


def test_2_the_memo_answers_as_lookup_and_every_change_starts_a_new_one() -> None:
    """The data plane's lone-packet path reads ``memo`` without calls; any change must not leave an answer
    from the old table in it, and a reader still holding the old dict can only write where nobody reads."""
    table = AllowedIPs()
    table.insert("10.0.0.0/24", P1)
    a, far = ipaddress.IPv4Address("10.0.0.7").packed, ipaddress.IPv4Address("192.0.2.1").packed
    assert table.remember(a) == P1 and table.remember(far) is None
    assert table.memo == {a: P1, far: None}
    old = table.memo
    table.insert("10.0.0.7/32", P2)  # more specific: a moves to P2
    assert table.memo == {} and table.remember(a) == P2
    table.remove("10.0.0.7/32")
    assert table.memo == {} and table.remember(a) == P1
    table.remove_peer(P1)
    assert table.memo == {} and table.remember(a) is None
    assert old == {a: P1, far: None}, "the old dict is left as it was, not reused"
    v6 = ipaddress.IPv6Address("fd00::1").packed
    table.insert("fd00::/64", P3)
    assert table.remember(v6) == P3 and table.memo[v6] == P3


def test_2_the_memo_stops_growing_at_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allowed_ips, "MEMO_MAX", 3)
    table = AllowedIPs()
    table.insert("10.0.0.0/8", P1)
    for i in range(10):
        assert table.remember(bytes((10, 0, 0, i))) == P1  # answered all the same
    assert len(table.memo) == 3
