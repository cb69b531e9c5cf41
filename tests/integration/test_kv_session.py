"""``KvService.Session`` (many KV operations on one stream) against a real coordinator in netlab.

What a user observes: hundreds of operations in flight on one stream are each answered under their own id;
an operation that fails is answered with the status its unary call would have had while the stream goes on;
roles are checked per operation and a token revoked while a session is open stops at its next operation; a
broken protocol (an operation without an op) ends the stream with INVALID_ARGUMENT and is counted;
grpcurl drives it as docs/api.md shows. Needs root; about 20 s.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.coordlab import CoordLab
from tunnelmesh import tokens
from tunnelmesh.api.v1 import common_pb2
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(120),
]

PROBE = Path(__file__).with_name("kv_session_probe.py")
AUTH_PROBE = Path(__file__).with_name("auth_probe.py")
GRPCURL = shutil.which("grpcurl")
B64 = {"a": "YQ==", "k1": "azE=", "v": "dg=="}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def cl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordLab]:
    tmp = tmp_path_factory.mktemp("kvsession")
    with Lab(log_dir=tmp / "netlab") as lab:
        c = CoordLab(lab, tmp)
        c.start_cluster(1)
        yield c


def probe(cl: CoordLab, *args: str, token: str | None = None) -> Any:
    argv = [sys.executable, str(PROBE), cl.coords[0].api, *args]
    r = cl.client.run(argv, timeout=60, env=cl.client_env(token))
    return json.loads(r.stdout.strip().splitlines()[-1])


def metrics(cl: CoordLab) -> dict[str, float]:
    url = f"http://{cl.coords[0].host.ip}:8080/metrics"
    r = cl.client.run([sys.executable, str(PROBE), url, "metrics"], timeout=60, env=cl.client_env())
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def new_token(cl: CoordLab, role: int) -> str:
    token = tokens.ApiToken.new()
    c1 = cl.coords[0]
    spec = json.dumps([{"kind": "create_api_token", "token": str(token), "role": role}])
    argv = [sys.executable, str(AUTH_PROBE), "propose", c1.raft, str(c1.data_dir), spec]
    r = cl.client.run(argv, timeout=60, env=cl.client_env())
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [{"ok": True}]
    return str(token)


def test_many_operations_in_flight_on_one_session_are_each_answered(cl: CoordLab) -> None:
    before = metrics(cl)
    res = probe(cl, "concurrent", "300")
    assert res["answered"] == 300 and res["wrong"] == [], res
    after = metrics(cl)
    assert after["put/OK"] - before.get("put/OK", 0) == 300
    assert after["get/OK"] - before.get("get/OK", 0) == 300
    assert after["open"] == 0  # the probe closed its session


def test_a_failed_operation_is_answered_alone_and_the_session_goes_on(cl: CoordLab) -> None:
    before = metrics(cl)
    reqs = [
        {"id": "1", "put": {"requestId": "s1", "key": B64["k1"], "value": B64["v"]}},
        {"id": "2", "put": {"requestId": "s2", "key": b64(b"x" * 257), "value": B64["v"]}},
        {"id": "3", "delete": {"requestId": "s3", "key": "bm9uZQ=="}},
    ]
    res = probe(cl, "raw", json.dumps(reqs))
    assert res["code"] == "OK", res
    by_id = {a["id"]: a for a in res["answers"]}
    assert set(by_id) == {"1", "2", "3"}
    assert int(by_id["1"]["put"]["revision"]) > 0
    assert by_id["2"]["error"]["code"] == 3, by_id["2"]  # INVALID_ARGUMENT, as the unary Put answers
    assert "256" in by_id["2"]["error"]["message"], by_id["2"]
    assert by_id["3"]["delete"] == {}  # absent: succeeds, no previous value
    after = metrics(cl)
    assert after["put/INVALID_ARGUMENT"] - before.get("put/INVALID_ARGUMENT", 0) == 1


def test_roles_are_checked_per_operation(cl: CoordLab) -> None:
    ro = new_token(cl, common_pb2.ROLE_READ_ONLY)
    reqs = [
        {"id": "1", "get": {"key": B64["k1"]}},
        {"id": "2", "put": {"requestId": "ro1", "key": B64["k1"], "value": "cm8="}},
    ]
    res = probe(cl, "raw", json.dumps(reqs), token=ro)
    by_id = {a["id"]: a for a in res["answers"]}
    assert res["code"] == "OK" and "get" in by_id["1"], res
    assert by_id["2"]["error"]["code"] == 7, by_id["2"]  # PERMISSION_DENIED
    assert (
        "has role read-only; /tunnelmesh.v1.KvService/Put needs operator or higher"
        in (by_id["2"]["error"]["message"])
    )
    # No token at all: the stream itself is refused, as a unary call would be.
    no_token = probe(cl, "raw", json.dumps(reqs[:1]), token="")
    assert no_token["code"] == "UNAUTHENTICATED" and no_token["answers"] == [], no_token


def test_a_token_revoked_while_its_session_is_open_stops_at_the_next_operation(cl: CoordLab) -> None:
    op = new_token(cl, common_pb2.ROLE_OPERATOR)
    res = probe(cl, "revoke", op)
    assert res["before"] > 0, res
    assert res["after"]["code"] == "UNAUTHENTICATED", res
    assert f"API token {tokens.ApiToken.parse(op).token_id} was revoked" in res["after"]["detail"]


def test_a_broken_protocol_ends_the_session_with_invalid_argument(cl: CoordLab) -> None:
    # An operation without an op. (An id already in flight, the other broken case, needs an operation that
    # is still running when the next arrives: tests/unit/coord/test_kv_session.py holds one back.)
    before = metrics(cl)
    res = probe(cl, "raw-open", json.dumps([{"id": "5"}]))  # the coordinator ends the stream
    assert res["code"] == "INVALID_ARGUMENT" and "operation 5 has no op" in res["details"], res
    assert metrics(cl)["missing_op"] - before.get("missing_op", 0) == 1


@pytest.mark.skipif(
    GRPCURL is None, reason="grpcurl is not installed (scripts/install-system-deps installs it)"
)
def test_grpcurl_drives_a_session_as_in_the_docs(cl: CoordLab) -> None:
    assert GRPCURL is not None
    c1 = cl.coords[0]
    cluster = cl.status()["cluster"]
    admin = (c1.data_dir / "admin-token").read_text().strip()
    argv = [
        GRPCURL,
        *("-cacert", str(c1.data_dir / "ca.crt"), "-servername", f"coord.{cluster}.tunnelmesh.invalid"),
        *("-H", f"authorization: Bearer {admin}", "-d", "@"),
        c1.api,
        "tunnelmesh.v1.KvService/Session",
    ]
    stdin = (
        '{"id": 1, "put": {"request_id": "g1", "key": "Zw==", "value": "MQ=="}}\n'
        '{"id": 2, "get": {"key": "YQ==", "stale": true}}\n'
    )
    r = cl.client.run(argv, timeout=30, input=stdin, check=False)
    assert r.returncode == 0, r.stderr
    answers = [json.loads(doc) for doc in r.stdout.replace("}\n{", "}\x00{").split("\x00")]
    by_id = {a["id"]: a for a in answers}
    assert set(by_id) == {"1", "2"} and int(by_id["1"]["put"]["revision"]) > 0, answers
