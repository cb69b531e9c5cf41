"""Credentials for the control plane: the cluster CA, coordinator and node certificates, gRPC TLS credentials.

Trust model
-----------
* **The cluster CA** (``ca.key`` + ``ca.crt`` in every coordinator's data dir) is the root of trust of one
  coordinator cluster and its mesh. It is created once, when the first coordinator bootstraps the cluster, and
  a joining coordinator receives it in the *cluster credentials bundle* (CA certificate + CA key,
  encrypted; :func:`export_cluster_bundle`). Every coordinator holds the CA key because any of them may sign
  a node's CSR at ``Register``. Whoever holds ``ca.key`` can mint coordinators: guard it above all else.
* **A coordinator certificate** (``coord.crt`` / ``coord.key``, serverAuth + clientAuth, 1 year) proves "this
  TLS endpoint is member ``<member_id>`` of cluster ``<cluster_id>``": URI SAN
  ``tunnelmesh://cluster/<cluster_id>/coord/<member_id>`` (read by servers from the auth context) and DNS SAN
  ``<member_id>.coord.<cluster_id>.tunnelmesh.invalid`` (checked by clients, see
  :func:`coordinator_server_name`), plus the coordinator's real DNS names and IPs. The Raft port requires
  it (mutual TLS), and :class:`PeerAuthInterceptor` checks the URI on every call, because node certificates
  come from the same CA and pass the TLS layer there too.
* **A node certificate** (clientAuth only, 30 days) proves "this TLS client is node ``<node_id>`` of mesh
  ``<mesh_id>``": URI SAN ``tunnelmesh://mesh/<mesh_id>/node/<node_id>``, no DNS names. The node generates
  its TLS key (P-256, separate from its WireGuard X25519 key, which cannot sign) and sends only a CSR; the CA
  takes nothing from the CSR but the public key, so a node cannot ask for another identity.
* **Nodes pin the CA**: the join token carries the CA fingerprint (SHA-256 of its DER); the node accepts a CA
  certificate only if it matches (:func:`verify_pinned_ca`) and then trusts that CA alone, never system roots.
* **What a stolen node certificate + key allows**: acting as that one node towards coordinators (watch its
  config, report its endpoints) until the certificate expires or the node is removed from the mesh state.
  It cannot act as a coordinator: no serverAuth EKU, no coordinator DNS name (clients refuse it as a server),
  and :func:`authorize_coordinator` refuses its URI on the Raft port. gRPC Python has no CRL support, so the
  coordinator must also check that the node still exists (and, ideally, that the certificate's fingerprint is
  the one recorded at registration) on every call: :class:`PeerIdentity` carries what that check needs.
* **What a stolen coordinator key allows**: impersonating that member until its certificate expires; replace
  the member (new id) and rotate. A stolen CA key allows everything: rotate the CA (docs/security.md).

Keys are ECDSA P-256, not ed25519: gRPC's BoringSSL does not offer ed25519 in its TLS 1.3 signature
algorithms, so a handshake with an ed25519 certificate fails with ``NO_COMMON_SIGNATURE_ALGORITHMS`` (tested
with grpcio 1.85.1). P-256 is what every TLS stack, ``openssl`` and hardware key store supports.

gRPC Python servers either *require* a verified client certificate or *do not request one at all* (there is no
"request but do not require" setting), so the public API port cannot make client certificates optional: it is
server-authenticated TLS (Register with a join token, admin bearer tokens, node bearer tokens), and
node-certificate authentication needs a port with ``require_client_auth=True`` (the same ``grpc.Server`` can
listen on both). See docs/security.md.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as UnsupportedAlgorithmError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnelmesh import hostaddr
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.fsutil import FileTooLargeError, NotRegularFileError, read_regular_file, write_atomic

if TYPE_CHECKING:
    from tunnelmesh.config import TlsConfig

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CA_VALIDITY",
    "COORDINATOR_CERT_FILE",
    "COORDINATOR_KEY_FILE",
    "COORDINATOR_VALIDITY",
    "NODE_VALIDITY",
    "CertificateAuthority",
    "CoordinatorCredentials",
    "PeerAuthInterceptor",
    "PeerIdentity",
    "PeerKind",
    "PkiError",
    "TlsIdentity",
    "authorize_coordinator",
    "authorize_node",
    "ca_cluster_id",
    "ca_fingerprint",
    "channel_credentials",
    "coordinator_channel_options",
    "coordinator_server_name",
    "coordinator_uri",
    "create_ca",
    "create_node_csr",
    "export_cluster_bundle",
    "fetch_pinned_ca",
    "fetch_server_chain",
    "import_cluster_bundle",
    "issue_coordinator_identity",
    "issue_node_certificate",
    "load_ca",
    "load_coordinator_credentials",
    "load_identity",
    "load_operator_credentials",
    "needs_renewal",
    "new_private_key",
    "node_uri",
    "parse_identity_uri",
    "peer_identity",
    "save_ca",
    "save_identity",
    "served_ca",
    "server_credentials",
    "verify_node_certificate",
    "verify_pinned_ca",
]

CA_KEY_FILE: Final = "ca.key"
CA_CERT_FILE: Final = "ca.crt"
COORDINATOR_KEY_FILE: Final = "coord.key"
COORDINATOR_CERT_FILE: Final = "coord.crt"

CA_VALIDITY: Final = timedelta(days=3650)
COORDINATOR_VALIDITY: Final = timedelta(days=365)
NODE_VALIDITY: Final = timedelta(days=30)
# Backdate notBefore so a peer whose clock is a little behind does not refuse a certificate issued just now.
CLOCK_SKEW: Final = timedelta(minutes=5)

KEY_FILE_MODE: Final = 0o600
CERT_FILE_MODE: Final = 0o644
# PBKDF2-HMAC-SHA256 rounds for the bundle (OWASP 2023); ~0.15 s per export or import on this machine class.
BUNDLE_KDF_ROUNDS: Final = 600_000
BUNDLE_MIN_SECRET_LEN: Final = 16

URI_SCHEME: Final = "tunnelmesh"
SERVER_NAME_SUFFIX: Final = "tunnelmesh.invalid"  # RFC 6761: never resolves, so it names an identity only
_ORG: Final = "TunnelMesh"

_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # cluster and member ids (DNS labels)
_ID_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?")  # mesh and node ids
_URI_RE = re.compile(rf"{URI_SCHEME}://(cluster|mesh)/([^/]+)/(coord|node)/([^/]+)")

PrivateKey = ec.EllipticCurvePrivateKey
# Keys an operator may bring for a coordinator certificate: what BoringSSL signs TLS 1.3 handshakes with.
TlsKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_log = logging.getLogger(__name__)
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class PkiError(TunnelMeshError):
    """A certificate, key or TLS peer was missing, invalid, expired or not who it had to be."""


class PeerKind(enum.StrEnum):
    COORDINATOR = "coordinator"
    NODE = "node"


# ------------------------------------------------------------------------------------------------------------
# Identities in certificates


def _check_label(value: str, what: str) -> str:
    if not _LABEL_RE.fullmatch(value):
        raise PkiError(f"{what} {value!r} is not a DNS label (1-63 lowercase letters, digits or '-')")
    return value


def _check_id(value: str, what: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise PkiError(f"{what} {value!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return value


def coordinator_uri(cluster_id: str, member_id: str) -> str:
    """The URI SAN naming coordinator ``member_id`` of cluster ``cluster_id``."""
    cluster = _check_label(cluster_id, "cluster id")
    return f"{URI_SCHEME}://cluster/{cluster}/coord/{_check_label(member_id, 'member id')}"


def node_uri(mesh_id: str, node_id: str) -> str:
    """The URI SAN naming node ``node_id`` of mesh ``mesh_id``."""
    return f"{URI_SCHEME}://mesh/{_check_id(mesh_id, 'mesh id')}/node/{_check_id(node_id, 'node id')}"


def coordinator_server_name(cluster_id: str, member_id: str | None = None) -> str:
    """The DNS SAN a client checks (``grpc.ssl_target_name_override``) to pin a coordinator's identity.

    gRPC Python gives a client no way to inspect the server's certificate after the handshake; its only hook
    is the host name check. So every coordinator certificate carries ``<member>.coord.<cluster>.`` and
    ``coord.<cluster>.`` under ``tunnelmesh.invalid``, and a client that overrides the target name with one of
    them accepts exactly that member, or any coordinator of that cluster, whatever address it dialled.
    """
    cluster = _check_label(cluster_id, "cluster id")
    if member_id is None:
        return f"coord.{cluster}.{SERVER_NAME_SUFFIX}"
    return f"{_check_label(member_id, 'member id')}.coord.{cluster}.{SERVER_NAME_SUFFIX}"


def coordinator_channel_options(cluster_id: str, member_id: str | None = None) -> list[tuple[str, str]]:
    """Channel options that make a client accept only that coordinator (or any of the cluster's)."""
    name = coordinator_server_name(cluster_id, member_id)
    return [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]


def parse_identity_uri(uri: str) -> tuple[PeerKind, str, str]:
    """``tunnelmesh://cluster/C/coord/M`` -> (COORDINATOR, C, M); ``.../mesh/X/node/N`` -> (NODE, X, N)."""
    match = _URI_RE.fullmatch(uri)
    if match is None or (match[1], match[3]) not in {("cluster", "coord"), ("mesh", "node")}:
        raise PkiError(f"{uri!r} is not a TunnelMesh identity URI (tunnelmesh://cluster/<id>/coord/<id>)")
    if match[3] == "coord":
        return PeerKind.COORDINATOR, _check_label(match[2], "cluster id"), _check_label(match[4], "member id")
    return PeerKind.NODE, _check_id(match[2], "mesh id"), _check_id(match[4], "node id")


def _identity_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URI_SCHEME + ":")
    ]


