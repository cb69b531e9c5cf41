"""tunnelmesh.keyproof: the Register proof of key possession (make/verify/prove)."""

from __future__ import annotations

from typing import Any

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh import keyproof, tokens
from tunnelmesh.api.v1 import common_pb2, node_pb2
from tunnelmesh.errors import ProtocolError

NOW = 1_800_000_000 * 10**9
NODE = nacl.public.PrivateKey(b"\x01" * 32)
COORD = nacl.public.PrivateKey(b"\x02" * 32)
PUB = bytes(NODE.public_key)
TOKEN_ID = "0123456789ab"
COORD_ID = "00000000000000a1"


def proof(
    private: nacl.public.PrivateKey = NODE,
    now_ns: int = NOW,
    *,
    public_key: bytes = PUB,
    join_token_id: str = TOKEN_ID,
    coordinator_id: str = COORD_ID,
) -> bytes:
    return keyproof.make(
        bytes(private),
        bytes(COORD.public_key),
        public_key=public_key,
        join_token_id=join_token_id,
        coordinator_id=coordinator_id,
        now_ns=now_ns,
    )


def check(
    p: bytes,
    now_ns: int = NOW,
    *,
    public_key: bytes = PUB,
    join_token_id: str = TOKEN_ID,
    coordinator_id: str = COORD_ID,
) -> None:
    keyproof.verify(
        p,
        bytes(COORD),
        public_key=public_key,
        join_token_id=join_token_id,
        coordinator_id=coordinator_id,
        now_ns=now_ns,
    )


def reason(p: bytes, now_ns: int = NOW, **kw: Any) -> str:
    with pytest.raises(keyproof.KeyProofError) as err:
        check(p, now_ns, **kw)
    assert str(err.value)  # a message for the operator, not just a code
    return err.value.reason


def test_a_proof_verifies_within_the_window_and_is_fresh_each_time() -> None:
    p = proof()
    assert len(p) == keyproof.PROOF_LEN == 80
    check(p)
    check(p, now_ns=NOW + 299 * 10**9)
    check(p, now_ns=NOW - 299 * 10**9)
    assert proof() != p  # random nonce


def test_each_kind_of_bad_proof_is_refused_with_its_reason() -> None:
    attacker = nacl.public.PrivateKey.generate()
    assert reason(proof(attacker)) == keyproof.FORGED  # the takeover: someone else's public key
    assert reason(proof(), public_key=bytes(attacker.public_key)) == keyproof.FORGED
    assert reason(proof(), now_ns=NOW + 301 * 10**9) == keyproof.STALE
    assert reason(proof(), now_ns=NOW - 301 * 10**9) == keyproof.STALE
    assert reason(proof(), join_token_id="ba9876543210") == keyproof.WRONG_BINDING
    assert reason(proof(), coordinator_id="00000000000000b2") == keyproof.WRONG_BINDING
    assert reason(proof()[:-1]) == keyproof.MALFORMED
    assert reason(b"") == keyproof.MALFORMED
    assert reason(proof(), public_key=PUB[:31]) == keyproof.MALFORMED
    flipped = bytearray(proof())
    flipped[40] ^= 1
    assert reason(bytes(flipped)) == keyproof.FORGED
    assert reason(proof(), public_key=b"\x00" * 32) == keyproof.FORGED  # a low-order point


@settings(max_examples=300, deadline=None)
@given(
    p=st.binary(max_size=200) | st.binary(min_size=keyproof.PROOF_LEN, max_size=keyproof.PROOF_LEN),
    key=st.binary(min_size=0, max_size=40) | st.binary(min_size=32, max_size=32),
    token_id=st.text(max_size=20),
    coord_id=st.text(max_size=20),
    now_ns=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_arbitrary_input_never_verifies_and_raises_only_key_proof_error(
    p: bytes, key: bytes, token_id: str, coord_id: str, now_ns: int
) -> None:
    with pytest.raises(keyproof.KeyProofError):
        keyproof.verify(
            p, bytes(COORD), public_key=key, join_token_id=token_id, coordinator_id=coord_id, now_ns=now_ns
        )


def test_prove_fills_the_request_from_get_server_info_and_uses_the_server_clock() -> None:
    token = tokens.JoinToken.new("sha256:" + "cd" * 32)
    req = node_pb2.RegisterRequest(join_token=str(token), public_key=PUB, name="web")
    info = node_pb2.GetServerInfoResponse(
        coordinator=common_pb2.CoordinatorInfo(id=COORD_ID, relay_public_key=bytes(COORD.public_key))
    )
    info.server_time.FromNanoseconds(NOW)  # the node's own clock may be far off
    out = keyproof.prove(req, bytes(NODE), info)
    assert not req.key_proof and out.name == "web" and out.coordinator_id == COORD_ID
    keyproof.verify(
        out.key_proof,
        bytes(COORD),
        public_key=PUB,
        join_token_id=token.token_id,
        coordinator_id=COORD_ID,
        now_ns=NOW,
    )
    with pytest.raises(ProtocolError, match="no relay key"):
        keyproof.prove(req, bytes(NODE), node_pb2.GetServerInfoResponse())
