"""The resolver core (tunnelmesh.node.dns: build_zone, respond), query bytes in, reply out.

The same behaviour is checked end to end with dig in tests/integration/test_dns.py; here each rule of the
zone (RFC 1034 §4.3.2, RFC 2308 negative answers, RFC 6891 EDNS0) is pinned down case by case.
"""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.api.v1 import node_pb2
from tunnelmesh.node import dns_wire as w
from tunnelmesh.node.config_apply import apply_delta
from tunnelmesh.node.dns import (
    DEFAULT_TTL,
    EDNS_UDP_SIZE,
    DnsConfigError,
    MeshResolver,
    Zone,
    build_zone,
    default_listen,
    respond,
)

A, AAAA, CNAME, TXT = (
    node_pb2.DNS_RECORD_TYPE_A,
    node_pb2.DNS_RECORD_TYPE_AAAA,
    node_pb2.DNS_RECORD_TYPE_CNAME,
    node_pb2.DNS_RECORD_TYPE_TXT,
)


def rec(name: str, type_: int, *values: str, ttl: int | None = None) -> node_pb2.DnsRecord:
    r = node_pb2.DnsRecord(name=name, type=type_, values=values)
    if ttl is not None:
        r.ttl.CopyFrom(Duration(seconds=ttl))
    return r


def config(
    *records: node_pb2.DnsRecord, domain: str = "mesh.internal", ttl: int | None = None
) -> node_pb2.DnsConfig:
    c = node_pb2.DnsConfig(settings=node_pb2.DnsSettings(mesh_domain=domain), records=records)
    if ttl is not None:
        c.settings.ttl.CopyFrom(Duration(seconds=ttl))
    return c


ZONE, _ = build_zone(
    config(
        rec("alpha.mesh.internal", A, "100.64.0.1"),
        rec("alpha.mesh.internal", AAAA, "fd7a::1"),
        rec("beta.mesh.internal", A, "100.64.0.2", ttl=30),
        rec("www.mesh.internal", CNAME, "alpha.mesh.internal"),
        rec("out.mesh.internal", CNAME, "example.com"),
        rec("db.eu.mesh.internal", A, "100.64.0.9"),
        rec("big.mesh.internal", A, *(f"100.64.1.{i}" for i in range(1, 60))),
        rec("note.mesh.internal", TXT, "x" * 300),
    ),
    serial=7,
)


def ask(
    name: str,
    qtype: int = w.TYPE_A,
    *,
    zone: Zone | None = ZONE,
    edns: w.Edns | None = None,
    tcp: bool = False,
    qclass: int = w.CLASS_IN,
) -> tuple[w.Message, str, bool]:
    q = w.Message(
        w.Header(0xBEEF, rd=True),
        (w.Question(w.name_from_text(name), qtype, qclass),),
        additional=(edns.to_record(),) if edns else (),
    )
    reply = respond(q.to_bytes(), zone, tcp=tcp)
    assert reply.payload is not None
    msg = w.parse(reply.payload)
    assert msg.header.id == 0xBEEF and msg.header.qr and msg.header.rd and not msg.header.ra
    return msg, reply.result, reply.truncated


def test_a_and_aaaa_with_default_and_per_record_ttl() -> None:
    msg, result, _ = ask("alpha.mesh.internal")
    assert result == "noerror" and msg.header.aa and msg.header.rcode == w.RCODE_NOERROR
    assert [(r.data, r.ttl) for r in msg.answers] == [(w.A(ipaddress.IPv4Address("100.64.0.1")), DEFAULT_TTL)]
    msg, _, _ = ask("alpha.mesh.internal", w.TYPE_AAAA)
    assert [r.data for r in msg.answers] == [w.AAAA(ipaddress.IPv6Address("fd7a::1"))]
    msg, _, _ = ask("beta.mesh.internal")
    assert msg.answers[0].ttl == 30


def test_names_are_case_insensitive_and_answered_in_the_askers_case() -> None:
    """RFC 4343: case-insensitive matching; the answer echoes the question's spelling (0x20 hardening)."""
    msg, result, _ = ask("ALPHA.Mesh.Internal.")
    assert result == "noerror"
    assert msg.answers[0].name == (b"ALPHA", b"Mesh", b"Internal")