# ------------------------------------------------------------------------------------------------------------
# Keys, certificates, fingerprints


def new_private_key() -> PrivateKey:
    """A fresh ECDSA P-256 key (see the module comment for why not ed25519)."""
    return ec.generate_private_key(ec.SECP256R1())


def _check_key(key: object, where: str) -> PrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{where}: expected an ECDSA P-256 private key, found {type(key).__name__}")
    return key


def _check_operator_key(key: object, where: str) -> TlsKey:
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
        return key
    raise PkiError(f"{where}: expected an ECDSA P-256/P-384 or RSA (2048+ bits) private key")


def _key_pem(key: TlsKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _same_key(cert: x509.Certificate, key: TlsKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def _fmt(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise PkiError("`now` must be timezone-aware (UTC)")
    return now


def ca_fingerprint(cert: x509.Certificate | bytes) -> str:
    """``sha256:<hex>`` of the certificate's DER: what a join token carries to pin the CA."""
    return _fingerprint(cert)


def _fingerprint(cert: x509.Certificate | bytes) -> str:
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _normalise_fingerprint(fingerprint: str) -> str:
    text = fingerprint.strip().lower().removeprefix("sha256:").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise PkiError(
            f"CA fingerprint {fingerprint!r} is malformed: expected sha256:<64 hex digits> "
            f"(as in the join token)"
        )
    return "sha256:" + text


def verify_pinned_ca(ca_pem: bytes, fingerprint: str) -> list[x509.Certificate]:
    """Return the CA certificate(s) in ``ca_pem`` if one of them matches the pinned ``fingerprint``.

    Only the matching certificate is returned: the others in the bundle are not covered by the pin.
    """
    expected = _normalise_fingerprint(fingerprint)
    certs = _parse_pem_certs(ca_pem, "CA certificates received from the coordinator")
    pinned = [c for c in certs if hmac.compare_digest(ca_fingerprint(c), expected)]
    if not pinned:
        seen = ", ".join(ca_fingerprint(c) for c in certs)
        raise PkiError(
            f"CA certificate does not match the pinned fingerprint {expected} (received {seen}); the "
            f"coordinator is not the one the join token was made for, or the token is stale"
        )
    return pinned


def fetch_server_chain(host: str, port: int, *, timeout: float = 5.0) -> list[x509.Certificate]:
    """The certificate chain a TLS server sends, read WITHOUT verifying it (leaf first).

    Only for callers that authenticate what they get by other means: a CA pin (:func:`fetch_pinned_ca`) or a
    secret checked afterwards (a joining coordinator compares the bundle's CA, opened with the join secret,
    with the CA it connected with). Blocking: run it in a thread from asyncio code.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # see above: the caller authenticates the result
    context.set_alpn_protocols(["h2"])  # gRPC servers refuse a handshake without ALPN h2
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
        ):
            # Public in Python 3.13; on 3.11/3.12 the same method lives on the private _sslobj.
            getter = getattr(tls, "get_unverified_chain", None) or getattr(
                getattr(tls, "_sslobj", None), "get_unverified_chain", None
            )
            if getter is None:
                raise PkiError("this Python's ssl module cannot return the server's certificate chain")
            served = getter() or []
    except OSError as exc:
        raise PkiError(
            f"{host}:{port}: cannot fetch the CA certificate from the TLS handshake: {exc}"
        ) from None
    ders = [c if isinstance(c, bytes) else c.public_bytes(2) for c in served]  # 2 = _ssl.ENCODING_DER
    try:
        return [x509.load_der_x509_certificate(bytes(der)) for der in ders]
    except ValueError:
        raise PkiError(f"{host}:{port}: the server sent a certificate that cannot be parsed") from None


def served_ca(chain: Sequence[x509.Certificate], where: str) -> x509.Certificate:
    """The CA certificate at the end of a served chain (a coordinator serves leaf + CA).

    Not authenticated by itself: see :func:`fetch_server_chain`."""
    if len(chain) >= 2 and _is_ca(chain[-1]) and _issued_by(chain[0], chain[-1]):
        return chain[-1]
    raise PkiError(
        f"{where}: the server did not send its CA certificate after its own (not a TunnelMesh coordinator, "
        f"or one with operator-supplied certificates: pass its CA file)"
    )


def ca_cluster_id(ca_cert: x509.Certificate) -> str | None:
    """The cluster id in a CA certificate's subject (OU), set by :func:`create_ca`; None for a foreign CA."""
    subject = ca_cert.subject
    org = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    unit = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if [a.value for a in org] == [_ORG] and len(unit) == 1 and isinstance(unit[0].value, str):
        return unit[0].value
    return None


def fetch_pinned_ca(host: str, port: int, fingerprint: str, *, timeout: float = 5.0) -> x509.Certificate:
    """Fetch the CA certificate from a coordinator's TLS port and return it if it matches the pin.

    The bootstrap step of a join (as kubeadm's CA pin): the node has only an address and the fingerprint
    from the join token. The handshake is deliberately unverified; what makes this safe is that only a
    certificate whose SHA-256 equals the pin is returned, whoever served it. Blocking: run it in a thread
    from asyncio code.
    """
    expected = _normalise_fingerprint(fingerprint)
    for cert in fetch_server_chain(host, port, timeout=timeout):
        if hmac.compare_digest(ca_fingerprint(cert), expected):
            return cert
    raise PkiError(
        f"{host}:{port}: no certificate the server sent matches the pinned CA fingerprint {expected}; "
        f"this is not a coordinator of the mesh the join token was made for"
    )


def needs_renewal(cert: x509.Certificate, now: datetime, margin: timedelta | None = None) -> bool:
    """True once ``now`` is within ``margin`` of expiry (default: the last third of the lifetime)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if margin is None:
        margin = (end - start) / 3
    return now < start or now >= end - margin


def _check_validity(cert: x509.Certificate, now: datetime, where: str) -> None:
    if now < cert.not_valid_before_utc:
        raise PkiError(
            f"{where}: certificate is not valid before {_fmt(cert.not_valid_before_utc)} (now {_fmt(now)}); "
            f"check this machine's clock"
        )
    if now >= cert.not_valid_after_utc:
        raise PkiError(f"{where}: certificate expired on {_fmt(cert.not_valid_after_utc)}; renew it")


def _parse_pem_certs(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PkiError(f"{where}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)") from None
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chains_to(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]) -> bool:
    # Walk leaf -> intermediates -> an anchor; enough for the short chains an operator supplies, and the TLS
    # stack re-verifies everything (including validity and EKU) at each handshake.
    current = chain[0]
    rest = list(chain[1:])
    for _ in range(len(chain) + 1):
        if any(_issued_by(current, a) for a in anchors):
            return True
        parent = next((c for c in rest if _is_ca(c) and _issued_by(current, c)), None)
        if parent is None:
            return False
        rest.remove(parent)
        current = parent
    return False


# ------------------------------------------------------------------------------------------------------------
# Files


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write atomically with ``mode`` (temp file, fsync, rename): a crash never leaves a torn or
    world-readable key. Without ``overwrite`` an existing file is never replaced, even by a racing writer."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"{path.parent}: cannot create directory: {exc.strerror}") from None
    if not overwrite and path.exists():
        raise PkiError(f"{path}: already exists; refusing to replace it")
    try:
        write_atomic(path, data, mode, overwrite=overwrite)
    except FileExistsError:
        raise PkiError(f"{path}: was created concurrently; refusing to replace it") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot write: {exc.strerror}") from None


def _read_file(path: Path, what: str, *, private: bool) -> bytes:
    try:
        data, mode = read_regular_file(path, 1024 * 1024)
    except FileNotFoundError:
        raise PkiError(f"{path}: {what} not found") from None
    except NotRegularFileError:
        raise PkiError(f"{path}: the {what} must be a regular file") from None
    except FileTooLargeError as exc:
        raise PkiError(f"{path}: {exc.size} bytes is far too large for a {what}; check the path") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot open the {what}: {exc.strerror}") from None
    # As OpenSSH: a private key others can read may already be leaked; one others can write is not ours.
    if private and mode & 0o077:
        raise PkiError(
            f"{path}: the {what} is accessible by group or others (mode {mode:04o}); "
            f"fix with chmod 600 {path}"
        )
    return data


def _load_key(path: Path, what: str, *, operator_supplied: bool = False) -> TlsKey:
    data = _read_file(path, what, private=not operator_supplied)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(f"{path}: the {what} is encrypted; supply an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithmError):
        raise PkiError(f"{path}: the {what} is not a PEM private key") from None
    if operator_supplied:
        return _check_operator_key(key, str(path))
    return _check_key(key, str(path))


# ------------------------------------------------------------------------------------------------------------
# The cluster CA


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """The cluster CA: certificate and key. ``repr`` shows only the fingerprint."""

    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return ca_fingerprint(self.certificate)

    @property
    def certificate_pem(self) -> bytes:
        return _cert_pem([self.certificate])

    @property
    def cluster_id(self) -> str | None:
        """The cluster id recorded in the CA's subject (OU) by :func:`create_ca`; None for a foreign CA."""
        return ca_cluster_id(self.certificate)

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.fingerprint[:19]}...)"


def _validate_ca(cert: x509.Certificate, key: PrivateKey, where: str) -> CertificateAuthority:
    if not _is_ca(cert):
        raise PkiError(f"{where}: certificate is not a CA (basicConstraints CA:TRUE missing)")
    if not _same_key(cert, key):
        raise PkiError(f"{where}: the CA key does not belong to the CA certificate")
    return CertificateAuthority(cert, key)


def create_ca(
    cluster_id: str, *, now: datetime | None = None, validity: timedelta = CA_VALIDITY
) -> CertificateAuthority:
    """A new self-signed cluster CA (P-256, 10 years). Call once, at cluster bootstrap."""
    at = _now(now)
    key = new_private_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _check_label(cluster_id, "cluster id")),
            x509.NameAttribute(NameOID.COMMON_NAME, f"TunnelMesh cluster CA {cluster_id}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - CLOCK_SKEW)
        .not_valid_after(at + validity)
        # pathlen 0: this CA signs leaves only, so a leaked leaf key can never act as a CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def save_ca(ca: CertificateAuthority, data_dir: str | os.PathLike[str]) -> None:
    """Write ``ca.key`` (0600) and ``ca.crt`` (0644) into ``data_dir``; never replaces an existing CA."""
    directory = Path(data_dir)
    key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
    if key_path.exists() or cert_path.exists():
        raise PkiError(
            f"{directory}: a cluster CA already exists ({CA_KEY_FILE}/{CA_CERT_FILE}); this data dir "
            f"belongs to a cluster. Use another data dir to bootstrap a new one"
        )
    _write_file(key_path, _key_pem(ca.private_key), KEY_FILE_MODE, overwrite=False)
    _write_file(cert_path, ca.certificate_pem, CERT_FILE_MODE, overwrite=False)


def load_ca(data_dir: str | os.PathLike[str], *, now: datetime | None = None) -> CertificateAuthority:
    """Load and check the cluster CA from ``data_dir`` (key mode 0600, key matches, not expired)."""
    directory = Path(data_dir)
    key = _check_key(_load_key(directory / CA_KEY_FILE, "cluster CA key"), str(directory / CA_KEY_FILE))
    cert_path = directory / CA_CERT_FILE
    certs = _parse_pem_certs(_read_file(cert_path, "cluster CA certificate", private=False), str(cert_path))
    ca = _validate_ca(certs[0], key, str(cert_path))
    _check_validity(ca.certificate, _now(now), str(cert_path))
    return ca


# ------------------------------------------------------------------------------------------------------------
# The cluster credentials bundle (what a joining coordinator needs)


def export_cluster_bundle(ca: CertificateAuthority, secret: str) -> bytes:
    """The CA certificate and key as a password-protected PKCS#12 (PBES2 AES-256-CBC, PBKDF2, HMAC-SHA256).

    A standard container, so an operator can inspect it with ``openssl pkcs12 -info``. ``secret`` is a text
    password (PKCS#12 passwords are strings); the join flow should use ``secrets.token_urlsafe(32)``. At
    least 16 characters, since whoever has the bundle and the secret holds the cluster's root of trust.
    """
    if len(secret) < BUNDLE_MIN_SECRET_LEN:
        raise PkiError(
            f"cluster bundle secret is {len(secret)} characters; use at least {BUNDLE_MIN_SECRET_LEN} "
            f"(e.g. secrets.token_urlsafe(32))"
        )
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(BUNDLE_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(secret.encode())
    )
    name = f"tunnelmesh cluster CA {ca.cluster_id or ''}".strip().encode()
    return pkcs12.serialize_key_and_certificates(name, ca.private_key, ca.certificate, None, encryption)


def import_cluster_bundle(
    bundle: bytes, secret: str, *, expected_fingerprint: str | None = None
) -> CertificateAuthority:
    """Open a bundle from :func:`export_cluster_bundle`; with ``expected_fingerprint`` (from the join token)
    refuse a CA other than the pinned one."""
    try:
        key, cert, _ = pkcs12.load_key_and_certificates(bundle, secret.encode())
    except ValueError:
        raise PkiError("cluster credentials bundle: wrong secret, or the bundle is corrupted") from None
    if key is None or cert is None:
        raise PkiError("cluster credentials bundle: must contain the CA certificate and its key")
    ca = _validate_ca(cert, _check_key(key, "cluster credentials bundle"), "cluster credentials bundle")
    if expected_fingerprint is not None:
        verify_pinned_ca(ca.certificate_pem, expected_fingerprint)
    return ca


# ------------------------------------------------------------------------------------------------------------
# Leaf certificates


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """What a TLS endpoint presents: a certificate chain (leaf first) and the leaf's private key."""

    chain: tuple[x509.Certificate, ...]
    private_key: TlsKey = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def chain_pem(self) -> bytes:
        return _cert_pem(self.chain)

    def private_key_pem(self) -> bytes:
        """A method, not a property, so the key is never dumped by accident."""
        return _key_pem(self.private_key)

    def __repr__(self) -> str:
        until = _fmt(self.certificate.not_valid_after_utc)
        return f"TlsIdentity({self.certificate.subject.rfc4514_string()}, until {until})"


def _leaf_builder(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    san: list[x509.GeneralName],
    eku: list[x509.ObjectIdentifier],
    at: datetime,
    validity: timedelta,
) -> x509.Certificate:
    ca_expiry = ca.certificate.not_valid_after_utc
    if at >= ca_expiry:
        raise PkiError(f"cluster CA expired on {_fmt(ca_expiry)}; it can issue nothing until it is rotated")
    not_after = min(at + validity, ca_expiry)  # never outlive the issuer
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False
        )
        .sign(ca.private_key, hashes.SHA256())
    )


