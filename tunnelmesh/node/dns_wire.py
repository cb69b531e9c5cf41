"""DNS messages on the wire (RFC 1035 §4, EDNS0 from RFC 6891): frozen dataclasses, ``parse``, ``to_bytes``.

Theory of operation. This module is sans-I/O: bytes in, a :class:`Message` out, and back. It knows nothing of
zones or sockets (the resolver in ``dns.py`` does). Names are tuples of raw labels (``(b"db", b"mesh",
b"internal")``; the root is ``()``), exactly as on the wire, so parsing then encoding loses nothing but the
compression layout; compare names with :func:`name_key` (ASCII case folding, RFC 4343).

Parsing is strict because the input comes from anyone who can reach the resolver: every section is read to
its counts, every record's data must fill its RDLENGTH exactly, nothing may follow the last record, labels are
at most 63 bytes and names 255, and a compression pointer must point strictly backwards (so no loop can
exist). Any malformed input raises :class:`DnsFormatError` and nothing else; when the 12-byte header could be
read the error carries it, so a server can answer FORMERR with the right id (RFC 1035 §4.1.1).

Encoding compresses every owner name and the names inside CNAME and SOA data (the types RFC 3597 §4 allows)
against names written earlier; compression keys are case-sensitive so a round trip keeps every name's case.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Final

from tunnelmesh.errors import ProtocolError

Name = tuple[bytes, ...]

TYPE_A: Final = 1
TYPE_NS: Final = 2
TYPE_CNAME: Final = 5
TYPE_SOA: Final = 6
TYPE_TXT: Final = 16
TYPE_AAAA: Final = 28
TYPE_OPT: Final = 41
TYPE_IXFR: Final = 251
TYPE_AXFR: Final = 252
TYPE_ANY: Final = 255

CLASS_IN: Final = 1
CLASS_ANY: Final = 255

OPCODE_QUERY: Final = 0

RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NXDOMAIN: Final = 3
RCODE_NOTIMP: Final = 4
RCODE_REFUSED: Final = 5
RCODE_BADVERS: Final = 16  # extended (RFC 6891 §6.1.3): upper 8 bits travel in the OPT record

HEADER_SIZE: Final = 12
MAX_LABEL: Final = 63
MAX_NAME_WIRE: Final = 255  # RFC 1035 §3.1: labels, their length bytes and the root byte
MAX_CHARACTER_STRING: Final = 255
MAX_MESSAGE: Final = 65535  # a TCP message's 2-byte length prefix caps it
PLAIN_UDP_SIZE: Final = 512  # without EDNS0 (RFC 1035 §4.2.1)
MAX_POINTER_OFFSET: Final = 0x3FFF

_HEADER: Final = struct.Struct(">HHHHHH")
_RR_FIXED: Final = struct.Struct(">HHIH")  # type, class, ttl, rdlength
_QUESTION_FIXED: Final = struct.Struct(">HH")
_SOA_FIXED: Final = struct.Struct(">IIIII")
_U16: Final = struct.Struct(">H")


class DnsFormatError(ProtocolError):
    """A DNS message that is not well-formed. ``header`` is set when the 12-byte header could be read."""

    def __init__(self, message: str, header: Header | None = None) -> None:
        super().__init__(message)
        self.header = header


# -- names ---------------------------------------------------------------------------------------------------


def _check_name(name: Name) -> None:
    size = 1
    for label in name:
        if not 1 <= len(label) <= MAX_LABEL:
            raise ValueError(f"DNS label {label!r} must be 1-{MAX_LABEL} bytes")
        size += len(label) + 1
    if size > MAX_NAME_WIRE:
        raise ValueError(f"DNS name of {size} bytes is longer than {MAX_NAME_WIRE}")


def name_from_text(text: str) -> Name:
    """``"db.Mesh.internal."`` -> ``(b"db", b"Mesh", b"internal")``; ``""`` or ``"."`` is the root.

    ASCII only (names in the mesh are DNS labels); raises ``ValueError`` naming the problem.
    """
    stripped = text[:-1] if text.endswith(".") else text
    if not stripped:
        return ()
    try:
        labels = tuple(label.encode("ascii") for label in stripped.split("."))
    except UnicodeEncodeError:
        raise ValueError(
            f"DNS name {text!r} is not ASCII (internationalised names are not supported)"
        ) from None
    _check_name(labels)
    return labels


def name_to_text(name: Name) -> str:
    """Presentation form with a trailing dot; bytes that are not printable are escaped as ``\\DDD``."""
    if not name:
        return "."
    out = []
    for label in name:
        chars = []
        for b in label:
            if b in b".\\":
                chars.append("\\" + chr(b))
            elif 0x21 <= b <= 0x7E:
                chars.append(chr(b))
            else:
                chars.append(f"\\{b:03d}")
        out.append("".join(chars))
    return ".".join(out) + "."


def name_key(name: Name) -> Name:
    """The name folded to lowercase (ASCII only, RFC 4343), for comparisons and lookups."""
    return tuple(label.lower() for label in name)


def is_subdomain(name: Name, domain: Name) -> bool:
    """Whether ``name`` equals ``domain`` or lies below it (both already folded with :func:`name_key`)."""
    return len(name) >= len(domain) and name[len(name) - len(domain) :] == domain


# -- messages ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed 12-byte header without its counts (the sections' lengths give those)."""

    id: int
    qr: bool = False
    opcode: int = OPCODE_QUERY
    aa: bool = False
    tc: bool = False
    rd: bool = False
    ra: bool = False
    z: bool = False
    ad: bool = False
    cd: bool = False
    rcode: int = RCODE_NOERROR  # the low 4 bits; see Message.edns for the extended part

    def __post_init__(self) -> None:
        if not 0 <= self.id <= 0xFFFF or not 0 <= self.opcode <= 15 or not 0 <= self.rcode <= 15:
            raise ValueError(f"header field out of range: {self}")

    @property
    def flags(self) -> int:
        return (
            self.qr << 15
            | self.opcode << 11
            | self.aa << 10
            | self.tc << 9
            | self.rd << 8
            | self.ra << 7
            | self.z << 6
            | self.ad << 5
            | self.cd << 4
            | self.rcode
        )

    @classmethod
    def from_flags(cls, id_: int, flags: int) -> Header:
        return cls(
            id=id_,
            qr=bool(flags & 0x8000),
            opcode=(flags >> 11) & 0xF,
            aa=bool(flags & 0x0400),
            tc=bool(flags & 0x0200),
            rd=bool(flags & 0x0100),
            ra=bool(flags & 0x0080),
            z=bool(flags & 0x0040),
            ad=bool(flags & 0x0020),
            cd=bool(flags & 0x0010),
            rcode=flags & 0xF,
        )


