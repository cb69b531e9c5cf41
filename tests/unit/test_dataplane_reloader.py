"""`dataplane reload`'s bookkeeping (``cli/dataplane_cmd._Reloader``) with a recording stand-in for the
engine: which calls a new file turns into, what counts as running after a step fails, and the outcome
metric. The real engine and processes: tests/interop/test_dataplane_reload.py."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import nacl.public
import pytest
from prometheus_client import CollectorRegistry

from tunnelmesh.cli.dataplane_cmd import _Reloader
from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.node import wgquick
from tunnelmesh.node.dataplane import PeerConfig
from tunnelmesh.node.errors import DataplaneError

PRIV = base64.b64encode(bytes(nacl.public.PrivateKey.generate())).decode()


def _pub() -> str:
    return base64.b64encode(bytes(nacl.public.PrivateKey.generate().public_key)).decode()


def _file(peers: dict[str, str], address: str = "10.9.0.1/24") -> str:
    text = f"[Interface]\nPrivateKey = {PRIV}\nAddress = {address}\n"
    return text + "".join(f"[Peer]\nPublicKey = {k}\nAllowedIPs = {ips}\n" for k, ips in peers.items())


class RecordingPlane:
    def __init__(self, fail_add: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_add = fail_add

    def remove_peer(self, key: bytes) -> None:
        self.calls.append(("remove", base64.b64encode(key).decode()))

    def update_peer(self, key: bytes, **fields: Any) -> None:
        self.calls.append(("update", (base64.b64encode(key).decode(), fields)))

    def add_peer(self, peer: PeerConfig) -> None:
        if self.fail_add:
            raise DataplaneError("route add failed")
        self.calls.append(("add", base64.b64encode(peer.public_key).decode()))


def _outcome(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value(
        "tunnelmesh_dataplane_config_reloads_total", {"interface": "tm0", "outcome": outcome}
    )
    return value or 0.0


def test_calls_follow_the_diff_and_refusals_apply_nothing(tmp_path: Path) -> None:
    a, b, c = _pub(), _pub(), _pub()
    conf = tmp_path / "tm0.conf"
    conf.write_text(_file({a: "10.9.0.2/32", b: "10.9.0.3/32"}))
    plane, registry = RecordingPlane(), CollectorRegistry()
    reloader = _Reloader(plane, str(conf), wgquick.load(conf), registry)  # type: ignore[arg-type]

    conf.write_text(_file({a: "10.9.0.2/32, 10.9.1.0/24", c: "10.9.0.3/32"}))  # b's address moves to c
    result = reloader()
    assert plane.calls == [
        ("remove", b),
        ("update", (a, {"allowed_ips": ("10.9.0.2/32", "10.9.1.0/24")})),
        ("add", c),
    ]
    assert result["changed"] == {a: ["AllowedIPs"]} and result["unchanged"] == 0
    assert reloader() == {"path": str(conf), "added": [], "removed": [], "changed": {}, "unchanged": 2}
    assert _outcome(registry, "applied") == 2

    plane.calls.clear()
    for text in (_file({a: "10.9.0.2/32"}, address="10.9.0.7/24"), "[Interface]\nPrivateKey = nope\n"):
        conf.write_text(text)
        with pytest.raises(TunnelMeshError):
            reloader()
    assert plane.calls == [] and _outcome(registry, "refused") == 2


def test_a_failed_step_leaves_what_was_applied_as_running(tmp_path: Path) -> None:
    a, b, c = _pub(), _pub(), _pub()
    conf = tmp_path / "tm0.conf"
    conf.write_text(_file({a: "10.9.0.2/32", b: "10.9.0.3/32"}))
    plane = RecordingPlane(fail_add=True)
    reloader = _Reloader(plane, str(conf), wgquick.load(conf))  # type: ignore[arg-type]
    conf.write_text(_file({a: "10.9.0.2/32", c: "10.9.0.4/32"}))
    with pytest.raises(DataplaneError, match="route add failed"):
        reloader()
    assert plane.calls == [("remove", b)]
    plane.fail_add = False
    plane.calls.clear()
    assert reloader()["added"] == [c]  # b is not removed twice; c is tried again
    assert plane.calls == [("add", c)]
