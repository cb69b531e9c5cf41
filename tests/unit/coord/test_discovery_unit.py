"""Discovery's pure parts: host:port and seed lists, the TXT announcement, seed resolution, misuse.

No multicast here (tests/integration/test_discovery.py sends real mDNS between namespaces); nothing in this
file opens a socket except the `localhost` look-up through the system resolver.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import ServiceInfo

from tunnelmesh.coord.discovery import (
    SERVICE_TYPE,
    Announcement,
    Candidate,
    Discovery,
    DiscoveryError,
    HostPort,
    _instance_label,
    encode_txt,
    parse_hostport,
    parse_seeds,
    parse_txt,
    resolve_seeds,
)
from tunnelmesh.errors import TunnelMeshError

# --- host:port and seeds ------------------------------------------------------------------------

VALID = [
    ("10.0.0.5:7400", HostPort("10.0.0.5", 7400)),
    ("  coord-1.example.net:7400 ", HostPort("coord-1.example.net", 7400)),
    ("coord-1.example.net.:1", HostPort("coord-1.example.net.", 1)),
    ("localhost:65535", HostPort("localhost", 65535)),
    ("[fd00::5]:7400", HostPort("fd00::5", 7400)),
    ("[::1]:7400", HostPort("::1", 7400)),
    ("_srv-ish.example:80", HostPort("_srv-ish.example", 80)),
]

INVALID = [
    ("", "is empty"),
    ("coord-1", "has no port"),
    ("coord-1:", "port '' is not a number"),
    ("coord-1:0", "from 1 to 65535"),
    ("coord-1:65536", "from 1 to 65535"),
    ("coord-1:http", "is not a number"),
    ("coord-1:٧٤", "is not a number"),  # Arabic-Indic digits pass str.isdigit()
    (":7400", "no host"),
    ("fd00::5:7400", "needs brackets, e.g. [fd00::5]:7400"),
    ("[fd00::5:7400", "without ']'"),
    ("[fd00::5]", "has no port"),
    ("[10.0.0.1]:7400", "not an IPv6 address"),
    ("300.1.1.1:7400", "not a valid IPv4 address"),
    ("-bad.example:7400", "not a valid host name"),
    ("bad..example:7400", "not a valid host name"),
    ("sp ace:7400", "not a valid host name"),
    (f"{'a' * 64}.example:7400", "not a valid host name"),
]


@pytest.mark.parametrize(("text", "want"), VALID)
def test_hostport_accepts(text: str, want: HostPort) -> None:
    assert parse_hostport(text) == want


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_hostport_rejects_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(DiscoveryError, match="seed") as err:
        parse_hostport(text, what="seed")
    assert message in str(err.value)


def test_hostport_prints_ipv6_in_brackets() -> None:
    assert str(HostPort("fd00::5", 7400)) == "[fd00::5]:7400"
    assert str(HostPort("10.0.0.5", 7400)) == "10.0.0.5:7400"


def test_seed_lists_split_on_commas_keep_order_and_drop_duplicates() -> None:
    assert parse_seeds("b:1, a:2,[::1]:3") == [HostPort("b", 1), HostPort("a", 2), HostPort("::1", 3)]
    assert parse_seeds(["b:1,a:2", "a:2", "c:3"]) == [HostPort("b", 1), HostPort("a", 2), HostPort("c", 3)]
    assert parse_seeds([]) == []


@pytest.mark.parametrize("bad", ["a:1,,b:2", "a:1,", ","])
def test_seed_list_with_an_empty_entry_is_refused(bad: str) -> None:
    with pytest.raises(DiscoveryError, match="empty entry"):
        parse_seeds(bad)


@given(st.text(max_size=40))
def test_arbitrary_seed_text_raises_only_discovery_error(text: str) -> None:
    with contextlib.suppress(DiscoveryError):
        parse_seeds(text)


# --- TXT ------------------------------------------------------------------------------------------


def test_txt_carries_what_the_architecture_says_and_nothing_else() -> None:
    a = Announcement(cluster_id="c7a0", member_id="m1f3", api="10.0.0.5:7443")
    assert encode_txt(a) == {"v": "1", "cluster": "c7a0", "member": "m1f3", "api": "10.0.0.5:7443"}
    # Not in a cluster yet: no cluster key at all (and no member key before an id exists).
    assert encode_txt(Announcement()) == {"v": "1"}


@pytest.mark.parametrize(
    ("props", "want"),
    [
        ({b"v": b"1", b"cluster": b"c1", b"member": b"m1", b"api": b"h:1"}, Announcement("c1", "m1", "h:1")),
        ({b"V": b"1", b"Cluster": b"c1"}, Announcement("c1")),  # keys are case-insensitive (RFC 6763 §6.4)
        ({b"v": b"1", b"cluster": b""}, Announcement()),  # empty = absent
        ({b"v": b"1", b"cluster": None}, Announcement()),  # "cluster" without "=" = absent
        ({b"v": b"1", b"future": b"x", b"\xff": b"y"}, Announcement()),  # unknown keys are ignored
    ],
)
def test_txt_parses(props: dict[bytes, bytes | None], want: Announcement) -> None:
    assert parse_txt(props) == want


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({b"cluster": b"c1"}, "no v= key"),
        ({b"v": b"2", b"cluster": b"c1"}, "v='2' is not supported"),
        ({b"v": b"1", b"cluster": b"\xff"}, "cluster= is not UTF-8"),
        ({b"v": b"1", b"member": b"m\n1"}, "control characters"),
        ({b"v": b"1", b"api": b"no-port"}, "has no port"),
        ({b"v": b"1", b"cluster": b"x" * 201}, "1 to 200 bytes"),
    ],
)
def test_txt_rejects_with_the_reason(props: dict[bytes, bytes | None], message: str) -> None:
    with pytest.raises(DiscoveryError) as err:
        parse_txt(props)
    assert message in str(err.value)


ids = st.text(st.characters(min_codepoint=0x20, codec="utf-8"), min_size=1, max_size=40).filter(
    lambda s: "\x7f" not in s
)


@given(cluster=st.none() | ids, member=st.none() | ids, api=st.none() | st.sampled_from(["h:1", "[::1]:7"]))
@settings(max_examples=200)
def test_txt_round_trips_through_the_wire_format(
    cluster: str | None, member: str | None, api: str | None
) -> None:
    a = Announcement(cluster, member, api)
    wire = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=encode_txt(a)).text  # RFC 6763 bytes
    assert parse_txt(ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=wire).properties) == a


@given(st.dictionaries(st.binary(max_size=12), st.none() | st.binary(max_size=30), max_size=6))
@settings(max_examples=200)
def test_arbitrary_txt_raises_only_discovery_error(props: dict[bytes, bytes | None]) -> None:
    with contextlib.suppress(DiscoveryError):
        parse_txt(props)


@given(st.binary(max_size=120))
@settings(max_examples=300)
def test_arbitrary_txt_wire_bytes_raise_only_discovery_error(wire: bytes) -> None:
    with contextlib.suppress(DiscoveryError):
        parse_txt(ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=wire).properties)


def test_discovery_error_is_a_tunnelmesh_error() -> None:
    assert issubclass(DiscoveryError, TunnelMeshError)


# --- seed resolution ------------------------------------------------------------------------------


async def test_every_address_of_a_seed_is_a_candidate_in_seed_order() -> None:
    calls: list[tuple[str, int]] = []

    async def dns(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return {"two.example": ["10.0.0.2", "fd00::2", "10.0.0.2"], "one.example": ["10.0.0.1"]}[host]

    seeds = parse_seeds("two.example:7400,10.0.0.9:7401,one.example:7402")
    got = await resolve_seeds(seeds, 1.0, dns)
    assert got == [
        Candidate("10.0.0.2:7400", None, None, "seed", api="10.0.0.2:7400", origin="two.example:7400"),
        Candidate("[fd00::2]:7400", None, None, "seed", api="[fd00::2]:7400", origin="two.example:7400"),
        Candidate("10.0.0.9:7401", None, None, "seed", api="10.0.0.9:7401", origin="10.0.0.9:7401"),
        Candidate("10.0.0.1:7402", None, None, "seed", api="10.0.0.1:7402", origin="one.example:7402"),
    ]
    assert sorted(calls) == [("one.example", 7402), ("two.example", 7400)], "literals are not looked up"


async def test_an_unresolvable_or_slow_seed_is_skipped_within_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def dns(host: str, port: int) -> list[str]:
        if host == "slow.example":
            await asyncio.sleep(30)
        if host == "gone.example":
            raise OSError("Name or service not known")
        return ["10.0.0.1"]

    t0 = time.monotonic()
    got = await resolve_seeds(parse_seeds("slow.example:1,gone.example:2,ok.example:3"), 0.3, dns)
    assert time.monotonic() - t0 < 1.0
    assert [c.address for c in got] == ["10.0.0.1:3"]
    assert "event=seed_unresolved seed=slow.example:1" in caplog.text
    assert "event=seed_unresolved seed=gone.example:2 error='Name or service not known'" in caplog.text


async def test_the_system_resolver_is_used_by_default() -> None:
    got = await resolve_seeds(parse_seeds("localhost:7400"), 5.0)
    assert "127.0.0.1:7400" in [c.address for c in got]


# --- the Discovery object, without multicast -----------------------------------------------------


async def test_seeds_only_discovery_finds_the_seeds_at_once() -> None:
    d = Discovery(name="a", port=7400, cluster_id="c1", seeds=["10.0.0.2:7400", "10.0.0.3:7400"], mdns=False)
    with pytest.raises(DiscoveryError, match="needs a started discovery"):
        await d.find_members(1.0)
    async with d:
        t0 = time.monotonic()
        found = await d.find_members(5.0)
        assert time.monotonic() - t0 < 0.5
        assert [c.address for c in found] == ["10.0.0.2:7400", "10.0.0.3:7400"]
        assert d.peers() == []
        await d.update_announcement(cluster_id="c2", member_id="m1")
        assert (d.cluster_id, d.member_id) == ("c2", "m1")
    with pytest.raises(DiscoveryError, match="state stopped"):
        await d.find_members(1.0)
    await d.stop()  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "port 0 is not from 1 to 65535"),
        ({"ttl": 1}, "ttl 1 must be from 2 to 4500"),
        ({"seeds": "a:1,b"}, "seed 'b' has no port"),
        ({"cluster_id": "c\x001"}, "TXT cluster="),
        ({"api": "10.0.0.1"}, "TXT api '10.0.0.1' has no port"),
        ({"member_id": "m" * 62}, "too long for an mDNS name"),
    ],
)
def test_bad_configuration_is_refused_when_constructed(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "a", "port": 7400, **kwargs}
    with pytest.raises(DiscoveryError) as err:
        Discovery(**args)  # type: ignore[arg-type]
    assert message in str(err.value)


async def test_an_unknown_interface_is_refused_before_any_socket_is_opened() -> None:
    d = Discovery(name="a", port=7400, interfaces=["nope0"])
    with pytest.raises(
        DiscoveryError, match=r"mDNS interface 'nope0' is neither .* \(have: .*lo \(127\.0\.0\.1\)"
    ):
        await d.start()


async def test_a_bad_update_changes_nothing() -> None:
    d = Discovery(name="a", port=7400, cluster_id="c1", mdns=False)
    with pytest.raises(DiscoveryError, match="control characters"):
        await d.update_announcement(cluster_id="c\n2")
    assert d.cluster_id == "c1"
    await d.update_announcement(cluster_id=None)  # leaving a cluster
    assert d.cluster_id is None


@pytest.mark.parametrize(
    ("name", "member", "want"),
    [
        ("coord-a", "7f3a9c21", "coord-a-7f3a9c21"),
        ("coord.a.example", "m.1", "coord-a-example-m-1"),  # no dots: one DNS label
        ("x" * 80, "7f3a9c21", "x" * 54 + "-7f3a9c21"),  # the name is shortened to 63 bytes in all
    ],
)
def test_instance_names_are_one_label_with_the_member_id(name: str, member: str, want: str) -> None:
    assert _instance_label(name, member) == want
