"""The node agent's state directory: what a node keeps on disk to restart without any coordinator.

Layout (default ``/var/lib/tunnelmesh/node``, directory mode 0700):

* ``node.key`` (0600, written once by ``join``): the node's X25519 private key, its identity in the mesh.
* ``node.json`` (0600, ``join``): node id, name, mesh id and domain, mesh addresses, coordinator addresses,
  the node token, interface settings.
* ``ca.pem`` (0644, ``join``): the mesh CA certificate, pinned by the join token's fingerprint.
* ``tls.key`` / ``tls.crt`` (0600 / 0644, ``join``): the node's TLS client key (P-256) and the certificate
  issued for its CSR.
* ``config.pb`` (0600, the daemon): the last config applied, a serialized ``ConfigSnapshot`` (it holds the
  mesh PSK).

``node.json`` is 0600 because the node token is a credential. Every file is replaced atomically (temporary
file, fsync, rename, fsync of the directory), so a crash leaves the old or the new version, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from google.protobuf.message import DecodeError

from tunnelmesh.api.v1 import node_pb2
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.fsutil import FileTooLargeError, NotRegularFileError, read_regular_file, write_atomic

DEFAULT_STATE_DIR: Final = Path("/var/lib/tunnelmesh/node")
STATE_VERSION: Final = 1
MAX_FILE: Final = 64 << 20  # a config.pb of 100k peers is far below this


class StateDirError(TunnelMeshError):
    """The state directory is missing, unreadable or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class NodeState:
    """``node.json``: who this node is in which mesh, and how to reach the coordinators."""

    node_id: str
    name: str
    mesh_id: str
    mesh_addresses: tuple[str, ...]  # with prefix length, for the TUN interface ("100.64.0.7/10")
    mesh_domain: str
    coordinators: tuple[str, ...]  # public API addresses, tried in order
    node_token: str = field(repr=False)
    ca_fingerprint: str = ""
    cluster_id: str = (
        ""  # from the CA: coordinators' TLS names are <member>.coord.<cluster>.tunnelmesh.invalid
    )
    interface: str = "tunnelmesh0"
    listen_port: int = 51820

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mesh_addresses"] = list(self.mesh_addresses)
        data["coordinators"] = list(self.coordinators)
        data["version"] = STATE_VERSION
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> NodeState:
        if not isinstance(data, dict):
            raise StateDirError(f"{where}: expected a JSON object")
        try:
            return cls(
                node_id=_str(data, "node_id", where),
                name=_str(data, "name", where),
                mesh_id=_str(data, "mesh_id", where),
                mesh_addresses=tuple(_strs(data, "mesh_addresses", where)),
                mesh_domain=str(data.get("mesh_domain", "")),
                coordinators=tuple(_strs(data, "coordinators", where)),
                node_token=_str(data, "node_token", where),
                ca_fingerprint=str(data.get("ca_fingerprint", "")),
                cluster_id=str(data.get("cluster_id", "")),
                interface=str(data.get("interface", "tunnelmesh0")),
                listen_port=int(data.get("listen_port", 51820)),
            )
        except (TypeError, ValueError) as exc:
            raise StateDirError(f"{where}: {exc}") from None

    def with_coordinators(self, addresses: list[str]) -> NodeState:
        return replace(self, coordinators=tuple(addresses))


def _str(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise StateDirError(f"{where}: field {key!r} is missing or not a string; run `tunnelmesh join` again")
    return value


def _strs(data: dict[str, Any], key: str, where: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StateDirError(f"{where}: field {key!r} must be a list of strings; run `tunnelmesh join` again")
    return value


class StateDir:
    """Paths and atomic reads/writes of one node state directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    @property
    def key_path(self) -> Path:
        return self.path / "node.key"

    @property
    def state_path(self) -> Path:
        return self.path / "node.json"

    @property
    def ca_path(self) -> Path:
        return self.path / "ca.pem"

    @property
    def config_path(self) -> Path:
        return self.path / "config.pb"

    @property
    def tls_key_path(self) -> Path:
        return self.path / "tls.key"

    @property
    def tls_cert_path(self) -> Path:
        return self.path / "tls.crt"

    def ensure(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateDirError(
                f"{self.path}: cannot create the node state directory: {exc.strerror}"
            ) from None

    # -- node.json -------------------------------------------------------------------------------------------

    def joined(self) -> bool:
        return self.state_path.exists()

    def read_state(self) -> NodeState:
        if not self.state_path.exists():
            raise StateDirError(
                f"{self.state_path}: not found; this node has not joined a mesh yet. Run "
                f"`tunnelmesh join COORD --token TOKEN --state-dir {self.path}` first"
            )
        raw = self._read(self.state_path, private=True)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StateDirError(
                f"{self.state_path}: not valid JSON ({exc}); run `tunnelmesh join` again"
            ) from None
        return NodeState.from_json(data, str(self.state_path))

    def write_state(self, state: NodeState) -> None:
        data = json.dumps(state.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        atomic_write(self.state_path, data, 0o600)

    # -- ca.pem, tls.key, tls.crt ---------------------------------------------------------------------------

    def read_ca(self) -> bytes:
        if not self.ca_path.exists():
            raise StateDirError(f"{self.ca_path}: the mesh CA is missing; run `tunnelmesh join` again")
        return self._read(self.ca_path, private=False)

    def write_ca(self, pem: bytes) -> None:
        atomic_write(self.ca_path, pem, 0o644)

    def write_tls(self, key_pem: bytes, chain_pem: bytes) -> None:
        atomic_write(self.tls_key_path, key_pem, 0o600)
        if chain_pem:
            atomic_write(self.tls_cert_path, chain_pem, 0o644)

    # -- config.pb -------------------------------------------------------------------------------------------

    def read_config(self) -> node_pb2.ConfigSnapshot | None:
        """The last applied config, or None if there is none. A corrupt file raises StateDirError (the caller
        decides: the daemon logs it, counts it and starts without a cached config)."""
        if not self.config_path.exists():
            return None
        raw = self._read(self.config_path, private=True)
        snapshot = node_pb2.ConfigSnapshot()
        try:
            snapshot.ParseFromString(raw)
        except DecodeError as exc:
            raise StateDirError(f"{self.config_path}: not a ConfigSnapshot ({exc})") from None
        return snapshot

    def write_config(self, snapshot: node_pb2.ConfigSnapshot) -> None:
        atomic_write(self.config_path, snapshot.SerializeToString(deterministic=True), 0o600)

    def forget_config(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.config_path.unlink()

    def _read(self, path: Path, *, private: bool) -> bytes:
        try:
            data, mode = read_regular_file(path, MAX_FILE)
        except NotRegularFileError:
            raise StateDirError(f"{path}: must be a regular file") from None
        except FileTooLargeError as exc:
            raise StateDirError(
                f"{path}: {exc.size} bytes is far too large; check the state directory"
            ) from None
        except OSError as exc:
            raise StateDirError(f"{path}: cannot open: {exc.strerror}") from None
        if private and mode & 0o077:
            raise StateDirError(
                f"{path}: holds a credential but is accessible by group or others "
                f"(mode {mode:04o}); fix with chmod 600 {path}"
            )
        return data


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically and durably, created with ``mode`` (never wider, whatever the
    umask), in a 0700 directory."""
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise StateDirError(f"{path}: cannot write: {exc.strerror}") from None