def _coordinator_sans(
    cluster_id: str,
    member_id: str,
    dns_names: Iterable[str],
    ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> list[x509.GeneralName]:
    san: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(coordinator_uri(cluster_id, member_id)),
        x509.DNSName(coordinator_server_name(cluster_id, member_id)),
        x509.DNSName(coordinator_server_name(cluster_id)),
    ]
    for name in dns_names:
        entry = x509.DNSName(name.strip().lower().rstrip("."))
        if entry.value and entry not in san:
            san.append(entry)
    for ip in ip_addresses:
        try:
            entry_ip = x509.IPAddress(ipaddress.ip_address(ip))
        except ValueError:
            raise PkiError(f"coordinator certificate: {ip!r} is not an IP address") from None
        if entry_ip not in san:
            san.append(entry_ip)
    return san


def issue_coordinator_identity(
    ca: CertificateAuthority,
    cluster_id: str,
    member_id: str,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    private_key: PrivateKey | None = None,
    now: datetime | None = None,
    validity: timedelta = COORDINATOR_VALIDITY,
) -> TlsIdentity:
    """A coordinator's key (new unless given) and certificate: serverAuth + clientAuth, SANs for its names
    and addresses plus its identity URI and identity DNS names (see the module comment).

    The chain is leaf + CA: sending the root costs a few hundred bytes and lets a joining node fetch the CA
    from any coordinator and check it against the pin in its join token (:func:`fetch_pinned_ca`).
    """
    key = private_key if private_key is not None else new_private_key()
    cert = _leaf_builder(
        ca,
        key.public_key(),
        f"coordinator {member_id}",
        _coordinator_sans(cluster_id, member_id, dns_names, ip_addresses),
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        _now(now),
        validity,
    )
    return TlsIdentity((cert, ca.certificate), key)