def test_unknown_name_is_nxdomain_with_soa() -> None:
    """RFC 2308 §2.1: NXDOMAIN carries the zone's SOA in the authority section; its MINIMUM is the TTL."""
    msg, result, _ = ask("nobody.mesh.internal")
    assert result == "nxdomain" and msg.header.rcode == w.RCODE_NXDOMAIN and msg.header.aa
    assert not msg.answers
    (soa,) = msg.authority
    assert soa.rtype == w.TYPE_SOA and soa.name == (b"mesh", b"internal")
    assert isinstance(soa.data, w.SOA) and soa.data.serial == 7 and soa.data.minimum == DEFAULT_TTL


def test_known_name_other_type_is_nodata() -> None:
    """RFC 2308 §2.2: NODATA = NOERROR, empty answer, SOA in authority."""
    msg, result, _ = ask("beta.mesh.internal", w.TYPE_AAAA)
    assert result == "nodata" and msg.header.rcode == w.RCODE_NOERROR and not msg.answers
    assert [r.rtype for r in msg.authority] == [w.TYPE_SOA]


def test_empty_non_terminal_and_apex_are_nodata_not_nxdomain() -> None:
    """RFC 8020: eu.mesh.internal exists because db.eu.mesh.internal does."""
    for name in ("eu.mesh.internal", "mesh.internal"):
        _, result, _ = ask(name)
        assert result == "nodata", name


def test_soa_at_apex() -> None:
    msg, result, _ = ask("mesh.internal", w.TYPE_SOA)
    assert result == "noerror" and [r.rtype for r in msg.answers] == [w.TYPE_SOA]


def test_cname_is_followed_inside_the_zone_and_returned_alone_outside() -> None:
    msg, _, _ = ask("www.mesh.internal")
    assert [r.rtype for r in msg.answers] == [w.TYPE_CNAME, w.TYPE_A]
    assert msg.answers[1].name == (b"alpha", b"mesh", b"internal")
    msg, result, _ = ask("out.mesh.internal")
    assert result == "noerror" and [r.data for r in msg.answers] == [w.CNAME((b"example", b"com"))]
    msg, _, _ = ask("www.mesh.internal", w.TYPE_CNAME)
    assert [r.rtype for r in msg.answers] == [w.TYPE_CNAME]


def test_any_returns_every_rrset_at_the_name() -> None:
    msg, _, _ = ask("alpha.mesh.internal", w.TYPE_ANY)
    assert sorted(r.rtype for r in msg.answers) == [w.TYPE_A, w.TYPE_AAAA]


@pytest.mark.parametrize(
    ("name", "qtype", "qclass"),
    [
        ("example.com", w.TYPE_A, w.CLASS_IN),
        ("internal", w.TYPE_A, w.CLASS_IN),
        ("evilmesh.internal", w.TYPE_A, w.CLASS_IN),
        ("alpha.mesh.internal", w.TYPE_A, 3),  # CHAOS
        ("mesh.internal", w.TYPE_AXFR, w.CLASS_IN),
    ],
)
def test_outside_the_domain_other_classes_and_transfers_are_refused(
    name: str, qtype: int, qclass: int
) -> None:
    msg, result, _ = ask(name, qtype, qclass=qclass)
    assert result == "refused" and msg.header.rcode == w.RCODE_REFUSED and not msg.header.aa
    assert not msg.answers and not msg.authority


def test_everything_is_refused_before_the_first_config() -> None:
    _, result, _ = ask("alpha.mesh.internal", zone=None)
    assert result == "refused"


def test_large_udp_answer_is_truncated_and_tcp_gets_all() -> None:
    """RFC 1035 §4.2.1 / RFC 7766 §5: over 512 bytes without EDNS: TC and an empty answer; TCP: everything."""
    msg, result, truncated = ask("big.mesh.internal")
    assert truncated and result == "noerror" and msg.header.tc and not msg.answers
    msg, _, truncated = ask("big.mesh.internal", tcp=True)
    assert not truncated and not msg.header.tc and len(msg.answers) == 59