@dataclass(frozen=True, slots=True)
class Question:
    name: Name
    qtype: int
    qclass: int = CLASS_IN

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not 0 <= self.qtype <= 0xFFFF or not 0 <= self.qclass <= 0xFFFF:
            raise ValueError(f"question type or class out of range: {self}")


@dataclass(frozen=True, slots=True)
class A:
    address: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class AAAA:
    address: ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class CNAME:
    target: Name

    def __post_init__(self) -> None:
        _check_name(self.target)


@dataclass(frozen=True, slots=True)
class TXT:
    """One or more character-strings of at most 255 bytes each."""

    strings: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.strings or any(len(s) > MAX_CHARACTER_STRING for s in self.strings):
            raise ValueError("TXT data needs 1 or more strings of at most 255 bytes")


@dataclass(frozen=True, slots=True)
class SOA:
    mname: Name
    rname: Name
    serial: int
    refresh: int
    retry: int
    expire: int
    minimum: int

    def __post_init__(self) -> None:
        _check_name(self.mname)
        _check_name(self.rname)
        for v in (self.serial, self.refresh, self.retry, self.expire, self.minimum):
            if not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"SOA field {v} out of range")


@dataclass(frozen=True, slots=True)
class Opaque:
    """The data of any other type (OPT options included), kept as raw bytes."""

    data: bytes


RData = A | AAAA | CNAME | TXT | SOA | Opaque

# The types whose data this module decodes; everything else is Opaque.
_DATA_CLASS: Final[dict[int, type]] = {
    TYPE_A: A,
    TYPE_AAAA: AAAA,
    TYPE_CNAME: CNAME,
    TYPE_TXT: TXT,
    TYPE_SOA: SOA,
}


@dataclass(frozen=True, slots=True)
class ResourceRecord:
    name: Name
    rtype: int
    rclass: int
    ttl: int
    data: RData

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not 0 <= self.rtype <= 0xFFFF or not 0 <= self.rclass <= 0xFFFF or not 0 <= self.ttl <= 0xFFFFFFFF:
            raise ValueError(f"record type, class or ttl out of range: {self}")
        expected = _DATA_CLASS.get(self.rtype, Opaque)
        if not isinstance(self.data, expected):
            raise ValueError(
                f"type {self.rtype} needs {expected.__name__} data, got {type(self.data).__name__}"
            )