def create_node_csr(private_key: PrivateKey) -> bytes:
    """The node's PKCS#10 request (DER) for ``RegisterRequest.csr_der``; no name in it: the CA decides."""
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def issue_node_certificate(
    ca: CertificateAuthority,
    csr_der: bytes,
    *,
    mesh_id: str,
    node_id: str,
    now: datetime | None = None,
    validity: timedelta = NODE_VALIDITY,
) -> x509.Certificate:
    """Sign a node's CSR: clientAuth only, identity URI set here. Only the CSR's public key is used, after its
    signature proves the requester holds the private key; subject and extensions in the CSR are ignored."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise PkiError("node CSR: not a DER-encoded PKCS#10 certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithmError):
        valid = False
    if not valid:
        raise PkiError("node CSR: signature does not verify; the request was corrupted or forged")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise PkiError(
            f"node CSR: key must be ECDSA P-256 (what gRPC's TLS accepts), got {type(public_key).__name__}"
        )
    return _leaf_builder(
        ca,
        public_key,
        f"node {node_id}",
        [x509.UniformResourceIdentifier(node_uri(mesh_id, node_id))],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        _now(now),
        validity,
    )


def verify_node_certificate(
    chain_pem: bytes,
    private_key: PrivateKey,
    ca_certificates: Sequence[x509.Certificate],
    *,
    mesh_id: str,
    node_id: str,
    now: datetime | None = None,
) -> TlsIdentity:
    """Node side, after Register: check the returned chain is for our key, names us, is signed by the pinned
    CA and is currently valid. Returns the identity to present."""
    where = "client certificate from the coordinator"
    chain = tuple(_parse_pem_certs(chain_pem, where))
    leaf = chain[0]
    if not _same_key(leaf, private_key):
        raise PkiError(f"{where}: issued for another key than this node's TLS key")
    if not _chains_to(chain, ca_certificates):
        raise PkiError(f"{where}: not signed by the pinned mesh CA")
    expected = node_uri(mesh_id, node_id)
    if _identity_uris(leaf) != [expected]:
        raise PkiError(f"{where}: SAN mismatch: names {_identity_uris(leaf)}, expected [{expected!r}]")
    _check_validity(leaf, _now(now), where)
    return TlsIdentity(chain, private_key)


def save_identity(
    identity: TlsIdentity, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> None:
    """Write the key (0600) then the chain; replaces existing files (renewal)."""
    _write_file(Path(key_path), identity.private_key_pem(), KEY_FILE_MODE, overwrite=True)
    _write_file(Path(cert_path), identity.chain_pem, CERT_FILE_MODE, overwrite=True)


def load_identity(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    now: datetime | None = None,
    operator_supplied: bool = False,
) -> TlsIdentity:
    """Load a certificate chain and its key; checks the key matches and the leaf is currently valid.

    ``operator_supplied`` relaxes two rules for files from the operator's own PKI: the key may be RSA or
    P-384, and group-readable (e.g. root:ssl-cert 0640); world access is still refused."""
    identity = _read_identity(Path(cert_path), Path(key_path), operator_supplied=operator_supplied)
    _check_validity(identity.certificate, _now(now), str(cert_path))
    return identity


def _read_identity(cert_file: Path, key_file: Path, *, operator_supplied: bool = False) -> TlsIdentity:
    key = _load_key(key_file, "TLS private key", operator_supplied=operator_supplied)
    chain = tuple(_parse_pem_certs(_read_file(cert_file, "certificate", private=False), str(cert_file)))
    if not _same_key(chain[0], key):
        raise PkiError(f"{cert_file}: the certificate does not belong to the key {key_file}")
    return TlsIdentity(chain, key)


# ------------------------------------------------------------------------------------------------------------
# A coordinator's credentials, generated or supplied by the operator


@dataclass(frozen=True, slots=True)
class CoordinatorCredentials:
    """What a coordinator serves and trusts. ``ca`` is None when the operator supplied the certificates: such
    a cluster cannot sign node CSRs (nodes then authenticate with their node token)."""

    identity: TlsIdentity
    trust_pem: bytes
    ca: CertificateAuthority | None


def load_coordinator_credentials(
    data_dir: str | os.PathLike[str],
    *,
    cluster_id: str,
    member_id: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    now: datetime | None = None,
) -> CoordinatorCredentials:
    """Load the generated CA and this coordinator's certificate from ``data_dir``, issuing a new certificate
    when there is none, it is expired or due for renewal, another CA issued it, or its names no longer match
    (new address, different member id). A key file others can read, or an unreadable file, is an error for
    the operator to look at, not something to paper over."""
    at = _now(now)
    ca = load_ca(data_dir, now=at)
    directory = Path(data_dir)
    cert_path, key_path = directory / COORDINATOR_CERT_FILE, directory / COORDINATOR_KEY_FILE
    wanted_sans = {_san_key(n) for n in _coordinator_sans(cluster_id, member_id, dns_names, ip_addresses)}
    if cert_path.exists() and key_path.exists():
        current = _read_identity(cert_path, key_path)
        if (
            _issued_by(current.certificate, ca.certificate)
            and _sans(current.certificate) == wanted_sans
            and not needs_renewal(current.certificate, at)
        ):
            return CoordinatorCredentials(current, ca.certificate_pem, ca)
    fresh = issue_coordinator_identity(
        ca, cluster_id, member_id, dns_names=dns_names, ip_addresses=ip_addresses, now=at
    )
    save_identity(fresh, cert_path, key_path)
    return CoordinatorCredentials(fresh, ca.certificate_pem, ca)


def _san_key(name: x509.GeneralName) -> str:
    return f"{type(name).__name__}:{name.value}"


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {_san_key(n) for n in names}


def load_operator_credentials(
    tls: TlsConfig,
    *,
    cluster_id: str | None = None,
    member_id: str | None = None,
    now: datetime | None = None,
) -> CoordinatorCredentials:
    """Bring-your-own CA: load ``tls.cert_file``/``key_file``/``ca_file`` and check they fit together.

    The certificate must chain to ``ca_file``, and carry this coordinator's identity URI (and identity DNS
    names if clients pin them); the message says exactly which SAN to add. The key may be
    ECDSA P-256/P-384 or RSA 2048+, group-readable (e.g. root:ssl-cert 0640) but never world-readable.
    """
    if tls.cert_file is None or tls.key_file is None or tls.ca_file is None:
        raise PkiError("tls: set cert_file, key_file and ca_file to use your own CA")
    at = _now(now)
    identity = load_identity(tls.cert_file, tls.key_file, now=at, operator_supplied=True)
    mode = stat.S_IMODE(os.stat(tls.key_file).st_mode)
    if mode & 0o007:
        raise PkiError(
            f"{tls.key_file}: the TLS key is accessible by others (mode {mode:04o}); chmod 640 or 600"
        )
    trust_pem = _read_file(tls.ca_file, "CA certificate", private=False)
    anchors = _parse_pem_certs(trust_pem, str(tls.ca_file))
    if not _chains_to(identity.chain, anchors):
        raise PkiError(f"{tls.cert_file}: not signed by a CA in {tls.ca_file} (tls.ca_file)")
    for anchor in anchors:
        _check_validity(anchor, at, str(tls.ca_file))
    uris = _identity_uris(identity.certificate)
    if cluster_id is not None and member_id is not None:
        expected = coordinator_uri(cluster_id, member_id)
        if expected not in uris:
            raise PkiError(
                f"{tls.cert_file}: SAN mismatch: the certificate must name this coordinator with "
                f"subjectAltName URI:{expected} (and DNS:{coordinator_server_name(cluster_id, member_id)}, "
                f"DNS:{coordinator_server_name(cluster_id)}); it has {uris or 'no TunnelMesh URI'}"
            )
    return CoordinatorCredentials(identity, trust_pem, None)


# ------------------------------------------------------------------------------------------------------------
# gRPC credentials


async def add_secure_port(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials, what: str
) -> int:
    """``server.add_secure_port``, whose failure says only that binding failed: then the server is stopped and
    a ``hostaddr.ListenError`` names the address, ``what`` (its flag or setting) and the OS's reason."""
    try:
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        await server.stop(None)
        raise hostaddr.ListenError(
            address, what, hostaddr.bind_problem(address) or "gRPC could not bind it"
        ) from None


