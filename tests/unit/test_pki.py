"""Cluster PKI: certificates checked by real TLS stacks, not by our own code.

Every handshake test runs a real gRPC server on loopback (the stock ``grpc.health.v1`` service, plus a tiny
generic ``WhoAmI`` method that reports what ``tunnelmesh.pki`` reads from the auth context), so BoringSSL
inside gRPC is the judge of what is accepted. Certificates are also checked with the ``openssl`` CLI and with
``cryptography``'s RFC 5280 path validator, two verifiers nobody here wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tunnelmesh import pki
from tunnelmesh.config import TlsConfig
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.pki import (
    CertificateAuthority,
    PeerKind,
    PkiError,
    TlsIdentity,
)

CLUSTER = "prod-eu"
MESH = "m-7f3a9c"
TIMEOUT = 5.0


# ------------------------------------------------------------------------------------------------------------
# Fixtures and a real gRPC server


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return pki.create_ca(CLUSTER)


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    # Same cluster id, different key: only the key makes a CA, never its name.
    return pki.create_ca(CLUSTER)


def coord(ca: CertificateAuthority, member: str, *, now: datetime | None = None) -> TlsIdentity:
    return pki.issue_coordinator_identity(
        ca, CLUSTER, member, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now
    )


def node_identity(ca: CertificateAuthority, node_id: str = "n-1") -> TlsIdentity:
    key = pki.new_private_key()
    cert = pki.issue_node_certificate(ca, pki.create_node_csr(key), mesh_id=MESH, node_id=node_id)
    return TlsIdentity((cert,), key)


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    try:
        peer = pki.peer_identity(context)
    except PkiError as exc:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if peer is None:
        return b"{}"
    return json.dumps({"kind": str(peer.kind), "scope": peer.scope_id, "id": peer.peer_id}).encode()


def _raft_only(request: bytes, context: grpc.ServicerContext) -> bytes:
    # What every Raft RPC does first: the TLS layer accepts any certificate of the CA, node ones included.
    try:
        peer = pki.authorize_coordinator(context, CLUSTER)
    except PkiError as exc:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    return peer.peer_id.encode()


@contextlib.contextmanager
def serve(credentials: grpc.ServerCredentials) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i),
        "RaftOnly": grpc.unary_unary_rpc_method_handler(_raft_only),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tm.test.Probe", handlers),))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


@contextlib.contextmanager
def channel(
    port: int, credentials: grpc.ChannelCredentials, member: str | None = None
) -> Iterator[grpc.Channel]:
    options = pki.coordinator_channel_options(CLUSTER, member)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as ch:
        yield ch


def health_check(ch: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(ch)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status)


def probe(ch: grpc.Channel, method: str = "WhoAmI") -> dict[str, str]:
    call: Callable[..., bytes] = ch.unary_unary(f"/tm.test.Probe/{method}")
    raw = call(b"", timeout=TIMEOUT)
    return json.loads(raw) if method == "WhoAmI" else {"id": raw.decode()}


def mutual_server(ca: CertificateAuthority, identity: TlsIdentity) -> grpc.ServerCredentials:
    return pki.server_credentials(identity, trust_pem=ca.certificate_pem, require_client_auth=True)


def refused(exc: pytest.ExceptionInfo[grpc.RpcError]) -> bool:
    code: grpc.StatusCode = exc.value.code()
    return code is grpc.StatusCode.UNAVAILABLE


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("openssl")
    assert tool is not None, "openssl is missing: scripts/install-system-deps installs it"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=check, timeout=30)


def served_leaf(port: int) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


# ------------------------------------------------------------------------------------------------------------
# Coordinator <-> coordinator: mutual TLS on the Raft port


def test_mutual_tls_between_coordinators_of_one_cluster_and_server_reads_identity(
    ca: CertificateAuthority,
) -> None:
    c1, c2 = coord(ca, "c1"), coord(ca, "c2")
    with (
        serve(mutual_server(ca, c1)) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, c2), "c1") as ch,
    ):
        assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING
        assert probe(ch) == {"kind": "coordinator", "scope": CLUSTER, "id": "c2"}
        assert probe(ch, "RaftOnly") == {"id": "c2"}


def test_client_certificate_from_another_ca_is_refused(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    impostor = coord(other_ca, "c2")  # same cluster id and member id, wrong CA
    with (
        serve(mutual_server(ca, coord(ca, "c1"))) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, impostor), "c1") as ch,
        pytest.raises(grpc.RpcError) as exc,
    ):
        health_check(ch)
    assert refused(exc)


def test_client_without_certificate_is_refused_on_the_mutual_port(ca: CertificateAuthority) -> None:
    with (
        serve(mutual_server(ca, coord(ca, "c1"))) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem), "c1") as ch,
        pytest.raises(grpc.RpcError) as exc,
    ):
        health_check(ch)
    assert refused(exc)


def test_expired_client_certificate_is_refused(ca: CertificateAuthority) -> None:
    expired = coord(ca, "c2", now=datetime.now(UTC) - timedelta(days=400))
    assert expired.certificate.not_valid_after_utc < datetime.now(UTC)
    with (
        serve(mutual_server(ca, coord(ca, "c1"))) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, expired), "c1") as ch,
        pytest.raises(grpc.RpcError) as exc,
    ):
        health_check(ch)
    assert refused(exc)


def test_expired_server_certificate_is_refused(ca: CertificateAuthority) -> None:
    expired = coord(ca, "c1", now=datetime.now(UTC) - timedelta(days=400))
    with (
        serve(mutual_server(ca, expired)) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, coord(ca, "c2")), "c1") as ch,
        pytest.raises(grpc.RpcError) as exc,
    ):
        health_check(ch)
    assert refused(exc)


def test_client_pins_the_member_it_dials(ca: CertificateAuthority) -> None:
    """A client that dials c3 (by member id) refuses c1 answering at that address, though c1 is genuine."""
    creds = pki.channel_credentials(ca.certificate_pem, coord(ca, "c2"))
    with serve(mutual_server(ca, coord(ca, "c1"))) as port:
        with channel(port, creds, None) as ch:  # "any coordinator of the cluster" is fine
            assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING
        with channel(port, creds, "c3") as ch, pytest.raises(grpc.RpcError) as exc:
            health_check(ch)
        assert refused(exc)


def test_coordinator_reachable_by_its_real_address(ca: CertificateAuthority) -> None:
    """Without the identity override the usual host name check against DNS/IP SANs applies."""
    with (
        serve(mutual_server(ca, coord(ca, "c1"))) as port,
        grpc.secure_channel(
            f"127.0.0.1:{port}", pki.channel_credentials(ca.certificate_pem, coord(ca, "c2"))
        ) as ch,
    ):
        assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING


def test_certificate_renewed_on_disk_is_served_without_restart(ca: CertificateAuthority) -> None:
    first, renewed = coord(ca, "c1"), coord(ca, "c1")
    current = [first]
    creds = pki.server_credentials(
        first, trust_pem=ca.certificate_pem, require_client_auth=True, reload=lambda: current[0]
    )
    client = pki.channel_credentials(ca.certificate_pem, coord(ca, "c2"))
    with serve(creds) as port:
        with channel(port, client, "c1") as ch:
            assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING
        assert served_leaf(port) == first.certificate
        current[0] = renewed
        assert served_leaf(port) == renewed.certificate
        with channel(port, client, "c1") as ch:
            assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------------------------------
# Nodes: certificates from CSRs


def test_node_certificate_from_csr_works_as_client_certificate_and_names_the_node(
    ca: CertificateAuthority,
) -> None:
    key = pki.new_private_key()  # the node's TLS key: generated on the node, only the CSR leaves it
    cert = pki.issue_node_certificate(ca, pki.create_node_csr(key), mesh_id=MESH, node_id="n-42")
    chain_pem = cert.public_bytes(serialization.Encoding.PEM)  # RegisterResponse.client_certificate_chain_pem
    pinned = pki.verify_pinned_ca(ca.certificate_pem, ca.fingerprint)
    node = pki.verify_node_certificate(chain_pem, key, pinned, mesh_id=MESH, node_id="n-42")

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"tunnelmesh://mesh/{MESH}/node/n-42"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= pki.NODE_VALIDITY + pki.CLOCK_SKEW

    with (
        serve(mutual_server(ca, coord(ca, "c1"))) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, node)) as ch,
    ):
        assert probe(ch) == {"kind": "node", "scope": MESH, "id": "n-42"}


def test_node_certificate_passes_tls_on_the_raft_port_but_not_authorization(ca: CertificateAuthority) -> None:
    with (
        serve(mutual_server(ca, coord(ca, "c1"))) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, node_identity(ca)), "c1") as ch,
        pytest.raises(grpc.RpcError) as exc,
    ):
        probe(ch, "RaftOnly")
    assert exc.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "is not a coordinator of cluster" in str(exc.value.details())


def test_stolen_node_certificate_cannot_impersonate_a_coordinator(ca: CertificateAuthority) -> None:
    """No serverAuth EKU and no coordinator name: a client pinned to the cluster refuses it as a server."""
    with (
        serve(pki.server_credentials(node_identity(ca), require_client_auth=False)) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem), None) as ch,
        pytest.raises(grpc.RpcError) as exc,
    ):
        health_check(ch)
    assert refused(exc)


def test_csr_with_a_wrong_signature_is_rejected(ca: CertificateAuthority) -> None:
    csr = bytearray(pki.create_node_csr(pki.new_private_key()))
    csr[-1] ^= 0x01  # last byte of the ECDSA signature's s value: still well-formed DER
    with pytest.raises(PkiError, match="signature does not verify"):
        pki.issue_node_certificate(ca, bytes(csr), mesh_id=MESH, node_id="n-1")


def test_csr_that_is_not_a_csr_is_rejected(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="not a DER-encoded PKCS#10"):
        pki.issue_node_certificate(ca, b"\x30\x03\x02\x01\x00", mesh_id=MESH, node_id="n-1")


def test_identity_claimed_in_the_csr_is_ignored(ca: CertificateAuthority) -> None:
    key = pki.new_private_key()
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coordinator c1")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(pki.coordinator_uri(CLUSTER, "c1")),
                    x509.DNSName(pki.coordinator_server_name(CLUSTER, "c1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert = pki.issue_node_certificate(
        ca, greedy.public_bytes(serialization.Encoding.DER), mesh_id=MESH, node_id="n-7"
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(pki.node_uri(MESH, "n-7"))]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node n-7"


def test_csr_for_a_key_grpc_cannot_use_is_rejected(ca: CertificateAuthority) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(PkiError, match="P-256"):
        pki.issue_node_certificate(ca, pki.create_node_csr(p384), mesh_id=MESH, node_id="n-1")


def test_node_refuses_a_certificate_issued_to_someone_else(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    key = pki.new_private_key()
    csr = pki.create_node_csr(key)
    pem = pki.issue_node_certificate(ca, csr, mesh_id=MESH, node_id="n-1").public_bytes(
        serialization.Encoding.PEM
    )
    foreign = pki.issue_node_certificate(other_ca, csr, mesh_id=MESH, node_id="n-1")
    with pytest.raises(PkiError, match="SAN mismatch"):
        pki.verify_node_certificate(pem, key, [ca.certificate], mesh_id=MESH, node_id="n-2")
    with pytest.raises(PkiError, match="another key"):
        pki.verify_node_certificate(pem, pki.new_private_key(), [ca.certificate], mesh_id=MESH, node_id="n-1")
    with pytest.raises(PkiError, match="not signed by the pinned mesh CA"):
        pki.verify_node_certificate(
            foreign.public_bytes(serialization.Encoding.PEM),
            key,
            [ca.certificate],
            mesh_id=MESH,
            node_id="n-1",
        )


def test_public_port_does_not_request_client_certificates(ca: CertificateAuthority) -> None:
    """gRPC Python has no "request but do not require": on a server-auth-only port a node's certificate is
    never seen, so nodes there authenticate with their bearer node token (see docs/security.md)."""
    creds = pki.server_credentials(coord(ca, "c1"), require_client_auth=False)
    with (
        serve(creds) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, node_identity(ca)), "c1") as ch,
    ):
        assert probe(ch) == {}


# ------------------------------------------------------------------------------------------------------------
# CA pinning (join tokens)


def test_ca_fingerprint_pinning_accepts_the_right_ca_and_rejects_another(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    pin = ca.fingerprint
    assert pin.startswith("sha256:") and len(pin) == 7 + 64
    assert pki.verify_pinned_ca(ca.certificate_pem, pin) == [ca.certificate]
    # Case, colons and a missing prefix are tolerated: people copy fingerprints from `openssl x509`.
    colons = ":".join(pin[7 + i : 9 + i] for i in range(0, 64, 2)).upper()
    assert pki.verify_pinned_ca(ca.certificate_pem, colons) == [ca.certificate]
    with pytest.raises(PkiError, match="does not match the pinned fingerprint"):
        pki.verify_pinned_ca(other_ca.certificate_pem, pin)
    # A bundle that contains the pinned CA yields only that one.
    both = other_ca.certificate_pem + ca.certificate_pem
    assert pki.verify_pinned_ca(both, pin) == [ca.certificate]
    with pytest.raises(PkiError, match="malformed"):
        pki.verify_pinned_ca(ca.certificate_pem, "sha256:abcd")


def test_fingerprint_matches_openssl(ca: CertificateAuthority, tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    path.write_bytes(ca.certificate_pem)
    out = openssl("x509", "-in", str(path), "-noout", "-fingerprint", "-sha256").stdout
    assert out.strip().split("=", 1)[1].replace(":", "").lower() == ca.fingerprint.removeprefix("sha256:")


def test_node_fetches_the_pinned_ca_from_a_coordinator(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    with serve(pki.server_credentials(coord(ca, "c1"), require_client_auth=False)) as port:
        assert pki.fetch_pinned_ca("127.0.0.1", port, ca.fingerprint) == ca.certificate
        with pytest.raises(PkiError, match="matches the pinned CA fingerprint"):
            pki.fetch_pinned_ca("127.0.0.1", port, other_ca.fingerprint)
    with pytest.raises(PkiError, match="cannot fetch the CA certificate"):
        pki.fetch_pinned_ca("127.0.0.1", port, ca.fingerprint, timeout=1)


# ------------------------------------------------------------------------------------------------------------
# Files on disk


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_files_are_private_and_written_once(tmp_path: Path) -> None:
    ca = pki.create_ca("lab")
    pki.save_ca(ca, tmp_path / "coord")
    assert mode(tmp_path / "coord" / "ca.key") == 0o600
    assert mode(tmp_path / "coord" / "ca.crt") == 0o644
    assert mode(tmp_path / "coord") == 0o700
    loaded = pki.load_ca(tmp_path / "coord")
    assert loaded.fingerprint == ca.fingerprint and loaded.cluster_id == "lab"
    with pytest.raises(PkiError, match="already exists"):
        pki.save_ca(pki.create_ca("lab"), tmp_path / "coord")
    assert pki.load_ca(tmp_path / "coord").fingerprint == ca.fingerprint


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    pki.save_ca(pki.create_ca("lab"), tmp_path)
    os.chmod(tmp_path / "ca.key", 0o644)
    with pytest.raises(
        PkiError, match=r"ca\.key: the cluster CA key is accessible by group or others \(mode 0644\)"
    ):
        pki.load_ca(tmp_path)


def test_expired_ca_is_reported_with_its_file_and_date(tmp_path: Path) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    expired = pki.create_ca("lab", now=old, validity=timedelta(days=30))
    pki.save_ca(expired, tmp_path)
    with pytest.raises(PkiError, match=r"ca\.crt: certificate expired on 2020-01-31 00:00:00 UTC"):
        pki.load_ca(tmp_path)
    with pytest.raises(PkiError, match="cluster CA expired on 2020-01-31"):
        pki.issue_coordinator_identity(expired, "lab", "c1")


def test_coordinator_credentials_issued_once_and_reissued_when_names_change(tmp_path: Path) -> None:
    pki.save_ca(pki.create_ca(CLUSTER), tmp_path)
    first = pki.load_coordinator_credentials(
        tmp_path, cluster_id=CLUSTER, member_id="c1", dns_names=["a.example"]
    )
    assert mode(tmp_path / "coord.key") == 0o600
    again = pki.load_coordinator_credentials(
        tmp_path, cluster_id=CLUSTER, member_id="c1", dns_names=["a.example"]
    )
    assert again.identity.certificate == first.identity.certificate
    assert again.ca is not None and again.trust_pem == again.ca.certificate_pem
    moved = pki.load_coordinator_credentials(
        tmp_path, cluster_id=CLUSTER, member_id="c1", dns_names=["a.example"], ip_addresses=["192.0.2.7"]
    )
    assert moved.identity.certificate != first.identity.certificate
    later = datetime.now(UTC) + timedelta(days=300)  # inside the last third of a year: renew
    renewed = pki.load_coordinator_credentials(
        tmp_path,
        cluster_id=CLUSTER,
        member_id="c1",
        dns_names=["a.example"],
        ip_addresses=["192.0.2.7"],
        now=later,
    )
    assert renewed.identity.certificate.not_valid_after_utc > moved.identity.certificate.not_valid_after_utc


def test_missing_ca_says_where(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"ca\.key: cluster CA key not found"):
        pki.load_coordinator_credentials(tmp_path, cluster_id=CLUSTER, member_id="c1")


# ------------------------------------------------------------------------------------------------------------
# The cluster credentials bundle


def test_cluster_bundle_round_trip_with_pin(ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    secret = secrets.token_urlsafe(32)
    bundle = pki.export_cluster_bundle(ca, secret)
    assert (
        ca.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        not in bundle
    )
    joined = pki.import_cluster_bundle(bundle, secret, expected_fingerprint=ca.fingerprint)
    assert joined.fingerprint == ca.fingerprint
    # The joining coordinator can now mint certificates the existing members accept.
    with (
        serve(mutual_server(ca, coord(ca, "c1"))) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, coord(joined, "c4")), "c1") as ch,
    ):
        assert probe(ch)["id"] == "c4"
    with pytest.raises(PkiError, match="wrong secret"):
        pki.import_cluster_bundle(bundle, secrets.token_urlsafe(32))
    with pytest.raises(PkiError, match="does not match the pinned fingerprint"):
        pki.import_cluster_bundle(bundle, secret, expected_fingerprint=other_ca.fingerprint)
    with pytest.raises(PkiError, match="at least 16"):
        pki.export_cluster_bundle(ca, "hunter2")


def test_cluster_bundle_is_standard_pkcs12(ca: CertificateAuthority, tmp_path: Path) -> None:
    secret = "correct horse battery staple"
    (tmp_path / "bundle.p12").write_bytes(pki.export_cluster_bundle(ca, secret))
    out = openssl(
        "pkcs12", "-in", str(tmp_path / "bundle.p12"), "-passin", f"pass:{secret}", "-nokeys", "-info"
    )
    assert "PBES2" in out.stderr and "AES-256-CBC" in out.stderr
    assert ca.certificate_pem.decode().strip() in out.stdout


# ------------------------------------------------------------------------------------------------------------
# Independent verifiers: openssl and cryptography's RFC 5280 path validation


def test_openssl_verifies_issued_certificates(
    ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.certificate_pem)
    (tmp_path / "other.crt").write_bytes(other_ca.certificate_pem)
    (tmp_path / "coord.crt").write_bytes(coord(ca, "c1").chain_pem)
    (tmp_path / "node.crt").write_bytes(node_identity(ca).chain_pem)
    ca_file = str(tmp_path / "ca.crt")
    assert openssl("verify", "-CAfile", ca_file, str(tmp_path / "coord.crt")).stdout.strip().endswith(": OK")
    openssl("verify", "-CAfile", ca_file, "-purpose", "sslserver", str(tmp_path / "coord.crt"))
    openssl("verify", "-CAfile", ca_file, "-purpose", "sslclient", str(tmp_path / "coord.crt"))
    openssl("verify", "-CAfile", ca_file, "-purpose", "sslclient", str(tmp_path / "node.crt"))
    as_server = openssl(
        "verify", "-CAfile", ca_file, "-purpose", "sslserver", str(tmp_path / "node.crt"), check=False
    )
    assert as_server.returncode != 0  # clientAuth only
    wrong_ca = openssl(
        "verify", "-CAfile", str(tmp_path / "other.crt"), str(tmp_path / "coord.crt"), check=False
    )
    assert wrong_ca.returncode != 0


def test_rfc5280_path_validation_accepts_issued_certificates(ca: CertificateAuthority) -> None:
    store = verification.Store([ca.certificate])
    client = verification.PolicyBuilder().store(store).build_client_verifier()
    for leaf in (coord(ca, "c1").certificate, node_identity(ca).certificate):
        verified = client.verify(leaf, [])
        assert verified.chain[-1] == ca.certificate
    server = (
        verification.PolicyBuilder()
        .store(store)
        .build_server_verifier(x509.DNSName(pki.coordinator_server_name(CLUSTER, "c1")))
    )
    server.verify(coord(ca, "c1").certificate, [])


# ------------------------------------------------------------------------------------------------------------
# Bring your own CA (TlsConfig)


def _operator_pki(tmp_path: Path, member: str, *, rsa: bool = False) -> TlsConfig:
    """The docs/security.md recipe, run with the openssl CLI as an operator would."""
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    if not ca_crt.exists():
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
        openssl(
            "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "3650",
            "-subj", "/O=Example/CN=Example CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", str(ca_crt),
        )  # fmt: skip
    key, csr, crt = (tmp_path / f"{member}.{ext}" for ext in ("key", "csr", "crt"))
    if rsa:
        openssl("genrsa", "-out", str(key), "2048")
    else:
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    os.chmod(key, 0o640)  # group-readable (e.g. root:ssl-cert) is accepted for operator keys
    san = (
        f"URI:tunnelmesh://cluster/{CLUSTER}/coord/{member},DNS:{member}.coord.{CLUSTER}.tunnelmesh.invalid,"
        f"DNS:coord.{CLUSTER}.tunnelmesh.invalid,DNS:localhost,IP:127.0.0.1"
    )
    openssl("req", "-new", "-key", str(key), "-subj", f"/O=Example/CN={member}",
            "-addext", f"subjectAltName={san}",
            "-addext", "extendedKeyUsage=serverAuth,clientAuth", "-out", str(csr))  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "365", "-sha256", "-copy_extensions", "copy", "-out", str(crt))  # fmt: skip
    return TlsConfig(cert_file=crt, key_file=key, ca_file=ca_crt)


def test_operator_supplied_ca_works_for_mutual_tls(tmp_path: Path) -> None:
    c1 = pki.load_operator_credentials(_operator_pki(tmp_path, "c1"), cluster_id=CLUSTER, member_id="c1")
    c2 = pki.load_operator_credentials(
        _operator_pki(tmp_path, "c2", rsa=True), cluster_id=CLUSTER, member_id="c2"
    )
    assert c1.ca is None  # no CA key: this cluster cannot sign node CSRs
    server = pki.server_credentials(c1.identity, trust_pem=c1.trust_pem, require_client_auth=True)
    with serve(server) as port, channel(port, pki.channel_credentials(c2.trust_pem, c2.identity), "c1") as ch:
        assert probe(ch, "RaftOnly") == {"id": "c2"}


def test_operator_certificate_for_another_member_is_refused_with_the_san_to_add(tmp_path: Path) -> None:
    tls = _operator_pki(tmp_path, "c1")
    with pytest.raises(PkiError, match=r"SAN mismatch: .*URI:tunnelmesh://cluster/prod-eu/coord/c9"):
        pki.load_operator_credentials(tls, cluster_id=CLUSTER, member_id="c9")
    foreign = pki.create_ca(CLUSTER)
    (tmp_path / "foreign.crt").write_bytes(foreign.certificate_pem)
    wrong_ca = TlsConfig(cert_file=tls.cert_file, key_file=tls.key_file, ca_file=tmp_path / "foreign.crt")
    with pytest.raises(PkiError, match=r"not signed by a CA in .*foreign\.crt"):
        pki.load_operator_credentials(wrong_ca)
    assert tls.key_file is not None
    os.chmod(tls.key_file, 0o644)
    with pytest.raises(PkiError, match=r"c1\.key: the TLS key is accessible by others \(mode 0644\)"):
        pki.load_operator_credentials(tls)


# ------------------------------------------------------------------------------------------------------------
# Small pure functions


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (timedelta(days=0), False),
        (timedelta(days=200), False),
        (timedelta(days=244), True),  # the last third of 365 days begins after ~243 days
        (timedelta(days=366), True),  # expired
        (-timedelta(days=1), True),  # not yet valid: something is wrong, reissue
    ],
)
def test_needs_renewal_in_the_last_third_of_the_lifetime(
    ca: CertificateAuthority, age: timedelta, expected: bool
) -> None:
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    cert = coord(ca, "c1", now=issued).certificate
    assert pki.needs_renewal(cert, issued + age) is expected


def test_needs_renewal_with_explicit_margin(ca: CertificateAuthority) -> None:
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    cert = coord(ca, "c1", now=issued).certificate
    assert not pki.needs_renewal(cert, issued + timedelta(days=300), margin=timedelta(days=30))
    assert pki.needs_renewal(cert, issued + timedelta(days=340), margin=timedelta(days=30))


def test_leaf_never_outlives_its_ca() -> None:
    short = pki.create_ca("lab", validity=timedelta(days=10))
    leaf = coord(short, "c1").certificate
    assert leaf.not_valid_after_utc == short.certificate.not_valid_after_utc


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("tunnelmesh://cluster/prod-eu/coord/c1", (PeerKind.COORDINATOR, "prod-eu", "c1")),
        ("tunnelmesh://mesh/m-7f3a9c/node/n_1.a", (PeerKind.NODE, "m-7f3a9c", "n_1.a")),
    ],
)
def test_identity_uris_round_trip(uri: str, expected: tuple[PeerKind, str, str]) -> None:
    assert pki.parse_identity_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "tunnelmesh://cluster/prod-eu/node/c1",  # kind and scope disagree
        "tunnelmesh://mesh/m/coord/c1",
        "tunnelmesh://cluster/Prod_EU/coord/c1",  # cluster ids are DNS labels
        "tunnelmesh://cluster/prod-eu/coord/c1/extra",
        "spiffe://cluster/prod-eu/coord/c1",
        "tunnelmesh://mesh/m/node/../n",
    ],
)
def test_malformed_identity_uris_are_rejected(uri: str) -> None:
    with pytest.raises(PkiError):
        pki.parse_identity_uri(uri)


def test_pki_error_is_a_tunnelmesh_error() -> None:
    assert issubclass(PkiError, TunnelMeshError)


def test_secrets_stay_out_of_reprs(ca: CertificateAuthority) -> None:
    identity = coord(ca, "c1")
    pem = identity.private_key_pem().decode()
    assert "PRIVATE KEY" not in repr(ca) + repr(identity)
    assert pem.splitlines()[1] not in repr(identity)


def test_channel_credentials_never_fall_back_to_system_roots() -> None:
    with pytest.raises(PkiError, match="pinned CA certificate is required"):
        pki.channel_credentials(b"")


def test_failed_reload_keeps_serving_the_current_certificate(ca: CertificateAuthority) -> None:
    first = coord(ca, "c1")

    def broken() -> TlsIdentity:
        raise PkiError("coord.crt: not a PEM certificate")

    creds = pki.server_credentials(
        first, trust_pem=ca.certificate_pem, require_client_auth=True, reload=broken
    )
    with (
        serve(creds) as port,
        channel(port, pki.channel_credentials(ca.certificate_pem, coord(ca, "c2")), "c1") as ch,
    ):
        assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING
        assert served_leaf(port) == first.certificate


# ------------------------------------------------------------------------------------------------------------
# The Raft port's guard: an asyncio server where no method can forget to authorize its caller


async def _aio_echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _aio_stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    yield request
    yield request


async def _aio_stream_write(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
    await context.write(request)


async def test_interceptor_admits_coordinators_and_refuses_nodes_on_every_method(
    ca: CertificateAuthority,
) -> None:
    guard = pki.PeerAuthInterceptor(
        lambda ctx: pki.authorize_coordinator(ctx, CLUSTER), exempt={"/grpc.health.v1.Health/Check"}
    )
    server = grpc.aio.server(interceptors=[guard])
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        "Echo": grpc.unary_unary_rpc_method_handler(_aio_echo),
        "Stream": grpc.unary_stream_rpc_method_handler(_aio_stream),
        "StreamWrite": grpc.unary_stream_rpc_method_handler(_aio_stream_write),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tm.test.Raft", handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", mutual_server(ca, coord(ca, "c1")))
    await server.start()
    options = pki.coordinator_channel_options(CLUSTER, "c1")
    try:
        for client, allowed in ((coord(ca, "c2"), True), (node_identity(ca), False)):
            creds = pki.channel_credentials(ca.certificate_pem, client)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
                health_stub = health_pb2_grpc.HealthStub(ch)
                status = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                assert status.status == health_pb2.HealthCheckResponse.SERVING  # exempt
                echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary("/tm.test.Raft/Echo")
                stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(
                    "/tm.test.Raft/Stream"
                )
                stream_write: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(
                    "/tm.test.Raft/StreamWrite"
                )
                if allowed:
                    assert await echo(b"hi", timeout=TIMEOUT) == b"hi"
                    assert [m async for m in stream(b"x", timeout=TIMEOUT)] == [b"x", b"x"]
                    assert [m async for m in stream_write(b"y", timeout=TIMEOUT)] == [b"y"]
                    continue
                refused_calls: list[Awaitable[object]] = [
                    echo(b"hi", timeout=TIMEOUT),
                    _drain(stream(b"x", timeout=TIMEOUT)),
                    _drain(stream_write(b"y", timeout=TIMEOUT)),
                ]
                for pending in refused_calls:
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await pending
                    assert exc.value.code() is grpc.StatusCode.PERMISSION_DENIED
                    assert "is not a coordinator of cluster 'prod-eu'" in str(exc.value.details())
    finally:
        await server.stop(None)


async def _drain(call: AsyncIterable[bytes]) -> list[bytes]:
    return [m async for m in call]


def test_coordinator_key_readable_by_others_is_refused_not_replaced(tmp_path: Path) -> None:
    pki.save_ca(pki.create_ca(CLUSTER), tmp_path)
    pki.load_coordinator_credentials(tmp_path, cluster_id=CLUSTER, member_id="c1")
    os.chmod(tmp_path / "coord.key", 0o640)
    with pytest.raises(PkiError, match=r"coord\.key: the TLS private key is accessible by group or others"):
        pki.load_coordinator_credentials(tmp_path, cluster_id=CLUSTER, member_id="c1")


def test_node_tls_key_is_saved_private_and_reloads(ca: CertificateAuthority, tmp_path: Path) -> None:
    node = node_identity(ca, "n-3")
    pki.save_identity(node, tmp_path / "node" / "tls.crt", tmp_path / "node" / "tls.key")
    assert mode(tmp_path / "node" / "tls.key") == 0o600
    assert mode(tmp_path / "node") == 0o700
    again = pki.load_identity(tmp_path / "node" / "tls.crt", tmp_path / "node" / "tls.key")
    assert again.certificate == node.certificate
    assert again.private_key_pem() == node.private_key_pem()