def test_edns_buffer_size_is_honoured_up_to_our_cap() -> None:
    """RFC 6891 §6.2.5: the client's UDP size, at least 512; we cap at 1232 and say so in our OPT."""
    msg, _, truncated = ask("big.mesh.internal", edns=w.Edns(4096))
    assert not truncated and len(msg.answers) == 59  # 59 A records: about 970 bytes
    assert msg.edns() == w.Edns(EDNS_UDP_SIZE)
    _, _, truncated = ask("big.mesh.internal", edns=w.Edns(600))
    assert truncated
    _, _, truncated = ask("big.mesh.internal", edns=w.Edns(100))  # below 512 counts as 512
    assert truncated
    msg, _, _ = ask("alpha.mesh.internal")
    assert msg.edns() is None  # no OPT in the query: none in the answer


def test_edns_version_1_gets_badvers() -> None:
    msg, result, _ = ask("alpha.mesh.internal", edns=w.Edns(1232, version=1))
    assert result == "badvers"
    edns = msg.edns()
    assert edns is not None and (edns.extended_rcode << 4 | msg.header.rcode) == w.RCODE_BADVERS


def test_long_txt_is_split_into_character_strings() -> None:
    msg, _, _ = ask("note.mesh.internal", w.TYPE_TXT)
    (txt,) = msg.answers
    assert isinstance(txt.data, w.TXT) and b"".join(txt.data.strings) == b"x" * 300


# -- malformed queries ---------------------------------------------------------------------------------------


def _q(**changes: object) -> w.Message:
    base = w.Message(w.Header(0x4242, rd=True), (w.Question((b"alpha", b"mesh", b"internal"), w.TYPE_A),))
    return base.with_header(**changes) if changes else base


@pytest.mark.parametrize(
    ("data", "result", "rcode"),
    [
        (b"\x00\x01", "dropped", None),  # no header: nothing to answer
        (_q().to_bytes()[:-3], "formerr", w.RCODE_FORMERR),  # header readable
        (w.Message(w.Header(0x4242)).to_bytes(), "formerr", w.RCODE_FORMERR),  # no question
        (
            w.Message(w.Header(0x4242), _q().questions * 2).to_bytes(),
            "formerr",
            w.RCODE_FORMERR,
        ),  # two questions
        (
            w.Message(w.Header(0x4242), _q().questions, additional=(w.Edns(512).to_record(),) * 2).to_bytes(),
            "formerr",
            w.RCODE_FORMERR,
        ),  # two OPT records
        (_q(qr=True).to_bytes(), "dropped", None),  # a response: never answered
        (_q(opcode=2).to_bytes(), "notimp", w.RCODE_NOTIMP),  # STATUS
    ],
    ids=["short", "truncated", "no-question", "two-questions", "two-opts", "response", "opcode-status"],
)
def test_malformed_queries(data: bytes, result: str, rcode: int | None) -> None:
    reply = respond(data, ZONE)
    assert reply.result == result
    if rcode is None:
        assert reply.payload is None
    else:
        assert reply.payload is not None
        msg = w.parse(reply.payload)
        assert msg.header.id == 0x4242 and msg.header.qr and msg.header.rcode == rcode and not msg.answers


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_respond_never_raises(data: bytes) -> None:
    reply = respond(data, ZONE)
    if reply.payload is not None:
        assert w.parse(reply.payload).header.qr


# -- building the zone ---------------------------------------------------------------------------------------


def test_bad_records_are_skipped_and_counted_the_rest_is_served() -> None:
    zone, rejected = build_zone(
        config(
            rec("ok.mesh.internal", A, "100.64.0.3"),
            rec("bad.mesh.internal", A, "100.64.0.300"),
            rec("v6.mesh.internal", AAAA, "100.64.0.1"),
            rec("x.example.com", A, "100.64.0.4"),
            rec("bad..mesh.internal", A, "100.64.0.5"),
            rec("empty.mesh.internal", A),
            rec("ok.mesh.internal", CNAME, "elsewhere.mesh.internal"),
            rec("mesh.internal", CNAME, "elsewhere.mesh.internal"),
            rec("two.mesh.internal", CNAME, "a.mesh.internal", "b.mesh.internal"),
            node_pb2.DnsRecord(name="u.mesh.internal", values=["1.2.3.4"]),
        ),
        serial=1,
    )
    assert dict(rejected) == {
        "bad_value": 3,
        "outside_domain": 1,
        "bad_name": 1,
        "no_values": 1,
        "cname_conflict": 2,
        "unknown_type": 1,
    }
    assert set(zone.rrsets) == {(b"ok", b"mesh", b"internal")}


