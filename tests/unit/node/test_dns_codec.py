"""The DNS message codec (tunnelmesh.node.dns_wire): RFC 1035 §4 framing, compression, strictness.

Property tests: any bytes either parse or raise DnsFormatError (nothing else), and anything we build encodes
and parses back equal. Case tests cite the rule they check, with wire bytes written out by hand.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.errors import ProtocolError
from tunnelmesh.node import dns_wire as w

# -- hand-written wire ---------------------------------------------------------------------------------------


def header(
    id_: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack(">HHHHHH", id_, flags, qd, an, ns, ar)


def wire_name(text: str) -> bytes:
    out = b""
    for label in text.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def query_bytes(name: str = "a.mesh.internal", qtype: int = w.TYPE_A) -> bytes:
    return header() + wire_name(name) + struct.pack(">HH", qtype, w.CLASS_IN)


def test_parses_a_plain_query() -> None:
    msg = w.parse(query_bytes("Db.Mesh.internal", w.TYPE_AAAA))
    assert msg.header == w.Header(0x1234, rd=True)
    assert msg.questions == (w.Question((b"Db", b"Mesh", b"internal"), w.TYPE_AAAA),)
    assert w.name_key(msg.questions[0].name) == (b"db", b"mesh", b"internal")


def test_header_flags_round_trip_bit_for_bit() -> None:
    for flags in (0x0000, 0xFFFF, 0x8580, 0x0110, 0x7800):
        h = w.Header.from_flags(7, flags)
        assert h.flags == flags


def test_compression_points_repeated_suffixes_at_earlier_names() -> None:
    """RFC 1035 §4.1.4: a repeated suffix is a 2-byte pointer to its first occurrence."""
    name = (b"a", b"mesh", b"internal")
    msg = w.Message(
        w.Header(1, qr=True),
        (w.Question(name, w.TYPE_A),),
        w.records(name, w.TYPE_A, 5, [w.A(ipaddress.IPv4Address("100.64.0.1"))]),
        (
            w.ResourceRecord(
                name[1:], w.TYPE_SOA, w.CLASS_IN, 5, w.SOA(name[1:], (b"h", *name[1:]), 1, 2, 3, 4, 5)
            ),
        ),
    )
    data = msg.to_bytes()
    assert data.count(b"\x04mesh\x08internal") == 1
    assert data[12 + 17 + 4 : 12 + 17 + 6] == b"\xc0\x0c"  # the answer's owner points at the question
    assert w.parse(data) == msg


def test_pointer_that_does_not_point_backwards_is_rejected() -> None:
    """A pointer to itself or forwards could loop; only strictly earlier offsets are accepted."""
    self_loop = header() + b"\xc0\x0c" + struct.pack(">HH", 1, 1)
    forward = header() + b"\xc0\x10\x00\x00" + struct.pack(">HH", 1, 1)
    for data in (self_loop, forward):
        with pytest.raises(w.DnsFormatError, match="backwards") as e:
            w.parse(data)
        assert e.value.header is not None and e.value.header.id == 0x1234


def test_a_pointer_chain_going_backwards_terminates() -> None:
    # question name "x" + pointer to 12 is fine; a name made of nothing but back-pointers ends at a real name
    data = (
        header(qd=2)
        + wire_name("mesh")
        + struct.pack(">HH", 1, 1)
        + b"\x01x\xc0\x0c"
        + struct.pack(">HH", 1, 1)
    )
    msg = w.parse(data)
    assert msg.questions[1].name == (b"x", b"mesh")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x12\x34\x01", "shorter than the 12-byte header"),
        (header(qd=1), "truncated name"),
        (header() + b"\x05ab", "truncated label"),
        (header() + b"\x40abc\x00" + b"\x00\x01\x00\x01", "label type 0x40"),
        (header() + b"\x80\x00" + b"\x00\x01\x00\x01", "label type 0x80"),
        (header() + wire_name("a") + b"\x00\x01", "truncated"),
        (query_bytes() + b"\x00", "1 bytes after the last record"),
        (
            header(qd=0, an=1) + b"\x00" + struct.pack(">HHIH", 1, 1, 5, 3) + b"\x01\x02\x03",
            "A data of 3 bytes",
        ),
        (header(qd=0, an=1) + b"\x00" + struct.pack(">HHIH", 28, 1, 5, 4) + b"\x01\x02\x03\x04", "AAAA data"),
        (header(qd=0, an=1) + b"\x00" + struct.pack(">HHIH", 16, 1, 5, 0), "TXT record without strings"),
        (header(qd=0, an=1) + b"\x00" + struct.pack(">HHIH", 16, 1, 5, 3) + b"\x05ab", "truncated"),
        (
            header(qd=0, an=1) + b"\x00" + struct.pack(">HHIH", 5, 1, 5, 9) + wire_name("a") + bytes(6),
            "does not fill",
        ),
        (header(qd=0, an=1) + b"\x00" + struct.pack(">HHIH", 99, 1, 5, 10) + b"abc", "runs past the end"),
    ],
    ids=[
        "short-header",
        "no-question",
        "label-past-end",
        "ext-label",
        "reserved-label",
        "no-qtype",
        "trailing-garbage",
        "short-a",
        "short-aaaa",
        "empty-txt",
        "txt-string-past-end",
        "cname-rdlength",
        "rdlength-past-end",
    ],
)
def test_malformed_messages_raise_our_error(data: bytes, match: str) -> None:
    with pytest.raises(w.DnsFormatError, match=match) as e:
        w.parse(data)
    assert isinstance(e.value, ProtocolError)
    assert (e.value.header is None) == (len(data) < w.HEADER_SIZE)


def test_names_longer_than_255_bytes_are_rejected() -> None:
    """RFC 1035 §3.1: the whole name on the wire is at most 255 bytes, including length bytes and the root."""
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 257 bytes
    with pytest.raises(w.DnsFormatError, match="longer than 255"):
        w.parse(header() + long_name + b"\x00\x01\x00\x01")
    ok = b"".join(b"\x3f" + b"a" * 63 for _ in range(3)) + b"\x3d" + b"a" * 61 + b"\x00"  # exactly 255
    assert len(w.parse(header() + ok + b"\x00\x01\x00\x01").questions[0].name) == 4


def test_edns_opt_record_round_trips() -> None:
    """RFC 6891 §6.1.3: class = UDP size; TTL = extended rcode, version, DO bit."""
    opt = w.Edns(4096, extended_rcode=1, version=0, dnssec_ok=True, options=b"\x00\x0a\x00\x02ab").to_record()
    assert opt.rclass == 4096 and opt.ttl == 0x01008000
    msg = w.Message(w.Header(9), (w.Question((b"x",), w.TYPE_A),), additional=(opt,))
    back = w.parse(msg.to_bytes())
    assert back.edns() == w.Edns(4096, 1, 0, True, b"\x00\x0a\x00\x02ab")


def test_text_names() -> None:
    assert w.name_from_text("Db.mesh.internal.") == (b"Db", b"mesh", b"internal")
    assert w.name_from_text(".") == () and w.name_from_text("") == ()
    assert w.name_to_text((b"a.b", b"c\x00")) == "a\\.b.c\\000."
    for bad in ("a..b", "x" * 64 + ".mesh", "café.mesh", ".".join(["abcdefg"] * 40)):
        with pytest.raises(ValueError):
            w.name_from_text(bad)


def test_txt_values_split_into_255_byte_strings() -> None:
    assert w.txt_strings(b"") == (b"",)
    parts = w.txt_strings(b"x" * 600)
    assert [len(p) for p in parts] == [255, 255, 90]


# -- properties ----------------------------------------------------------------------------------------------

labels = st.binary(min_size=1, max_size=20)
names = st.lists(labels, max_size=5).map(tuple)
ttls = st.integers(0, 0xFFFFFFFF)


def _rr(name: w.Name, rtype: int, data: w.RData, ttl: int, rclass: int = w.CLASS_IN) -> w.ResourceRecord:
    return w.ResourceRecord(name, rtype, rclass, ttl, data)


records = st.one_of(
    st.builds(
        _rr, names, st.just(w.TYPE_A), st.builds(w.A, st.ip_addresses(v=4).map(ipaddress.IPv4Address)), ttls
    ),
    st.builds(
        _rr,
        names,
        st.just(w.TYPE_AAAA),
        st.builds(w.AAAA, st.ip_addresses(v=6).map(ipaddress.IPv6Address)),
        ttls,
    ),
    st.builds(_rr, names, st.just(w.TYPE_CNAME), st.builds(w.CNAME, names), ttls),
    st.builds(
        _rr,
        names,
        st.just(w.TYPE_TXT),
        st.builds(w.TXT, st.lists(st.binary(max_size=255), min_size=1, max_size=3).map(tuple)),
        ttls,
    ),
    st.builds(
        _rr,
        names,
        st.just(w.TYPE_SOA),
        st.builds(w.SOA, names, names, ttls, ttls, ttls, ttls, ttls),
        ttls,
    ),
    st.builds(
        _rr,
        names,
        st.sampled_from([w.TYPE_NS, w.TYPE_OPT, 99, 65535]),
        st.builds(w.Opaque, st.binary(max_size=40)),
        ttls,
        st.integers(0, 0xFFFF),
    ),
)
messages = st.builds(
    w.Message,
    st.builds(w.Header.from_flags, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    st.lists(st.builds(w.Question, names, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), max_size=3).map(
        tuple
    ),
    st.lists(records, max_size=4).map(tuple),
    st.lists(records, max_size=3).map(tuple),
    st.lists(records, max_size=3).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(msg: w.Message) -> None:
    assert w.parse(msg.to_bytes()) == msg


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_raise_our_error(data: bytes) -> None:
    try:
        msg = w.parse(data)
    except w.DnsFormatError:
        return
    assert w.parse(msg.to_bytes()) == msg  # whatever we accept, we can encode again


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_mutated_messages_parse_or_raise_our_error(msg: w.Message, data: st.DataObject) -> None:
    """Bit flips and truncations of real messages hit the deep paths that random bytes rarely reach."""
    raw = bytearray(msg.to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(w.DnsFormatError):
        w.parse(bytes(raw[:cut]))
