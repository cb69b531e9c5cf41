"""The driver encodes snapshots in a worker thread from ``snapshot_view``, a copy of the state taken on the
loop: the copy must encode exactly what the state held when it was taken, whatever is applied afterwards."""

from __future__ import annotations

from tests.unit.coord.builders import T0, Driver, api_token, init_mesh, join_token, register
from tunnelmesh.api.v1 import state_pb2
from tunnelmesh.coord.raft.driver import _VIEW_SHARED, snapshot_view
from tunnelmesh.coord.state import MeshState


def _mesh() -> Driver:
    d = Driver()
    d.ok("initialize_mesh", init_mesh(prefixes=("100.64.0.0/10", "fd7a:115c:a1e0::/48")))
    d.ok("create_join_token", join_token(reusable=True, tags=("tag:ci",)))
    d.ok("create_api_token", api_token())
    for i in range(1, 6):
        d.ok("register_node", register(i), request_id=f"r{i}")
    d.ok("remove_node", state_pb2.RemoveNode(node_id="n-000000000002"))  # an address in quarantine
    for i in range(20):
        d.ok("kv_put", state_pb2.KvPut(key=b"k%d" % i, value=b"v"))
    return d


def test_a_view_encodes_the_state_as_it_was_while_the_state_moves_on() -> None:
    d = _mesh()
    d.state.snapshot()  # warm the encoding cache the view shares
    expected = d.state.snapshot()
    view = snapshot_view(d.state)
    # Everything a snapshot holds changes after the view was taken: nodes, quarantine, tokens, KV, requests.
    d.ok("register_node", register(9), at=T0 + 5, request_id="r9")
    d.ok("remove_node", state_pb2.RemoveNode(node_id="n-000000000003"), at=T0 + 6)
    d.ok("create_join_token", join_token("jt-2", reusable=True, tags=("tag:x",)), at=T0 + 7, request_id="j2")
    for i in range(10, 30):
        d.ok("kv_put", state_pb2.KvPut(key=b"k%d" % i, value=b"w"), at=T0 + 8)
    after = d.state.snapshot()
    assert after != expected
    assert view.snapshot() == expected
    assert d.state.snapshot() == after  # and encoding the view did not disturb the state (or its cache)
    assert MeshState.from_snapshot(view.snapshot()).snapshot() == expected


def test_the_view_copies_every_container_but_the_encoding_cache() -> None:
    # If MeshState grows a new kind of mutable attribute, snapshot_view must learn to copy it: this fails.
    d = _mesh()
    view = snapshot_view(d.state)
    for name, value in vars(d.state).items():
        if isinstance(value, dict | list | set) and name not in _VIEW_SHARED:
            assert getattr(view, name) is not value, name
        elif not isinstance(value, int | str | bytes | type(None) | dict | list | set):
            # Settings and the like: immutable records only.
            assert getattr(type(value), "__dataclass_params__", None) is not None, name
            assert type(value).__dataclass_params__.frozen, name
    for pool, copied in zip(d.state._pools, view._pools, strict=True):
        assert copied is not pool and copied.quarantine is not pool.quarantine
