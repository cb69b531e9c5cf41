"""The control socket of a running data plane (``node/control.py``): ``reload`` answers with what the
callback returns, passes its refusal on as the error, and is refused where no file drives the interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.node import control
from tunnelmesh.node.errors import DataplaneError


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNNELMESH_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def _serve(reload: Any) -> control.ControlServer:
    return control.ControlServer("tmc0", lambda: {"interface": "tmc0"}, lambda: None, reload).start()


def test_reload_returns_the_result_or_the_refusal() -> None:
    answers: list[Any] = [{"added": ["k"]}, TunnelMeshError("tm.conf:3: PublicKey is not a key")]

    def reload() -> dict[str, Any]:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return dict(a)

    server = _serve(reload)
    try:
        assert control.is_running("tmc0")
        assert control.request("tmc0", "reload")["result"] == {"added": ["k"]}
        with pytest.raises(DataplaneError, match=r"tm.conf:3: PublicKey is not a key"):
            control.request("tmc0", "reload")
        assert control.request("tmc0", "show")["status"] == {"interface": "tmc0"}
    finally:
        server.close()
    assert not control.is_running("tmc0")


def test_reload_is_refused_without_a_file_behind_the_interface() -> None:
    server = _serve(None)
    try:
        with pytest.raises(DataplaneError, match="mesh node agent"):
            control.request("tmc0", "reload")
        with pytest.raises(DataplaneError, match="unknown request"):
            control.request("tmc0", "restart")
    finally:
        server.close()
