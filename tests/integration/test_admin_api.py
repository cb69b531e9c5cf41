"""The admin API as an operator uses it: join tokens, API tokens with roles, and nodes, against a
3-coordinator cluster of real processes in a netlab LAN, over TLS with API tokens.

Calls run on the lab's "client" host: the `tunnelmesh` CLI itself for what a person types, and
``admin_ops.py`` (many ``tunnelmesh.client`` calls in one process: starting Python with gRPC takes seconds on
a loaded machine) for the rest. Writes go to one coordinator and reads to another, so follower forwarding
and linearizable reads are on the path. The scenarios share one cluster and run in file order. Needs root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.integration.coordlab import Coord, CoordLab, coord_argv
from tunnelmesh import pki, tokens
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(240),
]

ADMIN_OPS = Path(__file__).with_name("admin_ops.py")
READ_ONLY, OPERATOR, ADMIN = 1, 2, 3  # common.proto Role
FAILED_METRIC = "tunnelmesh_admin_requests_failed_total"


@pytest.fixture(scope="module")
def cl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordLab]:
    tmp = tmp_path_factory.mktemp("adminapi")
    with Lab(log_dir=tmp / "netlab") as lab:
        c = CoordLab(lab, tmp)
        c.start_cluster(3)
        yield c


def tm(
    cl: CoordLab, *args: str, via: Coord | None = None, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`tunnelmesh ARGS -c <via or every coordinator>` on the client host (default token: the bootstrap admin
    token). Never raises on a non-zero exit: the caller checks it."""
    targets = [via] if via is not None else cl.coords
    argv = coord_argv(*args, "-c", ",".join(c.api for c in targets))
    return cl.client.run(argv, timeout=60, check=False, env=cl.client_env(token))