@dataclass(frozen=True, slots=True)
class Edns:
    """The OPT pseudo-record (RFC 6891 §6.1): what a client can receive and which EDNS version it speaks."""

    udp_size: int
    extended_rcode: int = 0  # the upper 8 bits of the 12-bit rcode
    version: int = 0
    dnssec_ok: bool = False
    options: bytes = b""

    def to_record(self) -> ResourceRecord:
        ttl = self.extended_rcode << 24 | self.version << 16 | self.dnssec_ok << 15
        return ResourceRecord((), TYPE_OPT, self.udp_size, ttl, Opaque(self.options))

    @classmethod
    def from_record(cls, rr: ResourceRecord) -> Edns:
        options = rr.data.data if isinstance(rr.data, Opaque) else b""
        return cls(
            udp_size=rr.rclass,
            extended_rcode=rr.ttl >> 24,
            version=(rr.ttl >> 16) & 0xFF,
            dnssec_ok=bool(rr.ttl & 0x8000),
            options=options,
        )


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    questions: tuple[Question, ...] = ()
    answers: tuple[ResourceRecord, ...] = ()
    authority: tuple[ResourceRecord, ...] = ()
    additional: tuple[ResourceRecord, ...] = field(default=())

    def opt_records(self) -> list[ResourceRecord]:
        return [rr for rr in self.additional if rr.rtype == TYPE_OPT]

    def edns(self) -> Edns | None:
        """The first OPT record of the additional section, if any (a query with several is malformed)."""
        opts = self.opt_records()
        return Edns.from_record(opts[0]) if opts else None

    def with_header(self, **changes: object) -> Message:
        return replace(self, header=replace(self.header, **changes))  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        """Encode with name compression. The caller checks the length against the transport's limit."""
        w = _Writer()
        w.buf += _HEADER.pack(
            self.header.id,
            self.header.flags,
            len(self.questions),
            len(self.answers),
            len(self.authority),
            len(self.additional),
        )
        for q in self.questions:
            w.name(q.name)
            w.buf += _QUESTION_FIXED.pack(q.qtype, q.qclass)
        for rr in (*self.answers, *self.authority, *self.additional):
            w.record(rr)
        return bytes(w.buf)


