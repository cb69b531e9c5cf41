"""Node identity: X25519 keys in ``wg genkey`` format, stored safely, optionally derived from SSH ed25519.

Interop is checked against tools nobody here wrote: ``wg pubkey`` (wireguard-tools) must compute the same
public key from our key files, and ``ssh-keygen`` makes the SSH keys we derive from.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.errors import IdentityError
from tunnelmesh.identity import (
    NodeIdentity,
    derive_from_ssh_key,
    fingerprint,
    generate,
    load_node_identity,
    load_or_create,
    load_private_key,
    parse_private_key,
    parse_public_key,
    public_key_from_private,
    save_private_key,
)

P = 2**255 - 19


def require_tool(name: str) -> str:
    """Interop tools are installed by scripts/install-system-deps (run by scripts/test and CI), so a missing
    tool fails the test: an interop check that silently skips proves nothing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run scripts/install-system-deps (as root)")
    return path


def wg_pubkey(private_b64: str) -> str:
    wg = require_tool("wg")
    return subprocess.run(
        [wg, "pubkey"], input=private_b64 + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()


def ssh_keygen(path: Path, *args: str) -> Path:
    tool = require_tool("ssh-keygen")
    subprocess.run([tool, "-q", "-C", "test", "-f", str(path), *args], check=True, capture_output=True)
    return path


def edwards_to_montgomery(ed_public: bytes) -> bytes:
    """Independent of libsodium: u = (1 + y) / (1 - y) mod p (RFC 7748 §4.1), y from the ed25519 encoding."""
    y = int.from_bytes(ed_public, "little") & ((1 << 255) - 1)
    u = (1 + y) * pow(1 - y, P - 2, P) % P
    return u.to_bytes(32, "little")


def ssh_ed25519_public(pub_file: Path) -> bytes:
    blob = base64.b64decode(pub_file.read_text().split()[1])
    # string "ssh-ed25519" (4 + 11 bytes), then string key (4 + 32 bytes)
    return blob[19:51]


# ------------------------------------------------------------------------------------------------------------
# Generate, save, load


def test_generated_keys_round_trip_through_a_file(tmp_path: Path) -> None:
    identity = generate()
    path = save_private_key(identity, tmp_path / "node.key")
    loaded = load_private_key(path)
    assert loaded.public_key_b64 == identity.public_key_b64
    assert loaded.private_key_b64() == identity.private_key_b64()
    text = path.read_text()
    assert text.endswith("\n") and len(text.strip()) == 44  # exactly what `wg genkey` prints
    assert len(base64.b64decode(text.strip(), validate=True)) == 32


def test_key_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = save_private_key(generate(), tmp_path / "deep" / "dir" / "node.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temporary file left behind


def test_existing_key_is_never_overwritten_by_accident(tmp_path: Path) -> None:
    path = save_private_key(generate(), tmp_path / "node.key")
    before = path.read_text()
    with pytest.raises(IdentityError, match="already exists; it is this node's identity"):
        save_private_key(generate(), path)
    assert path.read_text() == before
    replacement = generate()
    save_private_key(replacement, path, overwrite=True)
    assert load_private_key(path).public_key_b64 == replacement.public_key_b64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o666])
def test_key_readable_or_writable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = save_private_key(generate(), tmp_path / "node key")
    path.chmod(mode)
    with pytest.raises(IdentityError) as info:
        load_private_key(path)
    message = str(info.value)
    assert str(path) in message and f"mode {mode:04o}" in message
    assert f"chmod 600 '{path}'" in message  # quoted: the path has a space


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = save_private_key(generate(), tmp_path / "node.key")
    path.chmod(mode)
    assert load_private_key(path).public_key_b64


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not base64 at all!\n", "not a base64 private key"),
        (base64.b64encode(b"x" * 31) + b"\n", "is 32 bytes, this one is 31"),
        (b"\xff\xfe\x00binary", "binary data"),
        (b"", "is 32 bytes, this one is 0"),
    ],
)
def test_malformed_key_files_get_clear_errors_without_key_material(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=expected) as info:
        load_private_key(path)
    assert str(path) in str(info.value)
    if content.strip():
        assert content.decode("latin-1").strip() not in str(info.value)


def test_a_fifo_at_the_key_path_is_an_error_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "node.key", 0o600)
    with pytest.raises(IdentityError, match="must be a regular file"):
        load_private_key(tmp_path / "node.key")


def test_missing_key_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="tunnelmesh node keygen"):
        load_private_key(tmp_path / "nope.key")


def test_load_or_create_creates_once_then_loads_the_same_key(tmp_path: Path) -> None:
    first, created = load_or_create(tmp_path / "node.key")
    again, created_again = load_or_create(tmp_path / "node.key")
    assert created and not created_again
    assert first.public_key_b64 == again.public_key_b64
    assert load_node_identity(tmp_path / "node.key").public_key_b64 == first.public_key_b64


def test_repr_and_fingerprint_leak_no_secret() -> None:
    identity = generate()
    assert identity.private_key_b64() not in repr(identity)
    assert identity.fingerprint == identity.public_key_b64[:8] == fingerprint(identity.public_key_bytes)
    assert fingerprint(identity.public_key_b64) == identity.fingerprint
    assert repr(identity) == f"NodeIdentity(public={identity.fingerprint}...)"