def ops(cl: CoordLab, steps: list[list[Any]]) -> list[Any]:
    """Run ``admin_ops.py`` with ``steps``; ``via`` options may name a Coord."""
    for step in steps:
        if len(step) > 2 and isinstance(step[2].get("via"), Coord):
            step[2]["via"] = step[2]["via"].api
    argv = [sys.executable, str(ADMIN_OPS), ",".join(c.api for c in cl.coords), json.dumps(steps)]
    r = cl.client.run(argv, timeout=120, env=cl.client_env())
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def refused(r: subprocess.CompletedProcess[str], code: str) -> None:
    """The CLI's one-line error for a refused call: exit 1, the gRPC code, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"error: {code}:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_creates_a_join_token_pinning_the_cluster_ca_and_other_members_list_and_revoke_it(
    cl: CoordLab,
) -> None:
    c1, c2, c3 = cl.coords
    r = tm(cl, "tokens", "create", "--tag", "tag:ci", "-d", "CI runners", "--ttl", "2h", via=c2)
    assert r.returncode == 0, r.stderr
    # The human output carries the secret: a join token pinning this cluster's CA.
    secret = re.search(r"tmj_\S+", r.stdout)
    assert secret is not None, r.stdout
    token = tokens.JoinToken.parse(secret.group(0))
    ca = x509.load_pem_x509_certificate((c1.data_dir / "ca.crt").read_bytes())
    assert token.ca_fingerprint == pki.ca_fingerprint(ca)
    # The ready-to-paste command names every coordinator.
    command = re.search(r"tunnelmesh join (\S+) --token (\S+)", r.stdout)
    assert command is not None and command.group(2) == secret.group(0), r.stdout
    assert sorted(command.group(1).split(",")) == sorted(c.api for c in cl.coords)

    r = tm(cl, "tokens", "list", "--json", via=c3)  # a linearizable read on another member
    assert r.returncode == 0, r.stderr
    mine = next(t for t in json.loads(r.stdout) if t["tokenId"] == token.token_id)
    assert mine["tags"] == ["tag:ci"] and mine["description"] == "CI runners"
    assert not mine.get("reusable") and "revokedAt" not in mine
    assert mine["createdBy"].startswith("api-token:")

    tid = token.token_id
    revoked, active, every, made, first, retry = ops(
        cl,
        [
            ["revoke_join_token", {"token_id": tid}, {"via": c1}],
            ["list_join_tokens", {}, {"via": c3}],
            ["list_join_tokens", {"include_inactive": True}, {"via": c2}],
            ["create_join_token", {"max_uses": 3, "reusable": True}, {"via": c3}],
            # A retry of an applied create cannot show the secret again: it says so rather than make another.
            ["create_join_token", {"request_id": "create-once"}, {"via": c1}],
            ["create_join_token", {"request_id": "create-once"}, {"via": c2}],
        ],
    )
    assert revoked["tokenId"] == tid and "revokedAt" in revoked
    assert tid not in [t["tokenId"] for t in active]
    assert next(t for t in every if t["tokenId"] == tid)["revokedAt"] == revoked["revokedAt"]
    assert tokens.JoinToken.parse(made["secret"]).token_id == made["token"]["tokenId"]
    assert made["token"]["reusable"] is True and made["token"]["maxUses"] == 3
    assert first["secret"] and retry["error"] == "ALREADY_EXISTS" and "shown only once" in retry["detail"]


def test_roles_are_enforced_and_a_revoked_api_token_is_refused_on_every_coordinator(cl: CoordLab) -> None:
    c1, c2, c3 = cl.coords
    reader, operator = ops(
        cl,
        [
            ["create_api_token", {"role": READ_ONLY, "description": "grafana"}, {"via": c1}],
            ["create_api_token", {"role": OPERATOR, "description": "ops"}, {"via": c2}],
        ],
    )
    assert reader["token"]["role"] == "ROLE_READ_ONLY" and operator["token"]["role"] == "ROLE_OPERATOR"
    assert tokens.ApiToken.parse(reader["secret"]).token_id == reader["token"]["tokenId"]
    rs, os_, oid = reader["secret"], operator["secret"], operator["token"]["tokenId"]
    got = ops(
        cl,
        [
            # read-only: can look, cannot change anything.
            ["list_join_tokens", {}, {"token": rs, "via": c3}],
            ["all_nodes", {}, {"token": rs, "via": c3}],
            ["create_join_token", {}, {"token": rs, "via": c3}],
            # operator: join tokens yes, API tokens no.
            ["create_join_token", {}, {"token": os_, "via": c3}],
            ["create_api_token", {"role": ADMIN}, {"token": os_}],
            ["list_api_tokens", {}, {"token": os_}],
            # revoked through one coordinator: refused by it from then on, and by the others as soon as
            # they apply the revocation (milliseconds later).
            ["revoke_api_token", {"token_id": oid}, {"via": c1}],
            ["list_join_tokens", {}, {"token": os_, "via": c1}],
            ["list_join_tokens", {}, {"token": os_, "via": c2, "until_error": "UNAUTHENTICATED"}],
            ["list_join_tokens", {}, {"token": os_, "via": c3, "until_error": "UNAUTHENTICATED"}],
            ["list_api_tokens", {"include_inactive": True}, {"via": c2}],
            ["list_api_tokens", {}, {"via": c3}],
        ],
    )
    assert isinstance(got[0], list) and isinstance(got[1], list)
    assert got[2]["error"] == "PERMISSION_DENIED"
    assert got[3]["token"]["createdBy"] == f"api-token:{oid}"
    assert got[4]["error"] == got[5]["error"] == "PERMISSION_DENIED"
    assert "revokedAt" in got[6]
    assert [g.get("error") for g in got[7:10]] == ["UNAUTHENTICATED"] * 3
    assert "revokedAt" in next(t for t in got[10] if t["tokenId"] == oid)
    active = [t["tokenId"] for t in got[11]]
    assert oid not in active and reader["token"]["tokenId"] in active
    # The CLI says the same in one line, exit code 1.
    refused(tm(cl, "tokens", "create", token=rs, via=c2), "PERMISSION_DENIED")


def test_bad_input_is_refused_clearly_counted_and_changes_nothing(cl: CoordLab) -> None:
    admin_id = tokens.ApiToken.parse(cl.client_env()["TUNNELMESH_API_TOKEN"]).token_id
    metrics = [
        ["metric", {"name": FAILED_METRIC, "url": f"http://{c.host.ip}:8080/metrics"}] for c in cl.coords
    ]
    bad: list[list[Any]] = [
        ["create_join_token", {"ttl": 400 * 86400}],
        ["create_join_token", {"ttl": -5}],
        ["create_join_token", {"tags": ["not a tag"]}],
        ["create_join_token", {"max_uses": 3}],  # a use limit needs a reusable token
        ["create_api_token", {"role": 0}],
        ["create_api_token", {"role": ADMIN, "ttl": 11 * 365 * 86400}],
        ["list_nodes", {"page_token": "garbage"}],
        ["rename_node", {"node_id": "", "new_name": "x"}],
        ["get_node", {"name": ""}],
        ["revoke_join_token", {"token_id": "0123456789ab"}],
        ["revoke_api_token", {"token_id": "0123456789ab"}],
        ["rename_node", {"node_id": "n-nosuchnode", "new_name": "other"}],
        ["remove_node", {"node_id": "n-nosuchnode"}],
        ["get_node", {"node_id": "n-nosuchnode"}],
        # The bootstrap token is the only admin token: revoking it would lock every admin out.
        ["revoke_api_token", {"token_id": admin_id}],
    ]
    listing = [
        ["list_join_tokens", {"include_inactive": True}],
        ["list_api_tokens", {"include_inactive": True}],
    ]
    got = ops(cl, [*metrics, *listing, *bad, *listing, *metrics])
    n, m = len(metrics), len(listing)
    before, after = got[n : n + m], got[n + m + len(bad) : n + m + len(bad) + m]
    errors = [g.get("error") for g in got[n + m : n + m + len(bad)]]
    assert errors == ["INVALID_ARGUMENT"] * 9 + ["NOT_FOUND"] * 5 + ["FAILED_PRECONDITION"], got
    assert after == before
    assert sum(got[-n:]) - sum(got[:n]) == len(bad)
    # The CLI: one line naming the problem, exit code 1.
    r = tm(cl, "tokens", "create", "--ttl", "400d")
    refused(r, "INVALID_ARGUMENT")
    assert "at most 365 days" in r.stderr


def test_nodes_are_listed_shown_renamed_and_removed(cl: CoordLab) -> None:
    c1, c2, c3 = cl.coords
    got = ops(
        cl,
        [
            ["create_join_token", {"reusable": True, "tags": ["tag:ci"]}, {"via": c1}],
            ["register", {"join_token": "$0.secret", "name": "alpha"}, {"via": c2}],
            ["register", {"join_token": "$0.secret", "name": "beta"}, {"via": c3}],
            ["get_node", {"name": "beta"}, {"via": c1}],
            ["rename_node", {"node_id": "$2.nodeId", "new_name": "alpha"}, {"via": c1}],
            ["rename_node", {"node_id": "$2.nodeId", "new_name": "Not_A_Label"}, {"via": c1}],
            ["rename_node", {"node_id": "$2.nodeId", "new_name": "gamma"}, {"via": c2}],
            ["get_node", {"name": "gamma"}, {"via": c3}],
            ["list_nodes", {"tags": ["tag:ci"], "page_size": 1}, {"via": c1}],
            [
                "list_nodes",
                {"tags": ["tag:ci"], "page_size": 1, "page_token": "$8.nextPageToken"},
                {"via": c2},
            ],
            ["remove_node", {"node_id": "$1.nodeId"}, {"via": c3}],
            ["get_node", {"node_id": "$1.nodeId"}, {"via": c1}],
            ["list_nodes", {"tags": ["tag:nobody-has-it"]}, {"via": c2}],
        ],
    )
    alpha, beta = got[1], got[2]
    assert "error" not in alpha and "error" not in beta, got
    assert got[3]["nodeId"] == beta["nodeId"] and got[3]["tags"] == ["tag:ci"]
    assert got[3]["meshIps"] == [a.split("/")[0] for a in beta["meshAddresses"]]
    assert got[4]["error"] == "ALREADY_EXISTS" and "alpha" in got[4]["detail"]
    assert got[5]["error"] == "INVALID_ARGUMENT"
    assert got[6]["name"] == "gamma" and got[7]["nodeId"] == beta["nodeId"]
    # Pages, ordered by name: alpha, then gamma and no further page.
    assert [n["name"] for n in got[8]["nodes"]] == ["alpha"] and got[8]["nextPageToken"]
    assert [n["name"] for n in got[9]["nodes"]] == ["gamma"] and not got[9].get("nextPageToken")
    assert got[10] is None and got[11]["error"] == "NOT_FOUND"
    assert got[12] == {}
    # The CLI, for scripts.
    r = tm(cl, "nodes", "list", "--json", via=c3)
    assert r.returncode == 0, r.stderr
    assert [(n["nodeId"], n["name"]) for n in json.loads(r.stdout)] == [(beta["nodeId"], "gamma")]
    # And as a person types it: by name, through other members.
    r = tm(cl, "nodes", "rename", "gamma", "delta", via=c1)
    assert r.returncode == 0 and f"renamed node {beta['nodeId']}: gamma -> delta" in r.stdout, r.stderr
    r = tm(cl, "nodes", "remove", "delta", via=c2)
    assert r.returncode == 0 and f"removed node delta ({beta['nodeId']}" in r.stdout, r.stderr
    refused(tm(cl, "nodes", "show", beta["nodeId"], via=c3), "NOT_FOUND")
