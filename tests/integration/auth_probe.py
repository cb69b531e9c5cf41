"""Probes of a coordinator's public API port, run as a process inside a netlab host (see test_api_auth.py).

    python auth_probe.py plaintext API               -> {"code": ...}: a plaintext client
    python auth_probe.py health API                  -> {"": "SERVING", ...} over TLS, no token
    python auth_probe.py reflection API              -> {"services": [...], "admin_methods": [...]}
    python auth_probe.py metrics URL                 -> {reason: count} (tunnelmesh_api_auth_failures_total)
    python auth_probe.py propose RAFT DATA_DIR SPECS -> [{"error": ...} or {"ok": true}, ...]

``propose`` writes a state command straight through the Raft port's Propose, as a coordinator would, with
the coordinator credentials of DATA_DIR (a member's own data dir): the tests create and revoke API tokens
"in the state" without depending on the admin API. SPECS is a JSON list of ``{"kind": "create_api_token",
"token": "tma_...", "role": 1, "expires_in": 3.0}`` or ``{"kind": "revoke_api_token", "token_id": "..."}``.
The CA comes from ``TUNNELMESH_CA``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tunnelmesh import pki, tokens
from tunnelmesh.api.raft.v1 import raft_pb2, raft_pb2_grpc
from tunnelmesh.api.v1 import admin_pb2, admin_pb2_grpc, state_pb2
from tunnelmesh.client import open_sync_channel
from tunnelmesh.coord.state import encode_command, ns_to_timestamp


def _ca() -> bytes:
    return Path(os.environ["TUNNELMESH_CA"]).read_bytes()


def plaintext(api: str) -> dict[str, Any]:
    with grpc.insecure_channel(api) as ch:
        try:
            admin_pb2_grpc.AdminServiceStub(ch).GetClusterStatus(
                admin_pb2.GetClusterStatusRequest(), timeout=3
            )
        except grpc.RpcError as exc:
            return {"code": exc.code().name, "detail": exc.details()}
    return {"code": "OK"}


def health(api: str) -> dict[str, Any]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out = {}
    with open_sync_channel(api, ca_pem=_ca()) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "tunnelmesh.v1.AdminService", "tunnelmesh.v1.KvService"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    return out


def reflection(api: str) -> dict[str, Any]:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with open_sync_channel(api, ca_pem=_ca()) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = sorted(db.get_services())
        admin = DescriptorPool(db).FindServiceByName("tunnelmesh.v1.AdminService")
        return {"services": services, "admin_methods": sorted(m.name for m in admin.methods)}


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("tunnelmesh_api_auth_failures_total{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(value)
    return out


def propose(raft: str, data_dir: str, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    d = Path(data_dir)
    ca_pem = (d / pki.CA_CERT_FILE).read_bytes()
    identity = pki.load_identity(d / pki.COORDINATOR_CERT_FILE, d / pki.COORDINATOR_KEY_FILE)
    uri = next(u for u in _uris(identity.certificate) if u.startswith("tunnelmesh://cluster/"))
    _, cluster_id, member = pki.parse_identity_uri(uri)
    creds = pki.channel_credentials(ca_pem, identity)
    mid = int(member, 16)
    header = raft_pb2.RaftHeader(cluster_id=cluster_id, from_id=mid, to_id=mid)
    with grpc.secure_channel(raft, creds, options=pki.coordinator_channel_options(cluster_id)) as ch:
        return [_propose_one(raft_pb2_grpc.RaftStub(ch), header, spec) for spec in specs]


def _propose_one(stub: Any, header: Any, spec: dict[str, Any]) -> dict[str, Any]:
    now = time.time_ns()
    if spec["kind"] == "create_api_token":
        tok = tokens.ApiToken.parse(spec["token"])
        body: Any = state_pb2.CreateApiToken(
            token_id=tok.token_id, secret_hash=tok.secret_hash, description="test", role=spec["role"]
        )
        if spec.get("expires_in"):
            body.expires_at.CopyFrom(ns_to_timestamp(now + int(spec["expires_in"] * 1e9)))
    else:
        body = state_pb2.RevokeApiToken(token_id=spec["token_id"])
    command = encode_command(body, proposed_at=now, request_id=f"test-{now}", actor="test")
    resp = stub.Propose(raft_pb2.ProposeRequest(header=header, command=command), timeout=10)
    result = state_pb2.CommandResult.FromString(resp.result)
    if result.HasField("error"):
        return {"error": result.error.message}
    return {"ok": True}


def _uris(cert: Any) -> list[str]:
    from cryptography import x509

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "propose":
        out: Any = propose(args[0], args[1], json.loads(args[2]))
    else:
        out = {"plaintext": plaintext, "health": health, "reflection": reflection, "metrics": metrics}[mode](
            args[0]
        )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
