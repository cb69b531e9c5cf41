"""The bearer secrets of the public API: join tokens, API tokens and node tokens.

Every token is ``<kind>_<id>_<secret>`` in lowercase hex, so it survives copy and paste, shells and URLs:

* join token ``tmj_<id>_<secret>_<ca>``: made by ``CreateJoinToken``, given to ``tunnelmesh join --token``.
  ``<ca>`` is the SHA-256 of the mesh CA certificate: the joining node fetches the CA from any coordinator
  and trusts it only if it matches (``pki.fetch_pinned_ca``), so a token is all a new node needs.
* API token ``tma_<id>_<secret>``: the ``authorization: Bearer`` credential of ``AdminService`` calls.
* node token ``tmn_<node id>_<secret>``: returned by ``Register``, the credential of ``WatchConfig`` and
  ``ReportStatus``.

Coordinators store only ``secret_hash(secret)``; the id finds the record, the hash is compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from tunnelmesh.errors import TunnelMeshError

JOIN_PREFIX = "tmj"
API_PREFIX = "tma"
NODE_PREFIX = "tmn"

ID_BYTES = 6  # 12 hex digits: ids only need to be unique, the secret carries the entropy
SECRET_BYTES = 20  # 160 bits

_HEX_ID = r"[0-9a-f]{12}"
_NODE_ID = r"[a-z0-9][a-z0-9.-]{0,63}"  # node ids are state.py ids without '_', which separates the parts
_SECRET = r"[0-9a-f]{40}"
_JOIN_RE = re.compile(rf"tmj_({_HEX_ID})_({_SECRET})_([0-9a-f]{{64}})")
_API_RE = re.compile(rf"tma_({_HEX_ID})_({_SECRET})")
_NODE_RE = re.compile(rf"tmn_({_NODE_ID})_({_SECRET})")


class TokenError(TunnelMeshError):
    """A token string is malformed (never says more: the caller adds where it came from)."""


def secret_hash(secret: str) -> bytes:
    """What coordinators store and compare: SHA-256 of the secret's text."""
    return hashlib.sha256(secret.encode()).digest()


def matches(secret: str, stored_hash: bytes) -> bool:
    """Constant-time check of a presented secret against a stored hash."""
    return hmac.compare_digest(secret_hash(secret), stored_hash)


def new_id() -> str:
    return secrets.token_hex(ID_BYTES)


def _new_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


@dataclass(frozen=True, slots=True)
class JoinToken:
    token_id: str
    secret: str = field(repr=False)
    ca_fingerprint: str  # "sha256:<hex>", as pki.ca_fingerprint returns it

    def __str__(self) -> str:
        return f"{JOIN_PREFIX}_{self.token_id}_{self.secret}_{self.ca_fingerprint.removeprefix('sha256:')}"

    @property
    def secret_hash(self) -> bytes:
        return secret_hash(self.secret)

    @classmethod
    def new(cls, ca_fingerprint: str) -> JoinToken:
        fingerprint = ca_fingerprint.lower()
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint):
            raise TokenError(f"CA fingerprint {ca_fingerprint!r} is not sha256:<64 hex digits>")
        return cls(new_id(), _new_secret(), fingerprint)

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        m = _JOIN_RE.fullmatch(text.strip())
        if m is None:
            raise TokenError(
                "malformed join token: expected tmj_<12 hex>_<40 hex>_<64 hex> as printed by "
                "`tunnelmesh up` or `tunnelmesh tokens create`"
            )
        return cls(m[1], m[2], "sha256:" + m[3])


@dataclass(frozen=True, slots=True)
class ApiToken:
    token_id: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{API_PREFIX}_{self.token_id}_{self.secret}"

    @property
    def secret_hash(self) -> bytes:
        return secret_hash(self.secret)

    @classmethod
    def new(cls) -> ApiToken:
        return cls(new_id(), _new_secret())

    @classmethod
    def parse(cls, text: str) -> ApiToken:
        m = _API_RE.fullmatch(text.strip())
        if m is None:
            raise TokenError("malformed API token: expected tma_<12 hex>_<40 hex>")
        return cls(m[1], m[2])


@dataclass(frozen=True, slots=True)
class NodeToken:
    node_id: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{NODE_PREFIX}_{self.node_id}_{self.secret}"

    @property
    def secret_hash(self) -> bytes:
        return secret_hash(self.secret)

    @classmethod
    def new(cls, node_id: str) -> NodeToken:
        if not re.fullmatch(_NODE_ID, node_id):
            raise TokenError(f"node id {node_id!r} cannot be part of a node token")
        return cls(node_id, _new_secret())

    @classmethod
    def parse(cls, text: str) -> NodeToken:
        m = _NODE_RE.fullmatch(text.strip())
        if m is None:
            raise TokenError("malformed node token: expected tmn_<node id>_<40 hex>")
        return cls(m[1], m[2])


def bearer(metadata: object) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in gRPC invocation metadata, if any."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None
