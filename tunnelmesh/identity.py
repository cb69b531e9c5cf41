"""Node identity: the X25519 key pair a node is known by in the mesh.

Keys are stored exactly as ``wg genkey`` writes them (32 bytes, standard base64, one line), so a key file
works with ``wg pubkey`` and any WireGuard tool. The private key never leaves the node: coordinators only ever
see the public key (ARCHITECTURE.md §4, Register).

A key file is written atomically with mode 0600 (temporary file created with O_EXCL, fsync, rename, fsync of
the directory) so a crash never leaves a truncated or world-readable key, and it is refused on load if group
or others can read it, the way OpenSSH refuses such a private key.

Optionally the key is derived from an existing OpenSSH ed25519 private key (``~/.ssh/id_ed25519``): the
ed25519 secret is converted to an X25519 scalar with libsodium's ``crypto_sign_ed25519_sk_to_curve25519`` (the
birational map from Edwards to Montgomery form that age and ssh-to-age use). The ``openssh-key-v1`` container
is parsed here; only unencrypted ed25519 keys can be used.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import shlex
import struct
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nacl.public
import nacl.signing

from tunnelmesh.errors import IdentityError
from tunnelmesh.fsutil import FileTooLargeError, NotRegularFileError, read_regular_file, write_atomic

__all__ = [
    "KEY_FILE_MODE",
    "KEY_LEN",
    "NodeIdentity",
    "derive_from_ssh_key",
    "fingerprint",
    "generate",
    "load_node_identity",
    "load_or_create",
    "load_private_key",
    "parse_private_key",
    "parse_public_key",
    "public_key_from_private",
    "save_private_key",
]

KEY_LEN = 32
KEY_FILE_MODE = 0o600
FINGERPRINT_LEN = 8

_OPENSSH_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_END = "-----END OPENSSH PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\x00"
_NO_KEY_HINT = "or remove ssh_key from the config to let TunnelMesh generate its own node key"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def fingerprint(public_key: bytes | str) -> str:
    """Short, log-friendly name of a public key: the first 8 characters of its base64 form."""
    text = public_key if isinstance(public_key, str) else _b64(public_key)
    return text[:FINGERPRINT_LEN]


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A node's X25519 key pair. ``repr`` shows only the public fingerprint, so logging it leaks nothing."""

    private_key: nacl.public.PrivateKey = field(repr=False)

    @property
    def public_key(self) -> nacl.public.PublicKey:
        return self.private_key.public_key

    @property
    def public_key_bytes(self) -> bytes:
        return bytes(self.private_key.public_key)

    @property
    def public_key_b64(self) -> str:
        """The public key as ``wg pubkey`` prints it."""
        return _b64(self.public_key_bytes)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key_bytes)

    def private_key_b64(self) -> str:
        """The private key as ``wg genkey`` prints it. A method, not a property, so it is never dumped by
        accident."""
        return _b64(bytes(self.private_key))

    def __repr__(self) -> str:
        return f"NodeIdentity(public={self.fingerprint}...)"


def _clamp(scalar: bytes) -> bytes:
    # RFC 7748 clamping, as `wg genkey` applies it, so our key files look exactly like WireGuard's.
    b = bytearray(scalar)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)


def generate() -> NodeIdentity:
    """A fresh random key pair."""
    return NodeIdentity(nacl.public.PrivateKey(_clamp(secrets.token_bytes(KEY_LEN))))


def parse_private_key(text: str | bytes, *, source: str = "private key") -> NodeIdentity:
    """Parse a base64 private key (``wg genkey`` format). Messages never include key material."""
    raw = _decode_key(text, source, "private")
    return NodeIdentity(nacl.public.PrivateKey(raw))


def parse_public_key(text: str | bytes, *, source: str = "public key") -> nacl.public.PublicKey:
    """Parse a base64 public key (``wg pubkey`` format)."""
    return nacl.public.PublicKey(_decode_key(text, source, "public"))


def public_key_from_private(text: str | bytes) -> str:
    """``wg pubkey``: base64 private key in, base64 public key out."""
    return parse_private_key(text).public_key_b64


def _decode_key(text: str | bytes, source: str, kind: str) -> bytes:
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise IdentityError(
                f"{source}: not a base64 {kind} key (binary data); expected one line like `wg genkey` prints"
            ) from None
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(
            f"{source}: not a base64 {kind} key; expected 44 characters on one line, as `wg genkey` prints"
        ) from None
    if len(raw) != KEY_LEN:
        raise IdentityError(
            f"{source}: a {kind} key is {KEY_LEN} bytes, this one is {len(raw)}; "
            f"expected 44 base64 characters, as `wg genkey` prints"
        )
    return raw


# ------------------------------------------------------------------------------------------------------------
# Files


