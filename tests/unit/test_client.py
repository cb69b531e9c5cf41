"""The client's connection: TLS pinned to the cluster CA with the coordinator name check, the bearer token on
every call, and where the connection settings come from (flags, environment, data dir, profile file).

A real TLS gRPC server on loopback stands in for a coordinator (the full path with real coordinators is in
tests/integration/test_api_auth.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tunnelmesh import pki, tokens
from tunnelmesh.client import (
    Profile,
    cluster_id_of,
    load_profile,
    open_channel,
    resolve_profile,
    save_profile,
)
from tunnelmesh.errors import TunnelMeshError

CLUSTER = "tm-unit"


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca(CLUSTER)


class _Recorder(health.HealthServicer):  # type: ignore[misc]  # untyped base
    """Health that also records the caller's authorization metadata."""

    seen: list[str | None]

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def Check(self, request: Any, context: Any) -> Any:
        self.seen.append(tokens.bearer(context.invocation_metadata()))
        return super().Check(request, context)


@contextlib.contextmanager
def coordinator(ca: pki.CertificateAuthority) -> Iterator[tuple[str, _Recorder]]:
    ident = pki.issue_coordinator_identity(ca, CLUSTER, "00000000000000c1", ip_addresses=["127.0.0.1"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rec = _Recorder()
    health_pb2_grpc.add_HealthServicer_to_server(rec, server)
    port = server.add_secure_port("127.0.0.1:0", pki.server_credentials(ident, require_client_auth=False))
    server.start()
    try:
        yield f"127.0.0.1:{port}", rec
    finally:
        server.stop(None)


async def _check(address: str, ca_pem: bytes, token: str | None) -> int:
    async with open_channel(address, ca_pem=ca_pem, token=token) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(r.status)


def test_open_channel_trusts_the_cluster_ca_and_sends_the_token(ca: pki.CertificateAuthority) -> None:
    token = str(tokens.ApiToken.new())
    with coordinator(ca) as (address, rec):
        assert (
            asyncio.run(_check(address, ca.certificate_pem, token)) == health_pb2.HealthCheckResponse.SERVING
        )
        assert (
            asyncio.run(_check(address, ca.certificate_pem, None)) == health_pb2.HealthCheckResponse.SERVING
        )
    assert rec.seen == [token, None]


def test_open_channel_refuses_a_server_of_another_ca_or_cluster(ca: pki.CertificateAuthority) -> None:
    same_cluster_other_key = pki.create_ca(CLUSTER)
    other_cluster = pki.create_ca("tm-other")
    with coordinator(ca) as (address, rec):
        for wrong in (same_cluster_other_key, other_cluster):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                asyncio.run(_check(address, wrong.certificate_pem, "tma_secret"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rec.seen == []  # the token never left the client


def test_served_chain_holds_the_ca(ca: pki.CertificateAuthority) -> None:
    with coordinator(ca) as (address, _):
        host, _, port = address.rpartition(":")
        chain = pki.fetch_server_chain(host, int(port))
    assert pki.served_ca(chain, address) == ca.certificate
    assert cluster_id_of(ca.certificate_pem) == CLUSTER
    with pytest.raises(pki.PkiError, match="did not send its CA certificate"):
        pki.served_ca(chain[:1], address)


def test_cluster_id_of_a_foreign_or_broken_ca(tmp_path: Path) -> None:
    with pytest.raises(TunnelMeshError, match="not a PEM certificate"):
        cluster_id_of(b"garbage")


# -- where the connection settings come from -----------------------------------------------------------------


def _data_dir(tmp_path: Path, ca: pki.CertificateAuthority) -> Path:
    d = tmp_path / "coord"
    d.mkdir()
    (d / "ca.crt").write_bytes(ca.certificate_pem)
    (d / "admin-token").write_text("tma_000000000000_" + "a" * 40 + "\n")
    (d / "api-address").write_text("10.0.0.1:8443\n")
    return d


def test_data_dir_of_a_local_coordinator(tmp_path: Path, ca: pki.CertificateAuthority) -> None:
    d = _data_dir(tmp_path, ca)
    p = resolve_profile(data_dir=d, env={}, profile_path=tmp_path / "none.json")
    assert p == Profile(("10.0.0.1:8443",), ca.certificate_pem, "tma_000000000000_" + "a" * 40)


def test_flags_beat_environment_beat_data_dir_beat_profile(
    tmp_path: Path, ca: pki.CertificateAuthority
) -> None:
    d = _data_dir(tmp_path, ca)
    other = pki.create_ca("tm-flag")
    flag_ca = tmp_path / "flag.crt"
    flag_ca.write_bytes(other.certificate_pem)
    saved = save_profile(Profile(("saved:1",), b"saved-ca", "tma_saved"), tmp_path / "profile.json")
    env = {"TUNNELMESH_COORD": "env:1, env:2", "TUNNELMESH_API_TOKEN": "tma_env"}
    p = resolve_profile(data_dir=d, env=env, profile_path=saved)
    assert (p.coordinators, p.ca_pem, p.token) == (("env:1", "env:2"), ca.certificate_pem, "tma_env")
    p = resolve_profile(coordinators="flag:1", ca_file=flag_ca, token="tma_flag", data_dir=d, env=env)
    assert (p.coordinators, p.ca_pem, p.token) == (("flag:1",), other.certificate_pem, "tma_flag")
    # Only the profile: everything from it.
    assert resolve_profile(env={}, profile_path=saved) == Profile(("saved:1",), b"saved-ca", "tma_saved")


def test_missing_settings_say_how_to_give_them(tmp_path: Path) -> None:
    none = tmp_path / "none.json"
    with pytest.raises(TunnelMeshError, match="no coordinator address: pass --coord"):
        resolve_profile(env={}, profile_path=none)
    with pytest.raises(TunnelMeshError, match="no cluster CA certificate: pass --ca"):
        resolve_profile(coordinators="h:1", env={}, profile_path=none)
    with pytest.raises(TunnelMeshError, match="cannot read the CA certificate"):
        resolve_profile(coordinators="h:1", ca_file=tmp_path / "missing.crt", env={}, profile_path=none)


def test_profile_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "profile.json"
    prof = Profile(("a:1", "b:2"), b"-----BEGIN CERTIFICATE-----\n", "tma_x")
    assert save_profile(prof, path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_profile(path) == prof
    assert load_profile(tmp_path / "absent.json") is None
    os.chmod(path, 0o644)
    with pytest.raises(TunnelMeshError, match="readable by others; chmod 600"):
        load_profile(path)


@pytest.mark.parametrize("doc", ["{", "[]", json.dumps({"coordinators": "a:1", "ca_pem": "x"}), "{}"])
def test_malformed_profile_names_the_file(tmp_path: Path, doc: str) -> None:
    path = tmp_path / "profile.json"
    path.write_text(doc)
    path.chmod(0o600)
    with pytest.raises(TunnelMeshError, match=f"{path}: malformed client profile"):
        load_profile(path)


def test_default_profile_path_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tunnelmesh.client import default_profile_path

    monkeypatch.setenv("TUNNELMESH_PROFILE", str(tmp_path / "p.json"))
    assert default_profile_path() == tmp_path / "p.json"
    monkeypatch.delenv("TUNNELMESH_PROFILE")
    if os.geteuid() == 0:
        assert default_profile_path() == Path("/etc/tunnelmesh/profile.json")
    else:
        assert default_profile_path() == Path.home() / ".config" / "tunnelmesh" / "profile.json"
