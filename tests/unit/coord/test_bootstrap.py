"""The bootstrap commands (coord/bootstrap.py): written once, proposed until applied, applied once, against
the real state machine. The path through real coordinator processes, with a crash, is in
tests/integration/test_api_auth.py."""

from __future__ import annotations

import asyncio
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from tunnelmesh import tokens
from tunnelmesh.api.v1 import common_pb2, state_pb2
from tunnelmesh.coord import bootstrap
from tunnelmesh.coord.bootstrap import BootstrapError, MeshOptions
from tunnelmesh.coord.state import MeshState


class Replica:
    """``Coordinator.write`` over one real MeshState: each write is the next log entry."""

    def __init__(self, fail_first: int = 0) -> None:
        self.state = MeshState()
        self.index = 0
        self.fail_first = fail_first
        self.writes = 0

    async def write(self, data: bytes, timeout: float) -> state_pb2.CommandResult:  # noqa: ASYNC109 - as Coordinator.write
        self.writes += 1
        if self.writes <= self.fail_first:
            raise RuntimeError("no leader")
        self.index += 1
        return self.state.apply(self.index, data)


def _run(d: Path, replica: Replica) -> None:
    asyncio.run(bootstrap.propose_pending(d, replica.write, actor="coordinator:c1"))


def test_prepare_writes_private_files_once(tmp_path: Path) -> None:
    path = bootstrap.prepare(tmp_path, MeshOptions())
    pending = tmp_path / bootstrap.PENDING_FILE
    assert path == tmp_path / "admin-token"
    for f in (path, pending):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    token, doc = path.read_text(), pending.read_text()
    tokens.ApiToken.parse(token)
    # A bootstrap that crashed before creating the store runs again: same token, same settings.
    bootstrap.prepare(tmp_path, MeshOptions(domain="other.example"))
    assert (path.read_text(), pending.read_text()) == (token, doc)


def test_pending_commands_apply_once_even_when_proposed_again(tmp_path: Path) -> None:
    token = str(tokens.ApiToken.new())
    bootstrap.prepare(tmp_path, MeshOptions(domain="corp.example", prefix="10.99.0.0/16"), admin_token=token)
    saved = tmp_path / "saved.json"
    shutil.copy(tmp_path / bootstrap.PENDING_FILE, saved)
    replica = Replica(fail_first=2)  # no leader at first: retried
    _run(tmp_path, replica)
    assert not (tmp_path / bootstrap.PENDING_FILE).exists()
    settings = replica.state.settings
    assert settings is not None
    assert (settings.mesh_domain, settings.mesh_prefixes, settings.mtu) == (
        "corp.example",
        ("10.99.0.0/16",),
        1420,
    )
    assert len(settings.mesh_id) == 16 and len(settings.preshared_key) == 32
    api = tokens.ApiToken.parse(token)
    record = replica.state.get_api_token(api.token_id)
    assert (
        record is not None
        and record.role == common_pb2.ROLE_ADMIN
        and tokens.matches(api.secret, record.secret_hash)
    )
    # A crash after the apply, before the file was deleted: proposed again, answered from the request table.
    shutil.copy(saved, tmp_path / bootstrap.PENDING_FILE)
    _run(tmp_path, replica)
    assert replica.state.settings == settings
    assert not (tmp_path / bootstrap.PENDING_FILE).exists()


def test_already_initialized_state_counts_as_done(tmp_path: Path) -> None:
    # The request table forgot the first attempt: the state machine refuses a second InitializeMesh and a
    # second token with the same id, which is what "already done" looks like.
    bootstrap.prepare(tmp_path, MeshOptions())
    saved = (tmp_path / bootstrap.PENDING_FILE).read_text()
    replica = Replica()
    _run(tmp_path, replica)
    before = replica.state.settings
    (tmp_path / bootstrap.PENDING_FILE).write_text(saved.replace("bootstrap-", "forgotten-"))
    _run(tmp_path, replica)
    assert replica.state.settings == before


@pytest.mark.parametrize(
    ("mesh", "token", "message"),
    [
        (
            MeshOptions(domain="Mesh_Internal"),
            None,
            "--mesh-domain 'Mesh_Internal' is not a lowercase DNS name",
        ),
        (MeshOptions(prefix="100.64.0.1/10"), None, "--mesh-prefix: '100.64.0.1/10' is not a CIDR prefix"),
        (MeshOptions(), "tma_short", "coord.admin_token: malformed API token"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(
    tmp_path: Path, mesh: MeshOptions, token: str | None, message: str
) -> None:
    with pytest.raises(BootstrapError, match=message.replace("(", r"\(")):
        bootstrap.prepare(tmp_path, mesh, admin_token=token)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_pending_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / bootstrap.PENDING_FILE).write_text("{not json")
    with pytest.raises(BootstrapError, match="damaged bootstrap file"):
        _run(tmp_path, Replica())


def test_no_pending_file_proposes_nothing(tmp_path: Path) -> None:
    replica: Any = Replica()
    _run(tmp_path, replica)
    assert replica.writes == 0