def save_private_key(
    identity: NodeIdentity, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write the private key to ``path`` atomically with mode 0600; create the directory (0700) if missing.

    Without ``overwrite`` an existing file is never replaced (even by a concurrent writer): replacing a node's
    key changes its identity in the mesh. Returns the path written.
    """
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"{target.parent}: cannot create key directory: {exc.strerror}") from None
    if not overwrite and target.exists():
        raise IdentityError(
            f"{target}: a key already exists; it is this node's identity. Move it away first if you really "
            f"want a new one (the node must then re-register)"
        )
    data = (identity.private_key_b64() + "\n").encode("ascii")
    try:
        # Without overwrite the file is linked into place: a concurrent writer's key is never clobbered.
        write_atomic(target, data, KEY_FILE_MODE, overwrite=overwrite)
    except FileExistsError:
        raise IdentityError(f"{target}: a key was created concurrently; load it instead") from None
    except OSError as exc:
        raise IdentityError(f"{target}: cannot write key file: {exc.strerror}") from None
    return target


def _read_key_file(path: Path, what: str) -> tuple[bytes, int]:
    """Read a (small) key file; returns its bytes and permission bits, taken from the open file so the file
    cannot be swapped between the check and the read."""
    try:
        return read_regular_file(path, 64 * 1024)
    except FileNotFoundError:
        raise IdentityError(
            f"{path}: {what} not found; create one with `tunnelmesh node keygen` or fix the path"
        ) from None
    except PermissionError:
        raise IdentityError(
            f"{path}: permission denied reading the {what}; run as its owner or as root"
        ) from None
    except NotRegularFileError:
        raise IdentityError(f"{path}: the {what} must be a regular file") from None
    except FileTooLargeError as exc:
        raise IdentityError(
            f"{path}: {exc.size} bytes is far too large for a {what}; check the path"
        ) from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot open the {what}: {exc.strerror}") from None


def _require_private_mode(path: Path, what: str, mode: int) -> None:
    # As OpenSSH does for private keys: anything group/other can read (or write) may already be leaked.
    if mode & 0o077:
        raise IdentityError(
            f"{path}: the {what} is accessible by group or others (mode {mode:04o}); a private key must be "
            f"readable only by its owner. Fix with: chmod 600 {shlex.quote(str(path))}"
        )


def read_private_key_file(path: Path, what: str = "private key") -> bytes:
    """The bytes of a secret key file, refused unless only its owner can read it (any key kind: node keys,
    WireGuard pre-shared keys)."""
    raw, mode = _read_key_file(path, what)
    _require_private_mode(path, what, mode)
    return raw


def load_private_key(path: str | os.PathLike[str]) -> NodeIdentity:
    """Load a node key written by :func:`save_private_key` or by ``(umask 077; wg genkey > file)``."""
    target = Path(path).expanduser()
    return parse_private_key(read_private_key_file(target, "node key"), source=str(target))


def load_or_create(path: str | os.PathLike[str]) -> tuple[NodeIdentity, bool]:
    """Load the node key at ``path``, generating and saving one on first run. Returns (identity, created)."""
    target = Path(path).expanduser()
    if target.exists():
        return load_private_key(target), False
    try:
        return load_private_key(save_private_key(generate(), target)), True
    except IdentityError:
        if target.exists():  # lost a race with another process creating it: use theirs
            return load_private_key(target), False
        raise


def load_node_identity(
    key_file: str | os.PathLike[str], ssh_key: str | os.PathLike[str] | None = None
) -> NodeIdentity:
    """The identity a node runs with: derived from ``ssh_key`` if set (nothing is written: the SSH key stays
    the only copy of the secret), else loaded from ``key_file``, which is created on first run."""
    if ssh_key is not None:
        return derive_from_ssh_key(ssh_key)
    return load_or_create(key_file)[0]


# ------------------------------------------------------------------------------------------------------------
# OpenSSH ed25519 keys (format: OpenSSH's PROTOCOL.key)


class _Reader:
    """SSH wire-format reader (RFC 4251 uint32 and length-prefixed strings) with bounds checks."""

    def __init__(self, data: bytes, source: str) -> None:
        self._data = data
        self._pos = 0
        self._source = source

    def _truncated(self) -> IdentityError:
        return IdentityError(
            f"{self._source}: OpenSSH private key is truncated or corrupt; regenerate or re-copy it"
        )

    def uint32(self) -> int:
        if self._pos + 4 > len(self._data):
            raise self._truncated()
        (value,) = struct.unpack_from(">I", self._data, self._pos)
        self._pos += 4
        return int(value)

    def string(self) -> bytes:
        length = self.uint32()
        if self._pos + length > len(self._data):
            raise self._truncated()
        value = self._data[self._pos : self._pos + length]
        self._pos += length
        return value

    def rest(self) -> bytes:
        return self._data[self._pos :]


def _openssh_blob(text: str, source: str) -> bytes:
    stripped = text.strip()
    if stripped.startswith(("ssh-ed25519 ", "ssh-rsa ", "ecdsa-sha2-", "sk-ssh-")):
        raise IdentityError(
            f"{source}: this is an SSH *public* key; point ssh_key at the private key (the file without .pub)"
        )
    if stripped.startswith("-----BEGIN ") and not stripped.startswith(_OPENSSH_BEGIN):
        kind = stripped.split("-----")[1].removeprefix("BEGIN ").strip()
        raise IdentityError(
            f"{source}: a '{kind}' PEM file, not an OpenSSH ed25519 private key; only ed25519 keys can "
            f"become a node key (create one with `ssh-keygen -t ed25519`), {_NO_KEY_HINT}"
        )
    if not stripped.startswith(_OPENSSH_BEGIN) or _OPENSSH_END not in stripped:
        raise IdentityError(
            f"{source}: not an OpenSSH private key (expected a '{_OPENSSH_BEGIN}' block); "
            f"use a key made by `ssh-keygen -t ed25519`, {_NO_KEY_HINT}"
        )
    body = stripped[len(_OPENSSH_BEGIN) : stripped.index(_OPENSSH_END)]
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(f"{source}: OpenSSH private key is not valid base64; re-copy the file") from None


def derive_from_ssh_key(path: str | os.PathLike[str]) -> NodeIdentity:
    """Derive the node's X25519 key from an unencrypted OpenSSH ed25519 private key.

    The result is checked: the X25519 public key of the converted secret must equal the converted ed25519
    public key, so a malformed or mismatched key file cannot yield a silently wrong identity.
    """
    target = Path(path).expanduser()
    source = str(target)
    raw, mode = _read_key_file(target, "SSH private key")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise IdentityError(f"{source}: not an OpenSSH private key (binary data); {_NO_KEY_HINT}") from None
    blob = _openssh_blob(text, source)  # first, so a .pub file given by mistake gets the right message
    _require_private_mode(target, "SSH private key", mode)
    if not blob.startswith(_OPENSSH_MAGIC):
        raise IdentityError(
            f"{source}: not an 'openssh-key-v1' key; re-copy it or create one with ssh-keygen"
        )
    reader = _Reader(blob[len(_OPENSSH_MAGIC) :], source)
    cipher, kdf, _kdf_options = reader.string(), reader.string(), reader.string()
    if cipher != b"none" or kdf != b"none":
        raise IdentityError(
            f"{source}: the SSH key is encrypted with a passphrase ({cipher.decode(errors='replace')}); "
            f"TunnelMesh runs unattended and cannot ask for it. Use an unencrypted ed25519 key "
            f"(ssh-keygen -t ed25519 -N ''), {_NO_KEY_HINT}"
        )
    if reader.uint32() != 1:
        raise IdentityError(f"{source}: the file holds several keys; use a file with exactly one ed25519 key")
    public_blob = _Reader(reader.string(), source)
    key_type = public_blob.string()
    if key_type != b"ssh-ed25519":
        raise IdentityError(
            f"{source}: this is an {key_type.decode(errors='replace')} key; only ed25519 keys can be "
            f"converted to a node key (X25519). Create one with `ssh-keygen -t ed25519`, {_NO_KEY_HINT}"
        )
    ed_public = public_blob.string()

    private = _Reader(reader.string(), source)
    if private.uint32() != private.uint32():
        # In an unencrypted key the two check words are equal; if not, the key is corrupt.
        raise IdentityError(
            f"{source}: OpenSSH private key failed its integrity check; re-copy or regenerate it"
        )
    if private.string() != b"ssh-ed25519":
        raise IdentityError(
            f"{source}: private and public parts disagree on the key type; the file is corrupt"
        )
    ed_public_again, ed_secret = private.string(), private.string()
    private.string()  # comment
    padding = private.rest()
    if padding != bytes(range(1, len(padding) + 1)):
        raise IdentityError(f"{source}: OpenSSH private key has bad padding; the file is corrupt")
    if (
        len(ed_public) != 32
        or ed_public_again != ed_public
        or len(ed_secret) != 64
        or ed_secret[32:] != ed_public
    ):
        raise IdentityError(f"{source}: ed25519 key parts have wrong sizes or disagree; the file is corrupt")
    if bytes(nacl.signing.SigningKey(ed_secret[:32]).verify_key) != ed_public:
        raise IdentityError(
            f"{source}: the ed25519 secret does not match its public key; the file is corrupt"
        )

    x_secret = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(ed_secret)
    identity = NodeIdentity(nacl.public.PrivateKey(x_secret))
    if identity.public_key_bytes != nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(ed_public):
        raise IdentityError(f"{source}: ed25519 to X25519 conversion check failed; use a key from ssh-keygen")
    return identity
