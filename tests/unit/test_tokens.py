"""Token strings: every kind round-trips, malformed text is refused with TokenError, hashes match."""

import pytest

from tunnelmesh.tokens import ApiToken, JoinToken, NodeToken, TokenError, bearer, matches

FP = "sha256:" + "ab" * 32


def test_join_token_round_trips_and_carries_the_ca_pin() -> None:
    t = JoinToken.new(FP)
    text = str(t)
    assert text.startswith("tmj_") and t.secret in text
    back = JoinToken.parse(f"  {text}\n")
    assert back == t and back.ca_fingerprint == FP
    assert matches(t.secret, back.secret_hash)
    assert t.secret not in repr(t)


def test_api_and_node_tokens_round_trip() -> None:
    a = ApiToken.new()
    assert ApiToken.parse(str(a)) == a
    n = NodeToken.new("n-0a1b2c")
    assert NodeToken.parse(str(n)) == n
    assert not matches("0" * 40, n.secret_hash)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tmj_",
        "tma_0123456789ab_" + "0" * 39,
        "tmj_0123456789ab_" + "0" * 40,
        "TMA_0123456789ab_" + "0" * 40,
        "tmn__" + "0" * 40,
        "tmn_a_b_" + "0" * 40,
    ],
)
def test_malformed_tokens_are_refused(text: str) -> None:
    for kind in (JoinToken, ApiToken, NodeToken):
        with pytest.raises(TokenError):
            kind.parse(text)


def test_kinds_do_not_parse_as_each_other() -> None:
    with pytest.raises(TokenError):
        ApiToken.parse(str(JoinToken.new(FP)))
    with pytest.raises(TokenError):
        JoinToken.parse(str(ApiToken.new()))


def test_bad_fingerprint_is_refused() -> None:
    with pytest.raises(TokenError):
        JoinToken.new("md5:00")


def test_bearer_reads_the_authorization_metadata() -> None:
    assert bearer((("x", "y"), ("authorization", "Bearer tma_x"))) == "tma_x"
    assert bearer((("authorization", "Basic abc"),)) is None
    assert bearer(None) is None