def test_public_key_parsing() -> None:
    identity = generate()
    assert bytes(parse_public_key(identity.public_key_b64)) == identity.public_key_bytes
    with pytest.raises(IdentityError, match="not a base64 public key"):
        parse_public_key("zzz")
    assert public_key_from_private(identity.private_key_b64()) == identity.public_key_b64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_key_text_raises_only_identity_error(data: bytes) -> None:
    with contextlib.suppress(IdentityError):
        parse_private_key(data)


# ------------------------------------------------------------------------------------------------------------
# Interop with wireguard-tools


def test_wg_pubkey_agrees_with_our_public_key(tmp_path: Path) -> None:
    identity = generate()
    path = save_private_key(identity, tmp_path / "node.key")
    wg = require_tool("wg")
    with path.open() as handle:
        out = subprocess.run([wg, "pubkey"], stdin=handle, capture_output=True, text=True, check=True).stdout
    assert out.strip() == identity.public_key_b64


def test_we_load_keys_made_by_wg_genkey(tmp_path: Path) -> None:
    wg = require_tool("wg")
    private = subprocess.run([wg, "genkey"], capture_output=True, text=True, check=True).stdout
    path = tmp_path / "wg.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, private.encode())
    os.close(fd)
    assert load_private_key(path).public_key_b64 == wg_pubkey(private.strip())


# ------------------------------------------------------------------------------------------------------------
# Derivation from an OpenSSH ed25519 key


def test_ssh_ed25519_key_derivation_matches_the_ssh_public_key(tmp_path: Path) -> None:
    key = ssh_keygen(tmp_path / "id_ed25519", "-t", "ed25519", "-N", "")
    identity = derive_from_ssh_key(key)
    # The X25519 public key is the Montgomery form of the SSH ed25519 public key, computed independently here.
    assert identity.public_key_bytes == edwards_to_montgomery(ssh_ed25519_public(key.with_suffix(".pub")))
    assert derive_from_ssh_key(key).private_key_b64() == identity.private_key_b64()  # deterministic
    assert wg_pubkey(identity.private_key_b64()) == identity.public_key_b64  # and usable by WireGuard
    assert load_node_identity(tmp_path / "unused.key", ssh_key=key).public_key_b64 == identity.public_key_b64
    assert not (tmp_path / "unused.key").exists()  # the SSH key stays the only copy of the secret


def test_encrypted_ssh_key_is_refused_with_the_alternatives(tmp_path: Path) -> None:
    key = ssh_keygen(tmp_path / "id_ed25519", "-t", "ed25519", "-N", "secret")
    with pytest.raises(IdentityError) as info:
        derive_from_ssh_key(key)
    message = str(info.value)
    assert str(key) in message and "encrypted with a passphrase" in message
    assert "unencrypted ed25519 key" in message and "let TunnelMesh generate its own node key" in message


def test_rsa_ssh_key_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    key = ssh_keygen(tmp_path / "id_rsa", "-t", "rsa", "-b", "2048", "-N", "")
    with pytest.raises(IdentityError) as info:
        derive_from_ssh_key(key)
    message = str(info.value)
    assert "ssh-rsa key" in message and "only ed25519 keys" in message and "ssh-keygen -t ed25519" in message


def test_pem_rsa_key_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    key = ssh_keygen(tmp_path / "id_rsa", "-t", "rsa", "-b", "2048", "-N", "", "-m", "PEM")
    with pytest.raises(IdentityError, match=r"'RSA PRIVATE KEY' PEM file.*only ed25519 keys"):
        derive_from_ssh_key(key)


def test_public_key_file_given_by_mistake(tmp_path: Path) -> None:
    key = ssh_keygen(tmp_path / "id_ed25519", "-t", "ed25519", "-N", "")
    with pytest.raises(IdentityError, match=r"SSH \*public\* key; point ssh_key at the private key"):
        derive_from_ssh_key(key.with_suffix(".pub"))


def test_group_readable_ssh_key_is_refused(tmp_path: Path) -> None:
    key = ssh_keygen(tmp_path / "id_ed25519", "-t", "ed25519", "-N", "")
    key.chmod(0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        derive_from_ssh_key(key)


@pytest.fixture(scope="module")
def ssh_key_blob(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    key = ssh_keygen(tmp_path_factory.mktemp("ssh") / "id_ed25519", "-t", "ed25519", "-N", "")
    body = key.read_text().splitlines()[1:-1]
    return base64.b64decode("".join(body))


def _armor(blob: bytes) -> str:
    text = base64.b64encode(blob).decode()
    lines = [text[i : i + 70] for i in range(0, len(text), 70)]
    return "\n".join(["-----BEGIN OPENSSH PRIVATE KEY-----", *lines, "-----END OPENSSH PRIVATE KEY-----", ""])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_corrupted_ssh_keys_raise_only_identity_error(
    ssh_key_blob: bytes, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    blob = bytearray(ssh_key_blob)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(blob) - 1))
        blob[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    path = tmp_path_factory.mktemp("fuzz") / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, _armor(bytes(blob[:cut])).encode())
    os.close(fd)
    try:
        identity = derive_from_ssh_key(path)
    except IdentityError:
        return
    # A mutation that still parses (e.g. in the comment) must still yield a self-consistent key.
    assert isinstance(identity, NodeIdentity)
