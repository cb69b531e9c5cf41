"""TLS and API-token authentication on the coordinators' public API, with real coordinators in netlab.

What a user observes: the API port speaks only TLS with the cluster CA (a plaintext client or one trusting
another CA gets nowhere); admin and KV calls need an API token whose role suffices, and every refusal says
why and is counted; health and reflection work over TLS without a token; the bootstrap admin token is a
0600 file and the mesh is initialized exactly once, even across a crash; a coordinator joins over TLS only
with the right join secret, and refuses a seed that serves another CA. Needs root; about 60 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.coordlab import Coord, CoordLab, coord_argv
from tunnelmesh import pki, tokens
from tunnelmesh.api.v1 import common_pb2
from tunnelmesh.coord.raft.driver import decode_snapshot
from tunnelmesh.coord.raft.messages import EntryType
from tunnelmesh.coord.raft.storage import SqliteStorage
from tunnelmesh.coord.state import MeshState
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(120),
]

PROBE = Path(__file__).with_name("auth_probe.py")


@pytest.fixture(scope="module")
def cl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordLab]:
    tmp = tmp_path_factory.mktemp("apiauth")
    with Lab(log_dir=tmp / "netlab") as lab:
        c = CoordLab(lab, tmp)
        c.start_cluster(1)
        yield c


def probe(cl: CoordLab, *args: str, env: dict[str, str] | None = None) -> Any:
    r = cl.client.run([sys.executable, str(PROBE), *args], timeout=60, env=env or cl.client_env())
    return json.loads(r.stdout.strip().splitlines()[-1])


def propose(cl: CoordLab, specs: list[dict[str, Any]]) -> Any:
    """State commands through the Raft port with c1's own coordinator certificate (auth_probe.py)."""
    c1 = cl.coords[0]
    return probe(cl, "propose", c1.raft, str(c1.data_dir), json.dumps(specs))


def as_token(cl: CoordLab, token: str | None, ops: list[list[Any]]) -> list[Any]:
    """``ops`` on c1 with API token ``token`` (None: without one)."""
    return cl.ops(cl.coords[0], [[*op, {"deadline": 5.0, "token": token}] for op in ops])


def auth_failures(cl: CoordLab) -> dict[str, float]:
    return probe(cl, "metrics", f"http://{cl.coords[0].host.ip}:8080/metrics")  # type: ignore[no-any-return]


def test_bootstrap_admin_token_is_a_private_file_and_works(cl: CoordLab) -> None:
    c1 = cl.coords[0]
    path = c1.data_dir / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = tokens.ApiToken.parse(path.read_text())
    assert f"Admin API token (for the tunnelmesh CLI; keep it secret): {path}" in c1.log()
    assert str(token) not in c1.log()  # the secret is printed nowhere
    assert as_token(cl, str(token), [["put", "a", "1"], ["get", "a"]])[1]["value"] == "1"


def test_plaintext_client_is_refused(cl: CoordLab) -> None:
    assert probe(cl, "plaintext", cl.coords[0].api)["code"] == "UNAVAILABLE"


def test_client_trusting_another_ca_is_refused(cl: CoordLab, tmp_path: Path) -> None:
    # Same cluster id, so only the CA differs: the handshake fails, the token is never sent.
    cluster = cl.status()["cluster"]
    other = tmp_path / "other-ca.crt"
    other.write_bytes(pki.create_ca(cluster).certificate_pem)
    env = {**cl.client_env(), "TUNNELMESH_CA": str(other)}
    res = cl.ops(cl.coords[0], [["get", "a", {"deadline": 3.0}]], env=env)[0]
    assert res["error"] == "UNAVAILABLE", res


BAD_TOKENS = [
    (None, "missing", "needs an API token: send metadata 'authorization: Bearer tma_...'"),
    ("tma_nope", "malformed", "malformed API token: expected tma_<12 hex>_<40 hex>"),
    (str(tokens.ApiToken.new()), "unknown", "unknown API token"),
    (f"tmn_n-1_{'0' * 40}", "malformed", "malformed API token"),  # a node token is no API token
]


