"""IPAM: lowest free address, never one address twice, quarantine by time; checked against a naive model."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.coord.ipam import AddressPool, IpamError, canonical_address_version, format_ipv6, parse_prefix


class Model:
    """The obvious, slow definition of 'the lowest free address'."""

    def __init__(self, pool: AddressPool) -> None:
        self.candidates = [a for a in range(pool.first, pool.last + 1) if a not in pool.reserved]
        self.taken: set[int] = set()
        self.quarantine: dict[int, int] = {}

    def lowest_free(self, now: int) -> int | None:
        for a in self.candidates:
            if a not in self.taken and self.quarantine.get(a, now) <= now:
                return a
        return None


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "alloc", "alloc", "release", "tick", "expire"]), st.integers(0, 50)),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(prefix=st.sampled_from(["10.0.0.0/28", "fd00::/124", "10.0.0.0/30"]), ops=ops, reserve=st.booleans())
def test_pool_matches_the_model(prefix: str, ops: list[tuple[str, int]], reserve: bool) -> None:
    network = parse_prefix(prefix)
    base = int(network.network_address)
    pool = AddressPool(network, reserved=[base + 3, base + 5] if reserve else [])
    model = Model(pool)
    now = 0
    for op, arg in ops:
        if op == "alloc":
            expected = model.lowest_free(now)
            assert pool.find_free(now) == expected
            if expected is not None:
                pool.expire(now)
                pool.take(expected, now)
                model.taken.add(expected)
                model.quarantine.pop(expected, None)
        elif op == "release" and model.taken:
            address = sorted(model.taken)[arg % len(model.taken)]
            reusable_at = now + arg % 7
            pool.release(address, reusable_at, now)
            model.taken.discard(address)
            if reusable_at > now:
                model.quarantine[address] = reusable_at
        elif op == "tick":
            now += arg % 5
        elif op == "expire":
            pool.expire(now)
        # Invariants: nothing handed out twice, only inside the prefix, never network/broadcast/reserved.
        assert pool.taken == model.taken
        for address in pool.taken:
            assert base < address <= int(network.broadcast_address) and address not in pool.reserved
            if network.version == 4:
                assert address != int(network.broadcast_address)


def test_lowest_free_does_not_scan_a_large_prefix() -> None:
    """After a restore that adopted a high address, the lowest free address is still found at once."""
    pool = AddressPool(parse_prefix("100.64.0.0/10"))
    pool.adopt(int(ipaddress.IPv4Address("100.127.255.254")))
    pool.adopt(int(ipaddress.IPv4Address("100.64.0.1")))
    assert pool.str_of(pool.find_free(0) or 0) == "100.64.0.2"


def test_exhaustion_and_misuse() -> None:
    pool = AddressPool(parse_prefix("10.0.0.0/30"))
    first = pool.find_free(0)
    assert first is not None and pool.str_of(first) == "10.0.0.1"
    pool.take(first, 0)
    with pytest.raises(IpamError):
        pool.take(first, 0)
    second = pool.find_free(0)
    assert second is not None
    pool.take(second, 0)
    assert pool.find_free(0) is None  # 10.0.0.3 is the broadcast address
    with pytest.raises(IpamError):
        pool.release(int(ipaddress.IPv4Address("10.0.0.3")), 0, 0)


def test_quarantined_address_is_free_exactly_at_its_time() -> None:
    pool = AddressPool(parse_prefix("10.0.0.0/29"))
    a = pool.find_free(0)
    assert a is not None
    pool.take(a, 0)
    pool.release(a, 100, 0)
    assert pool.find_free(99) != a
    assert pool.find_free(100) == a  # without expire() having run: the answer does not depend on it
    assert list(pool.quarantined()) == [(a, 100)]
    pool.expire(100)
    assert list(pool.quarantined()) == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("100.64.0.1/10", "host bits"),
        ("10.0.0.0/31", "too small"),
        ("fd00::/127", "too small"),
        ("x", "junk"),
    ],
)
def test_parse_prefix_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError):
        parse_prefix(text)


@settings(max_examples=300, deadline=None)
@given(groups=st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xABC]), min_size=8, max_size=8))
def test_ipv6_text_form_matches_rfc5952_as_ipaddress_writes_it(groups: list[int]) -> None:
    address = 0
    for group in groups:
        address = address << 16 | group
    if address >> 32 == 0xFFFF:
        return  # IPv4-mapped: ipaddress output differs between Python versions (why we format ourselves)
    assert format_ipv6(address) == str(ipaddress.IPv6Address(address))


@pytest.mark.parametrize(
    ("prefix", "text", "expected"),
    [
        ("100.64.0.0/10", "100.64.0.7", 0x64400007),
        ("100.64.0.0/10", "100.064.0.7", None),  # not canonical
        ("100.64.0.0/10", "100.128.0.1", None),  # outside
        ("100.64.0.0/10", "fd00::1", None),
        ("fd7a:115c:a1e0::/48", "fd7a:115c:a1e0::7", 0xFD7A115CA1E000000000000000000007),
        ("fd7a:115c:a1e0::/48", "FD7A:115C:A1E0::7", None),  # not canonical
        ("fd7a:115c:a1e0::/48", "fd7a:115c:a1e0:0:0:0:0:7", None),
    ],
)
def test_int_of_accepts_only_canonical_addresses_of_the_prefix(
    prefix: str, text: str, expected: int | None
) -> None:
    assert AddressPool(parse_prefix(prefix)).int_of(text) == expected


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("10.1.2.3", 4),
        ("255.255.255.255", 4),
        ("010.1.2.3", None),
        ("256.1.2.3", None),
        ("1.2.3", None),
        ("2001:db8::1", 6),
        ("::", 6),
        ("2001:DB8::1", None),
        ("2001:db8:0:0::1", None),
        ("::ffff:1.2.3.4", None),
        ("fe80::1%eth0", None),
        ("", None),
    ],
)
def test_canonical_address_version(text: str, version: int | None) -> None:
    assert canonical_address_version(text) == version
