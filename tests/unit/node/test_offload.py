"""Offload helpers: checksums, virtio_net_hdr, TSO/USO segmentation and GRO coalescing, checked by properties.

Each property states a rule from the kernel's behaviour (tcp_gso_segment, tcp_gro_receive, RFC 1071) that the
helpers must share, so the kernel on either side of the tunnel cannot tell our segments from its own.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tunnelmesh.node import offload as o
from tunnelmesh.node.errors import OffloadError

# --- packet builders ----------------------------------------------------------------------------------------


def ref_ones_sum(data: bytes) -> int:
    """RFC 1071 word loop with end-around carry: the reference the fast version must match."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ip_header(
    v6: bool, proto: int, l4_len: int, src: bytes, dst: bytes, ipid: int = 7, tos: int = 0
) -> bytes:
    if v6:
        return struct.pack(">IHBB16s16s", 0x60000000 | tos << 20, l4_len, proto, 64, src, dst)
    hdr = bytearray(
        struct.pack(">BBHHHBBH4s4s", 0x45, tos, 20 + l4_len, ipid, 0x4000, 64, proto, 0, src, dst)
    )
    o.set_ipv4_header_checksum(hdr)
    return bytes(hdr)


def tcp_packet(
    v6: bool = False,
    *,
    payload: bytes = b"x" * 100,
    seq: int = 1000,
    ack: int = 55,
    flags: int = o.TCP_ACK,
    options: bytes = b"",
    sport: int = 40000,
    dport: int = 5201,
    window: int = 500,
    src: bytes | None = None,
    ipid: int = 7,
    full_csum: bool = True,
) -> bytearray:
    src = src or (b"\xfd" + bytes(14) + b"\x01" if v6 else bytes([10, 0, 0, 1]))
    dst = b"\xfd" + bytes(14) + b"\x02" if v6 else bytes([10, 0, 0, 2])
    thlen = 20 + len(options)
    tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, ack, (thlen // 4) << 4, flags, window, 0, 0) + options
    pkt = bytearray(ip_header(v6, o.IPPROTO_TCP, thlen + len(payload), src, dst, ipid) + tcp + payload)
    l4 = 40 if v6 else 20
    pseudo = o.pseudo_header_sum(src, dst, o.IPPROTO_TCP, thlen + len(payload))
    c = o.internet_checksum(pkt[l4:], pseudo) if full_csum else pseudo
    pkt[l4 + 16 : l4 + 18] = c.to_bytes(2, "big")
    return pkt


def udp_packet(v6: bool = False, payload: bytes = b"u" * 50) -> bytearray:
    src = b"\xfd" + bytes(14) + b"\x01" if v6 else bytes([10, 0, 0, 1])
    dst = b"\xfd" + bytes(14) + b"\x02" if v6 else bytes([10, 0, 0, 2])
    udp = bytearray(struct.pack(">HHHH", 1111, 2222, 8 + len(payload), 0) + payload)
    c = o.internet_checksum(udp, o.pseudo_header_sum(src, dst, o.IPPROTO_UDP, len(udp))) or 0xFFFF
    udp[6:8] = c.to_bytes(2, "big")
    return bytearray(ip_header(v6, o.IPPROTO_UDP, len(udp), src, dst) + udp)


def l4_off(pkt: bytes | bytearray | memoryview) -> int:
    return 40 if pkt[0] >> 4 == 6 else (pkt[0] & 0x0F) * 4


def tcp_fields(pkt: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(seq, flags, payload length) of a TCP packet."""
    l4 = l4_off(pkt)
    thlen = (pkt[l4 + 12] >> 4) * 4
    seq = int.from_bytes(pkt[l4 + 4 : l4 + 8], "big")
    return seq, pkt[l4 + 13], len(pkt) - l4 - thlen


def payload_of(pkt: bytes | bytearray | memoryview) -> bytes:
    l4 = l4_off(pkt)
    return bytes(pkt[l4 + (pkt[l4 + 12] >> 4) * 4 :])


def flat(iov: list[o.Buffer]) -> bytes:
    return b"".join(bytes(b) for b in iov[1:])


TS_OPTION = bytes([1, 1, 8, 10]) + bytes(range(8))


def tso(
    v6: bool, payload: bytes, mss: int, flags: int, seq: int, options: bytes = TS_OPTION
) -> tuple[o.VirtioNetHdr, bytearray]:
    """A super-packet as the TUN driver hands it over: NEEDS_CSUM, seed in the checksum field."""
    pkt = tcp_packet(v6, payload=payload, flags=flags, seq=seq, options=options, full_csum=False)
    l4 = 40 if v6 else 20
    gso = o.VNET_HDR_GSO_TCPV6 if v6 else o.VNET_HDR_GSO_TCPV4
    hdr = o.VirtioNetHdr(o.VNET_HDR_F_NEEDS_CSUM, gso, l4 + 20 + len(options), mss, l4, o.TCP_CSUM_OFFSET)
    return hdr, pkt


# --- checksums ----------------------------------------------------------------------------------------------


@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_fast_ones_sum_matches_rfc1071_word_loop(data: bytes, initial: int) -> None:
    assert o.ones_sum(data) == ref_ones_sum(data)
    padded = data + b"\0" * (len(data) % 2)
    assert o.ones_sum(data, initial) == ref_ones_sum(padded + initial.to_bytes(2, "big"))


@given(st.binary(max_size=2000))
def test_a_stored_checksum_makes_the_sum_all_ones(data: bytes) -> None:
    buf = bytearray(data + b"\0" * (len(data) % 2) + b"\0\0")
    buf[-2:] = o.internet_checksum(buf).to_bytes(2, "big")
    assert ref_ones_sum(bytes(buf)) == 0xFFFF


def test_zero_buffer_sums_to_zero_not_negative_zero() -> None:
    assert o.ones_sum(bytes(64)) == 0
    assert o.ones_sum(b"\xff\xff" * 3) == 0xFFFF


@given(st.booleans(), st.binary(max_size=1500))
@example(False, b'"\x88d\xc1\xa3\xdc\xba')  # the full sum is 0: stored as 0xFFFF
def test_complete_partial_csum_gives_a_valid_checksum(v6: bool, payload: bytes) -> None:
    pkt = tcp_packet(v6, payload=payload, full_csum=False)
    l4 = 40 if v6 else 20
    o.complete_partial_csum(pkt, l4, o.TCP_CSUM_OFFSET)
    assert o.l4_checksum_valid(pkt)
    want = tcp_packet(v6, payload=payload)
    pos = l4 + o.TCP_CSUM_OFFSET
    if want[pos : pos + 2] == b"\0\0":  # a sum of 0 is sent as 0xFFFF (its other ones'-complement form)
        want[pos : pos + 2] = b"\xff\xff"
    assert pkt == want


def test_complete_partial_csum_rejects_offsets_outside_the_packet() -> None:
    with pytest.raises(OffloadError):
        o.complete_partial_csum(bytearray(30), 20, 16)


def test_ipv4_header_checksum_verifies() -> None:
    hdr = ip_header(False, 6, 100, bytes(4), bytes(4))
    assert o.ones_sum(hdr) == 0xFFFF
    assert o.ipv4_header_checksum(hdr) == int.from_bytes(hdr[10:12], "big")


# --- virtio_net_hdr -----------------------------------------------------------------------------------------


@given(st.binary(min_size=10, max_size=10))
def test_vnet_hdr_round_trips(raw: bytes) -> None:
    assert o.build_vnet_hdr(o.parse_vnet_hdr(raw)) == raw


@given(st.binary(max_size=9))
def test_short_vnet_hdr_is_our_error(raw: bytes) -> None:
    with pytest.raises(OffloadError):
        o.parse_vnet_hdr(raw)


# --- segmentation (tcp_gso_segment rules) -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    v6=st.booleans(),
    size=st.integers(1, 20000),
    mss=st.integers(200, 1500),
    seq=st.integers(0, 0xFFFFFFFF),
    fin=st.booleans(),
    psh=st.booleans(),
    cwr=st.booleans(),
    options=st.sampled_from([b"", TS_OPTION]),
    payload_csum=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_segment_then_coalesce_round_trips(
    v6: bool,
    size: int,
    mss: int,
    seq: int,
    fin: bool,
    psh: bool,
    cwr: bool,
    options: bytes,
    payload_csum: bool,
    seed: int,
) -> None:
    payload = random.Random(seed).randbytes(size)
    flags = o.TCP_ACK | (o.TCP_FIN if fin else 0) | (o.TCP_PSH if psh else 0) | (o.TCP_CWR if cwr else 0)
    hdr, pkt = tso(v6, payload, mss, flags, seq, options)
    segs = o.segment(hdr, bytes(pkt), payload_csum=payload_csum)

    # Segments: MSS-sized payloads in order, sequence numbers advance by payload, valid checksums.
    assert len(segs) == -(-size // mss)
    assert b"".join(payload_of(s) for s in segs) == payload
    expect_seq = seq
    for i, s in enumerate(segs):
        s_seq, s_flags, plen = tcp_fields(s)
        assert s_seq == expect_seq
        expect_seq = (expect_seq + plen) & 0xFFFFFFFF
        assert plen == mss or (i == len(segs) - 1 and plen <= mss)
        last, first = i == len(segs) - 1, i == 0
        assert bool(s_flags & o.TCP_FIN) == (fin and last)
        assert bool(s_flags & o.TCP_PSH) == (psh and last)
        assert bool(s_flags & o.TCP_CWR) == (cwr and first)
        info = o.parse_ip(s)
        assert info.total_len == len(s)
        if not v6:
            assert o.ones_sum(s[:20]) == 0xFFFF
            assert int.from_bytes(s[4:6], "big") == (7 + i) & 0xFFFF
        if payload_csum:
            assert o.l4_checksum_valid(s)
        else:
            full = bytearray(s)
            o.complete_partial_csum(full, l4_off(s), o.TCP_CSUM_OFFSET)
            assert o.l4_checksum_valid(full)

    # Coalescing them again gives back the super-packet (one write unless FIN/CWR segments stand alone).
    iovs = o.coalesce(segs, verify_csum=payload_csum, partial_csum_peer=not payload_csum)
    merged = [iov for iov in iovs if len(iov) > 2]
    assert b"".join(payload_of(flat(iov)) for iov in iovs) == payload
    if len(segs) - int(fin and len(segs) > 1) - int(cwr) >= 2:
        assert len(merged) == 1
        vh = o.parse_vnet_hdr(merged[0][0])
        assert vh.gso_type == (o.VNET_HDR_GSO_TCPV6 if v6 else o.VNET_HDR_GSO_TCPV4)
        assert vh.gso_size == mss and vh.needs_csum
        m = bytearray(flat(merged[0]))
        assert o.parse_ip(m).total_len == len(m)
        if not v6:
            assert o.ones_sum(m[:20]) == 0xFFFF
        # The kernel accepts the write: completing the seed over the whole packet gives a valid checksum.
        o.complete_partial_csum(m, vh.csum_start, vh.csum_offset)
        assert o.l4_checksum_valid(m)
    else:
        assert len(merged) <= 1


@given(st.booleans(), st.integers(1, 9000), st.integers(100, 1400))
def test_uso_segments_are_valid_udp_datagrams(v6: bool, size: int, gso_size: int) -> None:
    payload = random.Random(size).randbytes(size)
    pkt = udp_packet(v6, payload)
    l4 = 40 if v6 else 20
    hdr = o.VirtioNetHdr(o.VNET_HDR_F_NEEDS_CSUM, o.VNET_HDR_GSO_UDP_L4, l4 + 8, gso_size, l4, 6)
    segs = o.segment(hdr, pkt)
    assert b"".join(bytes(s[l4 + 8 :]) for s in segs) == payload
    for s in segs:
        assert int.from_bytes(s[l4 + 4 : l4 + 6], "big") == len(s) - l4
        assert o.l4_checksum_valid(s)
        assert len(s) - l4 - 8 <= gso_size


def test_plain_packets_pass_through_segment_without_copy() -> None:
    pkt = tcp_packet()
    assert o.segment(None, pkt)[0] is pkt
    assert o.segment(o.VirtioNetHdr(), pkt)[0] is pkt


def test_skip_csum_mode_turns_full_checksums_into_seeds_and_refuses_bad_ones() -> None:
    pkt = tcp_packet(payload=b"hello")
    (seeded,) = o.segment(None, bytes(pkt), payload_csum=False)
    assert bytes(seeded) == bytes(tcp_packet(payload=b"hello", full_csum=False))
    bad = tcp_packet(payload=b"hello")
    bad[-1] ^= 1
    with pytest.raises(OffloadError, match="bad checksum"):
        o.segment(None, bad, payload_csum=False)


@given(st.integers(0, 0xFF), st.integers(0, 0xFF), st.integers(0, 3000), st.binary(max_size=400))
def test_segment_of_arbitrary_bytes_raises_only_offload_error(
    flags: int, gso: int, size: int, data: bytes
) -> None:
    hdr = o.VirtioNetHdr(flags, gso, 0, size, 20, 16)
    try:
        o.segment(hdr, data)
        o.segment(hdr, data, payload_csum=False)
    except OffloadError:
        pass


@given(
    st.booleans(),
    st.sampled_from([o.VNET_HDR_GSO_TCPV4, o.VNET_HDR_GSO_TCPV6, o.VNET_HDR_GSO_UDP_L4]),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 3000),
)
def test_corrupted_super_packets_raise_only_offload_error(
    v6: bool, gso: int, flips: list[tuple[int, int]], cut: int
) -> None:
    """Near-valid input reaches deeper code than random bytes: headers with a few bytes changed, truncated."""
    _, pkt = tso(v6, bytes(3000), 500, o.TCP_ACK, 1)
    for pos, value in flips:
        pkt[pos % len(pkt)] = value
    hdr = o.VirtioNetHdr(o.VNET_HDR_F_NEEDS_CSUM, gso, 0, 500, 40 if v6 else 20, 16)
    with contextlib.suppress(OffloadError):
        o.segment(hdr, pkt[: len(pkt) - cut])
    o.coalesce([pkt[: len(pkt) - cut]])


@given(st.lists(st.binary(max_size=120), max_size=8), st.booleans(), st.booleans())
def test_coalesce_of_arbitrary_bytes_never_raises(pkts: list[bytes], verify: bool, partial: bool) -> None:
    out = o.coalesce(pkts, verify_csum=verify, partial_csum_peer=partial)
    assert len(out) <= len(pkts)
    assert all(len(iov[0]) == o.VNET_HDR_LEN for iov in out)


@given(st.lists(st.binary(max_size=120), max_size=8))
def test_coalesce_passes_unmergeable_packets_through_unchanged(pkts: list[bytes]) -> None:
    pkts = [p for p in pkts if not (len(p) >= 40 and p[0] >> 4 in (4, 6))]  # surely not TCP
    assert [flat(iov) for iov in o.coalesce(pkts)] == pkts


# --- coalescing rules (tcp_gro_receive) ---------------------------------------------------------------------


def flow(v6: bool, n: int, mss: int = 1000, seq: int = 1, **kw: object) -> list[bytearray]:
    return [
        tcp_packet(v6, payload=bytes([i]) * mss, seq=seq + i * mss, ipid=i, **kw)  # type: ignore[arg-type]
        for i in range(n)
    ]


@pytest.mark.parametrize("v6", [False, True])
def test_interleaved_flows_merge_separately_and_keep_their_order(v6: bool) -> None:
    a = flow(v6, 6, sport=1)
    b = flow(v6, 6, sport=2, seq=999)
    udp = udp_packet(v6)
    mixed = [p for pair in zip(a, b, strict=True) for p in pair]
    mixed.insert(5, udp)
    out = o.coalesce(mixed)
    assert len(out) == 3
    assert [len(iov) for iov in out] == [2 + 6, 2 + 6, 2]
    assert flat(out[2]) == bytes(udp)
    assert payload_of(flat(out[0])) == b"".join(payload_of(p) for p in a)


@pytest.mark.parametrize(
    ("why", "change"),
    [
        ("sequence gap", lambda p: p.__setitem__(slice(24, 28), (10**6).to_bytes(4, "big"))),
        ("different ACK number", lambda p: p.__setitem__(slice(28, 32), (99).to_bytes(4, "big"))),
        ("different TTL", lambda p: p.__setitem__(8, 3)),
        ("SYN", lambda p: p.__setitem__(33, p[33] | o.TCP_SYN)),
        ("RST", lambda p: p.__setitem__(33, p[33] | o.TCP_RST)),
        ("URG", lambda p: p.__setitem__(33, p[33] | o.TCP_URG)),
    ],
)
def test_segments_that_linux_gro_would_not_merge_stay_apart(
    why: str, change: Callable[[bytearray], None]
) -> None:
    pkts = flow(False, 3)
    change(pkts[1])
    out = o.coalesce(pkts)
    assert len(out) == 3, why
    assert [flat(iov) for iov in out] == [bytes(p) for p in pkts]


def test_a_longer_segment_after_a_short_one_starts_a_new_run() -> None:
    pkts = [
        tcp_packet(payload=b"a" * 1000, seq=0),
        tcp_packet(payload=b"b" * 500, seq=1000),
        tcp_packet(payload=b"c" * 1000, seq=1500),
    ]
    out = o.coalesce(pkts)
    assert [len(iov) for iov in out] == [4, 2]


def test_pure_ack_ends_the_flow_run_and_stays_in_place() -> None:
    pkts = flow(False, 4)
    ack = tcp_packet(payload=b"", seq=1 + 2000)
    out = o.coalesce([*pkts[:2], ack, *pkts[2:]])
    assert [len(iov) for iov in out] == [4, 2, 4]
    assert flat(out[1]) == bytes(ack)


def test_corrupt_segment_is_not_laundered_when_verifying() -> None:
    pkts = flow(False, 4)
    pkts[2][-1] ^= 0xFF
    out = o.coalesce(pkts, verify_csum=True)
    assert [len(iov) for iov in out] == [4, 2, 2]
    assert flat(out[1]) == bytes(pkts[2])
    assert len(o.coalesce(pkts, verify_csum=False)) == 1


def test_partial_csum_peer_writes_tcp_and_udp_as_checksum_pending() -> None:
    tcp = tcp_packet(payload=b"", full_csum=False)
    udp = udp_packet()
    icmp = bytearray(ip_header(False, 1, 8, bytes(4), bytes(4)) + bytes(8))
    out = o.coalesce([tcp, udp, icmp], partial_csum_peer=True)
    hdrs = [o.parse_vnet_hdr(iov[0]) for iov in out]
    assert [(h.flags, h.csum_start, h.csum_offset) for h in hdrs[:2]] == [(1, 20, 16), (1, 20, 6)]
    assert hdrs[2] == o.VirtioNetHdr()


def test_merge_stops_before_64k() -> None:
    pkts = flow(False, 80, mss=1400)
    out = o.coalesce(pkts)
    assert all(len(flat(iov)) <= 0xFFFF for iov in out)
    assert len(out) == 2
    assert b"".join(payload_of(flat(iov)) for iov in out) == b"".join(payload_of(p) for p in pkts)


def test_trailing_padding_is_trimmed_to_the_ip_length() -> None:
    pkts = [p + bytes(16 - len(p) % 16) for p in flow(False, 3)]  # WireGuard pads plaintext to 16 bytes
    out = o.coalesce(pkts)
    assert len(out) == 1
    assert payload_of(flat(out[0])) == b"".join(bytes([i]) * 1000 for i in range(3))


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_coalesce_preserves_each_flows_byte_stream(data: st.DataObject) -> None:
    """Whatever the interleaving, each flow's payload bytes come out in order and complete."""
    flows = {
        sport: flow(data.draw(st.booleans()), data.draw(st.integers(1, 8)), sport=sport)
        for sport in (1, 2, 3)
    }
    order = data.draw(st.permutations([sp for sp, pk in flows.items() for _ in pk]))
    queues = {sp: list(pk) for sp, pk in flows.items()}
    batch = [queues[sp].pop(0) for sp in order]
    out = o.coalesce(batch)
    got: dict[int, bytes] = {1: b"", 2: b"", 3: b""}
    for iov in out:
        pkt = flat(iov)
        got[int.from_bytes(pkt[l4_off(pkt) : l4_off(pkt) + 2], "big")] += payload_of(pkt)
    for sp, pk in flows.items():
        assert got[sp] == b"".join(payload_of(p) for p in pk)


def test_parse_ip_rejects_garbage_with_our_error() -> None:
    for bad in (b"", b"\x45" + bytes(5), b"\x60" + bytes(10), b"\x15" + bytes(30)):
        with pytest.raises(OffloadError):
            o.parse_ip(bad)