def test_bad_tokens_are_unauthenticated_counted_and_change_nothing(cl: CoordLab) -> None:
    before = auth_failures(cl)
    ops = [
        [*op, {"deadline": 5.0, "token": t}]
        for t, _, _ in BAD_TOKENS
        for op in (["get", "a"], ["put", "a", "x"])
    ]
    res = cl.ops(cl.coords[0], ops)
    for i, (_, _, detail) in enumerate(BAD_TOKENS):
        got, put = res[2 * i], res[2 * i + 1]
        assert got["error"] == put["error"] == "UNAUTHENTICATED", (got, put)
        assert detail in got["detail"], got
    after = auth_failures(cl)
    assert {r: after[r] - before.get(r, 0.0) for r in ("missing", "malformed", "unknown")} == {
        "missing": 2,
        "malformed": 4,
        "unknown": 2,
    }
    assert as_token(cl, _admin(cl), [["get", "a"]])[0]["value"] == "1"  # nothing was written


def _admin(cl: CoordLab) -> str:
    return (cl.coords[0].data_dir / "admin-token").read_text().strip()


def test_wrong_secret_of_a_known_token_is_unauthenticated(cl: CoordLab) -> None:
    admin = tokens.ApiToken.parse(_admin(cl))
    forged = f"tma_{admin.token_id}_{'0' * 40}"
    before = auth_failures(cl).get("bad_secret", 0.0)
    res = as_token(cl, forged, [["get", "a"]])[0]
    assert res["error"] == "UNAUTHENTICATED" and "unknown API token" in res["detail"]  # says no more
    assert auth_failures(cl)["bad_secret"] == before + 1


def test_read_only_token_reads_but_cannot_write_and_operator_cannot_administer(cl: CoordLab) -> None:
    ro, op = tokens.ApiToken.new(), tokens.ApiToken.new()
    specs = [
        {"kind": "create_api_token", "token": str(ro), "role": common_pb2.ROLE_READ_ONLY},
        {"kind": "create_api_token", "token": str(op), "role": common_pb2.ROLE_OPERATOR},
    ]
    assert propose(cl, specs) == [{"ok": True}] * 2
    before = auth_failures(cl).get("role", 0.0)
    ops = [
        ["get", "a", str(ro)],
        ["put", "a", "ro", str(ro)],
        ["status", str(ro)],
        ["put", "b", "op", str(op)],
    ]
    got, put, status, op_put = cl.ops(
        cl.coords[0], [[*o[:-1], {"deadline": 5.0, "token": o[-1]}] for o in ops]
    )
    assert got["value"] == "1" and "voters" in status
    assert put["error"] == "PERMISSION_DENIED"
    assert "has role read-only; /tunnelmesh.v1.KvService/Put needs operator or higher" in put["detail"]
    assert "revision" in op_put  # an operator writes KV
    assert auth_failures(cl)["role"] == before + 1
    # Cluster membership is admin only (through the CLI, as a user meets it).
    env = {**cl.client_env(), "TUNNELMESH_API_TOKEN": str(op)}
    argv = coord_argv("cluster", "transfer-leader", "-c", cl.coords[0].api)
    r = cl.client.run(argv, timeout=60, env=env, check=False)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr and "needs admin" in r.stderr, r.stderr


def test_revoked_and_expired_tokens_are_unauthenticated(cl: CoordLab) -> None:
    revoked, expiring = tokens.ApiToken.new(), tokens.ApiToken.new()
    role = common_pb2.ROLE_OPERATOR
    specs = [
        {"kind": "create_api_token", "token": str(revoked), "role": role},
        {"kind": "create_api_token", "token": str(expiring), "role": role, "expires_in": 2.0},
    ]
    expires = time.monotonic() + 2.0
    assert propose(cl, specs) == [{"ok": True}] * 2
    assert "value" in as_token(cl, str(revoked), [["get", "a"]])[0]
    assert propose(cl, [{"kind": "revoke_api_token", "token_id": revoked.token_id}]) == [{"ok": True}]
    time.sleep(max(0.0, expires + 0.5 - time.monotonic()))
    ops = [["get", "a", {"deadline": 5.0, "token": str(t)}] for t in (revoked, expiring)]
    res_revoked, res_expired = cl.ops(cl.coords[0], ops)
    assert res_revoked["error"] == "UNAUTHENTICATED"
    assert f"API token {revoked.token_id} was revoked" in res_revoked["detail"]
    assert res_expired["error"] == "UNAUTHENTICATED"
    assert f"API token {expiring.token_id} has expired" in res_expired["detail"]