def server_credentials(
    identity: TlsIdentity,
    *,
    trust_pem: bytes | None = None,
    require_client_auth: bool,
    reload: Callable[[], TlsIdentity] | None = None,
) -> grpc.ServerCredentials:
    """TLS server credentials (TLS 1.2+, gRPC default; 1.3 negotiated between TunnelMesh peers).

    ``require_client_auth=True`` (Raft port, node mTLS port): the client must present a certificate chaining
    to ``trust_pem``; then authorize with :func:`authorize_coordinator` / :func:`authorize_node`, since the
    same CA signs both kinds. ``False``: no client certificate is requested at all (gRPC Python cannot make it
    optional); clients authenticate with bearer tokens. ``reload`` (optional) is called at each handshake and
    lets a renewed certificate take effect without restarting the server.
    """
    if require_client_auth and not trust_pem:
        raise PkiError(
            "server credentials: client authentication needs the CA certificate(s) to verify against"
        )
    pairs = [(identity.private_key_pem(), identity.chain_pem)]
    if reload is None:
        return grpc.ssl_server_credentials(
            pairs, root_certificates=trust_pem, require_client_auth=require_client_auth
        )
    served = [identity]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Runs inside gRPC's handshake: a failing reload must keep the current certificate, not kill TLS.
        try:
            fresh = reload()
        except Exception as exc:
            _log.warning("event=tls_reload_failed error=%r", str(exc))
            return None
        if fresh.certificate == served[0].certificate:
            return None  # unchanged
        served[0] = fresh
        return grpc.ssl_server_certificate_configuration(
            [(fresh.private_key_pem(), fresh.chain_pem)], root_certificates=trust_pem
        )

    initial = grpc.ssl_server_certificate_configuration(pairs, root_certificates=trust_pem)
    # The stub says the fetcher returns a configuration; gRPC documents None as "unchanged".
    return grpc.dynamic_ssl_server_credentials(
        initial,
        fetch,  # type: ignore[arg-type]
        require_client_authentication=require_client_auth,
    )