def parse(data: bytes) -> Message:
    """Decode a whole message; raises :class:`DnsFormatError` (and nothing else) if it is malformed."""
    if len(data) < HEADER_SIZE:
        raise DnsFormatError(f"message of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    id_, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    header = Header.from_flags(id_, flags)
    r = _Reader(data, header)
    try:
        questions = tuple(r.question() for _ in range(qdcount))
        answers = tuple(r.record() for _ in range(ancount))
        authority = tuple(r.record() for _ in range(nscount))
        additional = tuple(r.record() for _ in range(arcount))
    except ValueError as e:  # a dataclass refused a decoded value
        raise DnsFormatError(str(e), header) from None
    if r.pos != len(data):
        raise DnsFormatError(f"{len(data) - r.pos} bytes after the last record", header)
    return Message(header, questions, answers, authority, additional)


class _Reader:
    def __init__(self, data: bytes, header: Header) -> None:
        self.data = data
        self.header = header
        self.pos = HEADER_SIZE

    def fail(self, what: str) -> DnsFormatError:
        return DnsFormatError(f"{what} at offset {self.pos}", self.header)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"truncated: {n} bytes needed")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def name(self) -> Name:
        labels: list[bytes] = []
        size = 1
        pos = self.pos
        end: int | None = None  # where reading continues after the first pointer
        while True:
            if pos >= len(self.data):
                raise self.fail("truncated name")
            length = self.data[pos]
            if length == 0:
                pos += 1
                break
            kind = length & 0xC0
            if kind == 0xC0:
                if pos + 2 > len(self.data):
                    raise self.fail("truncated compression pointer")
                target = _U16.unpack_from(self.data, pos)[0] & MAX_POINTER_OFFSET
                if target >= pos:  # only strictly backwards: this rules out every loop
                    raise self.fail(f"compression pointer to {target} does not point backwards")
                if end is None:
                    end = pos + 2
                pos = target
                continue
            if kind != 0:
                raise self.fail(f"unsupported label type 0x{kind:02x}")
            if pos + 1 + length > len(self.data):
                raise self.fail("truncated label")
            size += length + 1
            if size > MAX_NAME_WIRE:
                raise self.fail(f"name longer than {MAX_NAME_WIRE} bytes")
            labels.append(self.data[pos + 1 : pos + 1 + length])
            pos += 1 + length
        self.pos = end if end is not None else pos
        return tuple(labels)

    def question(self) -> Question:
        name = self.name()
        qtype, qclass = _QUESTION_FIXED.unpack(self.take(_QUESTION_FIXED.size))
        return Question(name, qtype, qclass)

    def record(self) -> ResourceRecord:
        name = self.name()
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack(self.take(_RR_FIXED.size))
        start = self.pos
        if start + rdlength > len(self.data):
            raise self.fail(f"record data of {rdlength} bytes runs past the end")
        data = self.rdata(rtype, rdlength)
        if self.pos != start + rdlength:
            raise self.fail(f"type {rtype} data does not fill its {rdlength} bytes")
        return ResourceRecord(name, rtype, rclass, ttl, data)

    def rdata(self, rtype: int, rdlength: int) -> RData:
        if rtype == TYPE_A:
            if rdlength != 4:
                raise self.fail(f"A data of {rdlength} bytes (needs 4)")
            return A(ipaddress.IPv4Address(self.take(4)))
        if rtype == TYPE_AAAA:
            if rdlength != 16:
                raise self.fail(f"AAAA data of {rdlength} bytes (needs 16)")
            return AAAA(ipaddress.IPv6Address(self.take(16)))
        if rtype == TYPE_CNAME:
            return CNAME(self.name())
        if rtype == TYPE_SOA:
            mname, rname = self.name(), self.name()
            return SOA(mname, rname, *_SOA_FIXED.unpack(self.take(_SOA_FIXED.size)))
        if rtype == TYPE_TXT:
            end = self.pos + rdlength
            strings = []
            while self.pos < end:
                n = self.take(1)[0]
                strings.append(self.take(n))
            if not strings:
                raise self.fail("TXT record without strings")
            return TXT(tuple(strings))
        return Opaque(self.take(rdlength))


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.offsets: dict[Name, int] = {}

    def name(self, name: Name) -> None:
        for i in range(len(name)):
            suffix = name[i:]
            known = self.offsets.get(suffix)
            if known is not None:
                self.buf += _U16.pack(0xC000 | known)
                return
            if len(self.buf) <= MAX_POINTER_OFFSET:
                self.offsets[suffix] = len(self.buf)
            self.buf.append(len(name[i]))
            self.buf += name[i]
        self.buf.append(0)

    def record(self, rr: ResourceRecord) -> None:
        self.name(rr.name)
        fixed_at = len(self.buf)
        self.buf += _RR_FIXED.pack(rr.rtype, rr.rclass, rr.ttl, 0)
        start = len(self.buf)
        d = rr.data
        if isinstance(d, A | AAAA):
            self.buf += d.address.packed
        elif isinstance(d, CNAME):
            self.name(d.target)
        elif isinstance(d, SOA):
            self.name(d.mname)
            self.name(d.rname)
            self.buf += _SOA_FIXED.pack(d.serial, d.refresh, d.retry, d.expire, d.minimum)
        elif isinstance(d, TXT):
            for s in d.strings:
                self.buf.append(len(s))
                self.buf += s
        else:
            self.buf += d.data
        rdlength = len(self.buf) - start
        if rdlength > 0xFFFF:
            raise ValueError(f"record data of {rdlength} bytes does not fit in RDLENGTH")
        _U16.pack_into(self.buf, fixed_at + 8, rdlength)


def txt_strings(text: bytes) -> tuple[bytes, ...]:
    """Split a TXT value into character-strings of at most 255 bytes (one empty string for empty text)."""
    if not text:
        return (b"",)
    return tuple(text[i : i + MAX_CHARACTER_STRING] for i in range(0, len(text), MAX_CHARACTER_STRING))


def records(name: Name, rtype: int, ttl: int, data: Iterable[RData]) -> tuple[ResourceRecord, ...]:
    """One resource record per datum, all with the same owner, type, class IN and TTL."""
    return tuple(ResourceRecord(name, rtype, CLASS_IN, ttl, d) for d in data)