def test_health_and_reflection_work_over_tls_without_a_token(cl: CoordLab) -> None:
    env = cl.client_env()
    env.pop("TUNNELMESH_API_TOKEN", None)
    api = cl.coords[0].api
    assert probe(cl, "health", api, env=env) == {
        "": "SERVING",
        "tunnelmesh.v1.AdminService": "SERVING",
        "tunnelmesh.v1.KvService": "SERVING",
    }
    refl = probe(cl, "reflection", api, env=env)
    assert {"tunnelmesh.v1.AdminService", "tunnelmesh.v1.KvService", "grpc.health.v1.Health"} <= set(
        refl["services"]
    )
    assert "GetClusterStatus" in refl["admin_methods"]


GRPCURL = shutil.which("grpcurl")


@pytest.mark.skipif(
    GRPCURL is None, reason="grpcurl is not installed (scripts/install-system-deps installs it)"
)
def test_grpcurl_as_in_the_docs(cl: CoordLab) -> None:
    # docs/api.md "Calling the API with grpcurl": trust ca.crt, check the coordinator name with -servername.
    assert GRPCURL is not None
    c1 = cl.coords[0]
    cluster = cl.status()["cluster"]
    tls = ["-cacert", str(c1.data_dir / "ca.crt"), "-servername", f"coord.{cluster}.tunnelmesh.invalid"]

    def grpcurl(*args: str) -> Any:
        return cl.client.run([GRPCURL, *tls, *args], timeout=30, check=False)

    listed = grpcurl(c1.api, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"tunnelmesh.v1.AdminService", "tunnelmesh.v1.KvService", "grpc.health.v1.Health"} <= set(
        listed.stdout.split()
    )
    assert '"status": "SERVING"' in grpcurl(c1.api, "grpc.health.v1.Health/Check").stdout
    auth = ["-H", f"authorization: Bearer {_admin(cl)}"]
    got = grpcurl(*auth, "-d", '{"key": "YQ=="}', c1.api, "tunnelmesh.v1.KvService/Get")  # key "a"
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["value"] == "MQ=="  # "1"
    refused = grpcurl("-d", '{"key": "YQ=="}', c1.api, "tunnelmesh.v1.KvService/Get")
    assert refused.returncode != 0 and "Code: Unauthenticated" in refused.stderr, refused.stderr
    # The name check is real: a name the coordinator's certificate does not carry is refused.
    wrong = cl.client.run(
        [GRPCURL, "-cacert", str(c1.data_dir / "ca.crt"), "-servername", "evil.example", c1.api, "list"],
        timeout=30,
        check=False,
    )
    assert wrong.returncode != 0 and "certificate" in wrong.stderr, wrong.stderr


def test_joining_needs_the_right_join_secret_and_happens_over_tls(cl: CoordLab) -> None:
    c1 = cl.coords[0]
    wrong = cl.add("wrong")
    proc = wrong.start("--seed", c1.api, "--join-secret", "not-the-secret-but-long-enough")
    assert proc.wait(30) == 1
    assert "cannot open the cluster bundle" in proc.log_text()
    assert not (wrong.data_dir / "raft").exists()

    good = cl.add("good")
    good.start("--seed", c1.api, "--join-secret", cl.join_secret())
    good.wait_serving(timeout=30)
    cl.wait_for(lambda s: s["learners"] == [good.member_id], timeout=30, what="good as a learner")
    assert (good.data_dir / "ca.crt").read_bytes() == (c1.data_dir / "ca.crt").read_bytes()
    assert not (good.data_dir / "admin-token").exists()  # the bootstrap token stays where it was made
    # The admin token works through the new member too (it reads the replicated state).
    assert cl.ops(good, [["get", "a"]])[0]["value"] == "1"
    good.stop()


