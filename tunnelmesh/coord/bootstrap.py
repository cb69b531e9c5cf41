"""The first commands of a new mesh, ``InitializeMesh`` and the bootstrap admin API token, proposed once.

``tunnelmesh coord --bootstrap`` creates the cluster (server.py) and, here, before the Raft store exists:

* ``D/admin-token`` (0600): a new ``tma_...`` API token with ROLE_ADMIN, the operator's first credential;
* ``D/bootstrap-pending.json`` (0600, it holds the mesh PSK): the ``InitializeMesh`` (random mesh id, domain,
  prefix, random PSK, MTU) and ``CreateApiToken`` (the token's hash) commands, each with a fixed request id.

The coordinator proposes the pending commands once it serves (it is the only voter, so the first leader) and
deletes the file when both are applied. Crash-safe at every step: a bootstrap that crashed before creating the
store reuses both files; a coordinator that crashed before or during the proposals proposes them again at its
next start; a retry of a command that was applied is answered from the request table (same request id) or,
after that table forgot it, refused by the state machine as already done (mesh already initialized, token id
already exists); both count as success. So the mesh is initialized exactly once and the token created once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tunnelmesh import client, tokens
from tunnelmesh.api.v1 import common_pb2, state_pb2
from tunnelmesh.coord.ipam import parse_prefix
from tunnelmesh.coord.state import _LABEL_RE as DNS_LABEL
from tunnelmesh.coord.state import encode_command
from tunnelmesh.errors import TunnelMeshError

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE: Final = client.ADMIN_TOKEN_FILE  # clients read it with --data-dir
PENDING_FILE: Final = "bootstrap-pending.json"

DEFAULT_MESH_DOMAIN: Final = "mesh.internal"
DEFAULT_MESH_PREFIX: Final = "100.64.0.0/10"
DEFAULT_MTU: Final = 1420
PSK_BYTES: Final = 32
RETRY_PAUSE: Final = 0.5  # seconds between proposal attempts while there is no leader yet

# Fixed request ids: a retried proposal is applied at most once.
INITIALIZE_REQUEST_ID: Final = "bootstrap-initialize-mesh"
ADMIN_TOKEN_REQUEST_ID: Final = "bootstrap-admin-token"

# What "already done" looks like when the request table no longer remembers the first attempt.
_DONE_ALREADY: Final = {
    "initialize_mesh": state_pb2.COMMAND_ERROR_CODE_FAILED_PRECONDITION,
    "create_api_token": state_pb2.COMMAND_ERROR_CODE_ALREADY_EXISTS,
}


class BootstrapError(TunnelMeshError):
    """The mesh settings given at bootstrap are invalid, or the pending file is damaged."""


@dataclass(frozen=True, slots=True)
class MeshOptions:
    """``--mesh-domain`` / ``--mesh-prefix``: used once, when the cluster is bootstrapped."""

    domain: str = DEFAULT_MESH_DOMAIN
    prefix: str = DEFAULT_MESH_PREFIX
    mtu: int = DEFAULT_MTU


def _check(mesh: MeshOptions) -> None:
    # The state machine's own rule, checked here so that a typo fails at once rather than at the proposal.
    if len(mesh.domain) > 253 or not all(DNS_LABEL.fullmatch(label) for label in mesh.domain.split(".")):
        raise BootstrapError(
            f"--mesh-domain {mesh.domain!r} is not a lowercase DNS name (e.g. mesh.internal)"
        )
    try:
        parse_prefix(mesh.prefix)
    except ValueError as exc:
        raise BootstrapError(f"--mesh-prefix: {exc} (e.g. 100.64.0.0/10)") from None


def _write_private(path: Path, data: str) -> None:
    """Create ``path`` with mode 0600 and fsync it (and its directory); refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def prepare(data_dir: Path, mesh: MeshOptions, *, admin_token: str | None = None) -> Path:
    """Write ``D/admin-token`` (``admin_token`` if given, else a new one) and the pending commands unless a
    previous bootstrap attempt did; returns the admin token's path."""
    _check(mesh)
    if admin_token is not None:
        try:
            tokens.ApiToken.parse(admin_token)
        except tokens.TokenError as exc:
            raise BootstrapError(f"coord.admin_token: {exc} (or leave it unset to generate one)") from None
    token_path = data_dir / ADMIN_TOKEN_FILE
    if token_path.exists():
        try:
            token = tokens.ApiToken.parse(token_path.read_text())
        except tokens.TokenError as exc:
            raise BootstrapError(f"{token_path}: {exc}; delete the data dir and bootstrap again") from None
    else:
        token = tokens.ApiToken.parse(admin_token) if admin_token else tokens.ApiToken.new()
        _write_private(token_path, f"{token}\n")
    pending_path = data_dir / PENDING_FILE
    if not pending_path.exists():
        settings = state_pb2.MeshSettings(
            mesh_id=secrets.token_hex(8),
            mesh_domain=mesh.domain,
            mesh_prefixes=[mesh.prefix],
            preshared_key=secrets.token_bytes(PSK_BYTES),
            mtu=mesh.mtu,
        )
        commands = [
            ("initialize_mesh", INITIALIZE_REQUEST_ID, state_pb2.InitializeMesh(settings=settings)),
            (
                "create_api_token",
                ADMIN_TOKEN_REQUEST_ID,
                state_pb2.CreateApiToken(
                    token_id=token.token_id,
                    secret_hash=token.secret_hash,
                    description="bootstrap admin token",
                    role=common_pb2.ROLE_ADMIN,
                ),
            ),
        ]
        doc = {
            "commands": [
                {"kind": kind, "request_id": rid, "body": base64.b64encode(body.SerializeToString()).decode()}
                for kind, rid, body in commands
            ]
        }
        _write_private(pending_path, json.dumps(doc, indent=2) + "\n")
        log.info(
            "event=bootstrap_prepared mesh_id=%s domain=%s prefix=%s token_id=%s",
            settings.mesh_id,
            mesh.domain,
            mesh.prefix,
            token.token_id,
        )
    return token_path


