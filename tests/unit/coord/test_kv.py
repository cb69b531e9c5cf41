"""The test register map: put, delete, compare-and-set with revisions (for the linearizability checker)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.api.v1 import state_pb2
from tunnelmesh.coord.state import MAX_KV_KEY, MAX_KV_VALUE

from .builders import Driver

INVALID_ARGUMENT = state_pb2.COMMAND_ERROR_CODE_INVALID_ARGUMENT


def cas(key: bytes, new: bytes, expected: bytes | None = None) -> state_pb2.KvCompareAndSet:
    body = state_pb2.KvCompareAndSet(key=key, new_value=new)
    if expected is not None:
        body.expected_value = expected
    return body


def test_put_returns_previous_value_and_revision() -> None:
    d = Driver()
    first = d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"1")).kv
    assert first.succeeded and not first.HasField("previous_value") and first.revision == 1
    second = d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"2")).kv
    assert second.previous_value == b"1" and second.revision == 2


def test_delete_absent_key_succeeds_and_reports_no_previous_value() -> None:
    d = Driver()
    result = d.ok("kv_delete", state_pb2.KvDelete(key=b"k")).kv
    assert result.succeeded and not result.HasField("previous_value") and result.revision == 0
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"v"))
    result = d.ok("kv_delete", state_pb2.KvDelete(key=b"k")).kv
    assert result.previous_value == b"v" and result.revision == 0 and d.state.kv_get(b"k") is None


def test_cas_without_expected_value_means_the_key_must_be_absent() -> None:
    d = Driver()
    created = d.ok("kv_compare_and_set", cas(b"k", b"1")).kv
    assert created.succeeded and created.revision == 1 and not created.HasField("previous_value")
    refused = d.ok("kv_compare_and_set", cas(b"k", b"2")).kv
    assert not refused.succeeded and refused.previous_value == b"1" and refused.revision == 1
    entry = d.state.kv_get(b"k")
    assert entry is not None and entry.value == b"1"


def test_cas_with_expected_value() -> None:
    d = Driver()
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"1"))
    assert not d.ok("kv_compare_and_set", cas(b"k", b"3", expected=b"2")).kv.succeeded
    swapped = d.ok("kv_compare_and_set", cas(b"k", b"3", expected=b"1")).kv
    assert swapped.succeeded and swapped.previous_value == b"1" and swapped.revision == 3


def test_cas_expecting_empty_value_differs_from_expecting_absence() -> None:
    d = Driver()
    assert not d.ok("kv_compare_and_set", cas(b"k", b"x", expected=b"")).kv.succeeded
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b""))
    assert d.ok("kv_compare_and_set", cas(b"k", b"x", expected=b"")).kv.succeeded


def test_failed_cas_is_a_result_and_is_remembered_for_its_request_id() -> None:
    d = Driver()
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"1"))
    first = d.ok("kv_compare_and_set", cas(b"k", b"9", expected=b"2"), request_id="c1")
    d.ok("kv_put", state_pb2.KvPut(key=b"k", value=b"2"))
    retry = d.ok("kv_compare_and_set", cas(b"k", b"9", expected=b"2"), request_id="c1")
    assert retry == first and not retry.kv.succeeded  # one operation, one outcome


def test_limits() -> None:
    d = Driver()
    assert d.do("kv_put", state_pb2.KvPut(key=b"")).error.code == INVALID_ARGUMENT
    assert d.do("kv_put", state_pb2.KvPut(key=b"k" * (MAX_KV_KEY + 1))).error.code == INVALID_ARGUMENT
    assert (
        d.do("kv_put", state_pb2.KvPut(key=b"k", value=b"v" * (MAX_KV_VALUE + 1))).error.code
        == INVALID_ARGUMENT
    )
    assert not d.do("kv_put", state_pb2.KvPut(key=b"k" * MAX_KV_KEY, value=b"v" * MAX_KV_VALUE)).HasField(
        "error"
    )


kv_ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete", "cas", "cas-absent"]),
        st.sampled_from([b"a", b"b"]),
        st.sampled_from([b"", b"1", b"2"]),
        st.sampled_from([b"", b"1", b"2"]),
    ),
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(ops=kv_ops)
def test_register_map_matches_a_dict_model(ops: list[tuple[str, bytes, bytes, bytes]]) -> None:
    d = Driver()
    model: dict[bytes, tuple[bytes, int]] = {}
    for op, key, value, expected in ops:
        before = model.get(key)
        if op == "put":
            result = d.ok("kv_put", state_pb2.KvPut(key=key, value=value)).kv
            model[key] = (value, d.index)
            ok = True
        elif op == "delete":
            result = d.ok("kv_delete", state_pb2.KvDelete(key=key)).kv
            model.pop(key, None)
            ok = True
        else:
            want = None if op == "cas-absent" else expected
            result = d.ok("kv_compare_and_set", cas(key, value, want)).kv
            ok = before is None if want is None else before is not None and before[0] == want
            if ok:
                model[key] = (value, d.index)
        assert result.succeeded == ok
        assert (result.previous_value if result.HasField("previous_value") else None) == (
            before and before[0]
        )
        after = model.get(key)
        assert result.revision == (after[1] if after else 0)
    assert [(k, e.value, e.revision) for k, e in d.state.kv_items()] == [
        (k, *v) for k, v in sorted(model.items())
    ]