_MITM = """
import asyncio, sys
from pathlib import Path
import grpc
sys.path.insert(0, sys.argv[4])
from tunnelmesh import pki
from tunnelmesh.api.v1 import cluster_pb2, cluster_pb2_grpc

listen, real_dir, secret = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
real = pki.load_ca(real_dir)
fake = pki.create_ca(real.cluster_id)  # same cluster id, another key: a machine in the middle
ident = pki.issue_coordinator_identity(fake, real.cluster_id, "00000000000000ee")
bundle = pki.export_cluster_bundle(real, secret)  # what it relays from the real seed

class Join(cluster_pb2_grpc.ClusterJoinServiceServicer):
    async def GetJoinBundle(self, request, context):
        return cluster_pb2.GetJoinBundleResponse(cluster_id=real.cluster_id, bundle=bundle)

async def main():
    server = grpc.aio.server()
    cluster_pb2_grpc.add_ClusterJoinServiceServicer_to_server(Join(), server)
    server.add_secure_port(listen, pki.server_credentials(ident, require_client_auth=False))
    await server.start()
    print("mitm serving", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def test_joining_refuses_a_seed_that_serves_another_ca(cl: CoordLab) -> None:
    # The seed relays the real bundle (it cannot open or forge it) but serves TLS with its own CA: the
    # joiner opens the bundle with the secret and sees that its CA is not the one it talked to.
    c1 = cl.coords[0]
    mitm_host = cl.add("mitm")
    root = str(Path(__file__).resolve().parents[2])
    argv = [sys.executable, "-c", _MITM, mitm_host.api, str(c1.data_dir), cl.join_secret(), root]
    mitm = mitm_host.host.spawn(argv, name="mitm")
    mitm.wait_for_log("mitm serving", timeout=30)
    victim = cl.add("victim")
    proc = victim.start("--seed", mitm_host.api, "--join-secret", cl.join_secret())
    assert proc.wait(30) == 1
    assert re.search(
        r"holds CA sha256:[0-9a-f]+, but the seed's TLS connection was signed by", proc.log_text()
    )
    assert not (victim.data_dir / "raft").exists() and not (victim.data_dir / "ca.key").exists()
    mitm.stop()


def _replayed_state(data_dir: Path) -> tuple[MeshState, int]:
    """The mesh state a stopped coordinator's store holds, and how many entries changed the mesh settings."""
    storage = SqliteStorage.open(data_dir / "raft")
    try:
        snap = storage.snapshot()
        _, state_bytes = decode_snapshot(snap.data)
        state = MeshState.from_snapshot(state_bytes) if state_bytes else MeshState()
        changes = 0
        for e in storage.entries(snap.metadata.index + 1, storage.last_index() + 1):
            if e.type == EntryType.CONF_CHANGE or e.index <= state.applied_index:
                continue
            before = state.settings
            state.apply(e.index, e.data)
            changes += state.settings != before
    finally:
        storage.close()
    return state, changes


def test_bootstrap_commands_are_applied_exactly_once_across_a_crash(cl: CoordLab) -> None:
    b1 = cl.add("b1")
    b1.start("--bootstrap", "--mesh-domain", "corp.example", "--mesh-prefix", "100.100.0.0/16")
    assert b1.proc is not None
    b1.proc.wait_for_log("Bootstrapped cluster", timeout=30)
    b1.kill()  # most likely before the first leader proposed anything
    b1.start()
    b1.wait_serving()
    env = {
        "TUNNELMESH_CA": str(b1.data_dir / "ca.crt"),
        "TUNNELMESH_API_TOKEN": (b1.data_dir / "admin-token").read_text().strip(),
        "TUNNELMESH_PROFILE": str(cl.tmp / "no-profile.json"),
    }
    pending = b1.data_dir / "bootstrap-pending.json"
    deadline = time.monotonic() + 30
    while pending.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pending.exists(), "the restarted coordinator did not finish the bootstrap commands"
    res = cl.ops(b1, [["put", "k", "v"]], env=env)[0]
    assert "revision" in res, res  # the bootstrap admin token exists in the state
    b1.stop()
    logs = b1.all_logs()
    mesh_id = re.findall(r"event=bootstrap_prepared mesh_id=([0-9a-f]+)", logs)
    assert len(mesh_id) == 1  # the restart did not make new settings
    assert logs.count("event=bootstrap_complete") == 1
    state, changes = _replayed_state(b1.data_dir)
    settings = state.settings
    assert settings is not None and changes == 1
    assert (settings.mesh_id, settings.mesh_domain, settings.mesh_prefixes) == (
        mesh_id[0],
        "corp.example",
        ("100.100.0.0/16",),
    )
    assert settings.mtu == 1420 and len(settings.preshared_key) == 32
    admin = tokens.ApiToken.parse(env["TUNNELMESH_API_TOKEN"])
    record = state.get_api_token(admin.token_id)
    assert record is not None and record.role == common_pb2.ROLE_ADMIN
    assert tokens.matches(admin.secret, record.secret_hash)


def test_bad_mesh_settings_refuse_bootstrap_before_creating_a_cluster(cl: CoordLab) -> None:
    bad: Coord = cl.add("bad")
    proc = bad.start("--bootstrap", "--mesh-prefix", "100.64.0.1/10")
    assert proc.wait(30) == 1
    assert "coord.mesh_cidr: host bits are set; did you mean 100.64.0.0/10?" in proc.log_text()
    assert not bad.data_dir.exists()