def test_duplicate_record_sets_merge_with_the_shorter_ttl() -> None:
    zone, rejected = build_zone(
        config(
            rec("A.mesh.internal", A, "100.64.0.1", ttl=9),
            rec("a.mesh.internal", A, "100.64.0.2", "100.64.0.1", ttl=30),
        ),
        serial=1,
    )
    assert not rejected
    rrset = zone.rrsets[(b"a", b"mesh", b"internal")][w.TYPE_A]
    assert rrset.ttl == 9 and len(rrset.data) == 2


def test_zone_ttl_from_settings() -> None:
    zone, _ = build_zone(config(rec("a.mesh.internal", A, "100.64.0.1"), ttl=60), serial=1)
    assert zone.ttl == 60 and zone.rrsets[(b"a", b"mesh", b"internal")][w.TYPE_A].ttl == 60


@pytest.mark.parametrize("domain", ["", ".", "bad..domain", "x" * 64 + ".internal"])
def test_a_bad_domain_raises_and_update_keeps_the_old_zone(domain: str) -> None:
    with pytest.raises(DnsConfigError, match="mesh_domain"):
        build_zone(config(domain=domain), serial=1)
    resolver = MeshResolver([("127.0.0.1", 0)], config=config(rec("a.mesh.internal", A, "100.64.0.1")))
    old = resolver.zone
    with pytest.raises(DnsConfigError):
        resolver.update(config(domain=domain))
    assert resolver.zone is old and resolver.rejected_records["bad_domain"] == 1


def test_update_replaces_all_records_and_bumps_the_serial() -> None:
    resolver = MeshResolver([("127.0.0.1", 0)], config=config(rec("old.mesh.internal", A, "100.64.0.1")))
    first = resolver.zone
    resolver.update(config(rec("new.mesh.internal", A, "100.64.0.1")))
    assert first is not None and resolver.zone is not None
    assert resolver.zone.serial == first.serial + 1
    assert set(resolver.zone.rrsets) == {(b"new", b"mesh", b"internal")}
    same = resolver.update(config(rec("new.mesh.internal", A, "100.64.0.1")))
    assert same is resolver.zone and same.serial == first.serial + 1  # an unchanged config keeps the zone


def test_a_delta_upserts_and_removes_records_by_name_and_type() -> None:
    base = config(rec("a.mesh.internal", A, "100.64.0.1"), rec("b.mesh.internal", A, "100.64.0.2"))
    delta = node_pb2.ConfigDelta(
        upserted_dns_records=[
            rec("b.mesh.internal", A, "100.64.0.22"),
            rec("c.mesh.internal", A, "100.64.0.3"),
        ],
        removed_dns_records=[node_pb2.DnsRecordKey(name="a.mesh.internal", type=A)],
    )
    merged = apply_delta(node_pb2.ConfigSnapshot(version=1, dns=base), _versioned(delta)).dns
    assert merged.settings.mesh_domain == "mesh.internal"
    assert sorted((r.name, tuple(r.values)) for r in merged.records) == [
        ("b.mesh.internal", ("100.64.0.22",)),
        ("c.mesh.internal", ("100.64.0.3",)),
    ]
    delta = node_pb2.ConfigDelta(dns_settings=node_pb2.DnsSettings(mesh_domain="corp.example"))
    snap = node_pb2.ConfigSnapshot(version=1, dns=base)
    assert apply_delta(snap, _versioned(delta)).dns.settings.mesh_domain == "corp.example"


def _versioned(delta: node_pb2.ConfigDelta) -> node_pb2.ConfigDelta:
    delta.base_version, delta.version = 1, 2
    return delta


def test_default_listen_is_port_53_on_each_mesh_address() -> None:
    assert default_listen(["100.64.0.5/10", "fd7a:115c::5/48"]) == [("100.64.0.5", 53), ("fd7a:115c::5", 53)]