def channel_credentials(trust_pem: bytes, identity: TlsIdentity | None = None) -> grpc.ChannelCredentials:
    """Client credentials that trust exactly ``trust_pem`` (the pinned CA; never the system roots) and present
    ``identity`` as the client certificate if given (coordinator->coordinator, node with a certificate).

    Pair with :func:`coordinator_channel_options` so the server must also *be* the expected coordinator.
    """
    if not trust_pem or not trust_pem.strip():
        # grpc falls back to the system roots when root_certificates is None: any public CA could then
        # impersonate a coordinator.
        raise PkiError("channel credentials: the pinned CA certificate is required (empty trust bundle)")
    _parse_pem_certs(trust_pem, "trusted CA bundle")
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=trust_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=trust_pem,
        private_key=identity.private_key_pem(),
        certificate_chain=identity.chain_pem,
    )


# ------------------------------------------------------------------------------------------------------------
# Peer identity on the server side


class _HasAuthContext(Protocol):
    # grpc.ServicerContext and grpc.aio.ServicerContext both fit; values are lists of bytes at runtime
    # (the type stubs say bytes), so _auth_values accepts either.
    def auth_context(self) -> Mapping[str, object]: ...


def _auth_values(auth: Mapping[str, object], key: str) -> list[bytes]:
    value = auth.get(key)
    if value is None:
        return []
    if isinstance(value, bytes | str):
        value = [value]
    if not isinstance(value, Iterable):
        return []
    return [v.encode() if isinstance(v, str) else bytes(v) for v in value if isinstance(v, bytes | str)]


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who the TLS client is, from its verified certificate.

    ``scope_id`` is the cluster id (coordinators) or mesh id (nodes); ``peer_id`` the member id or node id.
    ``fingerprint`` (SHA-256 of the leaf DER) lets the caller compare with the certificate recorded at
    registration, which is how a node removed before its certificate expires is refused.
    """

    kind: PeerKind
    scope_id: str
    peer_id: str
    uri: str
    fingerprint: str
    serial_number: int
    not_valid_after: datetime


def peer_identity(context: _HasAuthContext) -> PeerIdentity | None:
    """The TunnelMesh identity of the client of this call, or None if it presented no certificate.

    Only meaningful on a port with ``require_client_auth=True``: there gRPC has verified the chain against the
    trusted CA before the call reaches us. Raises :class:`PkiError` for a certificate without exactly one
    TunnelMesh identity URI.
    """
    auth = context.auth_context()
    if _auth_values(auth, "transport_security_type") != [b"ssl"]:
        return None
    pems = _auth_values(auth, "x509_pem_cert")
    if not pems:
        return None
    cert = _parse_pem_certs(pems[0], "peer certificate")[0]
    uris = _identity_uris(cert)
    subject = cert.subject.rfc4514_string()
    if len(uris) != 1:
        raise PkiError(
            f"peer certificate {subject!r}: expected one TunnelMesh identity URI SAN, found {uris}"
        )
    kind, scope_id, peer_id = parse_identity_uri(uris[0])
    return PeerIdentity(
        kind=kind,
        scope_id=scope_id,
        peer_id=peer_id,
        uri=uris[0],
        fingerprint=_fingerprint(cert),
        serial_number=cert.serial_number,
        not_valid_after=cert.not_valid_after_utc,
    )


def authorize_coordinator(
    context: _HasAuthContext, cluster_id: str, *, members: Iterable[str] | None = None
) -> PeerIdentity:
    """The calling coordinator's identity, or :class:`PkiError` unless it is a coordinator of ``cluster_id``
    (and, with ``members``, one of them). Call on every Raft RPC: node certificates pass the TLS layer too."""
    peer = peer_identity(context)
    if peer is None:
        raise PkiError("peer presented no client certificate; coordinators must use mutual TLS")
    if peer.kind is not PeerKind.COORDINATOR or peer.scope_id != cluster_id:
        raise PkiError(f"peer {peer.uri} is not a coordinator of cluster {cluster_id!r}")
    if members is not None and peer.peer_id not in set(members):
        raise PkiError(f"peer {peer.uri} is not a member of cluster {cluster_id!r}")
    return peer


def authorize_node(context: _HasAuthContext, mesh_id: str, *, node_id: str | None = None) -> PeerIdentity:
    """The calling node's identity, or :class:`PkiError` unless it is node ``node_id`` (if given) of
    ``mesh_id``."""
    peer = peer_identity(context)
    if peer is None:
        raise PkiError("peer presented no client certificate")
    if peer.kind is not PeerKind.NODE or peer.scope_id != mesh_id:
        raise PkiError(f"peer {peer.uri} is not a node of mesh {mesh_id!r}")
    if node_id is not None and peer.peer_id != node_id:
        raise PkiError(f"peer {peer.uri} may act only as itself, not as node {node_id!r}")
    return peer


class PeerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC whose TLS peer fails ``check`` with PERMISSION_DENIED before the servicer runs, so
    no method on the Raft port can forget to authenticate its caller.

    ``check`` is e.g. ``lambda ctx: authorize_coordinator(ctx, cluster_id)``; ``exempt`` lists full method
    names that skip it (``/grpc.health.v1.Health/Check``). For ``grpc.aio`` servers, like the control plane.
    """

    def __init__(
        self, check: Callable[[_HasAuthContext], PeerIdentity], *, exempt: Iterable[str] = ()
    ) -> None:
        self._check = check
        self._exempt = frozenset(exempt)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        guarded: grpc.RpcMethodHandler[_Req, _Resp] = _guarded(handler, self._check)
        return guarded


async def _authorize_or_abort(context: Any, check: Callable[[_HasAuthContext], PeerIdentity]) -> None:
    try:
        check(context)
    except PkiError as exc:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))


def _guarded(handler: Any, check: Callable[[_HasAuthContext], PeerIdentity]) -> Any:
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if not handler.response_streaming:
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary_response(request: Any, context: Any) -> Any:
            await _authorize_or_abort(context, check)
            return await inner(request, context)

        make = (
            grpc.stream_unary_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make(unary_response, **codec)

    inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

    async def streaming_response(request: Any, context: Any) -> AsyncIterator[Any]:
        await _authorize_or_abort(context, check)
        result = inner(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            await result  # a servicer that writes with context.write()

    make = (
        grpc.stream_stream_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_stream_rpc_method_handler
    )
    return make(streaming_response, **codec)