def _load(path: Path) -> list[tuple[str, str, Any]]:
    types = {"initialize_mesh": state_pb2.InitializeMesh, "create_api_token": state_pb2.CreateApiToken}
    try:
        doc = json.loads(path.read_text())
        out = []
        for item in doc["commands"]:
            body = types[item["kind"]]()
            body.ParseFromString(base64.b64decode(item["body"], validate=True))
            out.append((item["kind"], str(item["request_id"]), body))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BootstrapError(
            f"{path}: damaged bootstrap file ({exc!r}); the mesh cannot be initialized"
        ) from None
    return out


async def propose_pending(data_dir: Path, write: Any, *, actor: str, attempt_timeout: float = 5.0) -> None:
    """Propose the pending bootstrap commands (``write(command_bytes, timeout) -> CommandResult``, as
    ``Coordinator.write``) until each is applied, then delete the file. Returns at once if there is none."""
    path = data_dir / PENDING_FILE
    if not path.exists():
        return
    for kind, request_id, body in await asyncio.to_thread(_load, path):
        while True:
            data = encode_command(body, proposed_at=time.time_ns(), request_id=request_id, actor=actor)
            try:
                result = await write(data, attempt_timeout)
            except (
                Exception
            ) as exc:  # no leader yet, election, timeout: the fixed request id makes a retry safe
                log.info("event=bootstrap_proposal_retry kind=%s error=%r", kind, str(exc))
                await asyncio.sleep(RETRY_PAUSE)
                continue
            if not result.HasField("error"):
                log.info("event=bootstrap_command_applied kind=%s request_id=%s", kind, request_id)
                break
            if result.error.code == _DONE_ALREADY[kind]:
                log.info(
                    "event=bootstrap_command_already_applied kind=%s detail=%r", kind, result.error.message
                )
                break
            raise BootstrapError(f"bootstrap command {kind} was refused: {result.error.message}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    log.info("event=bootstrap_complete")
