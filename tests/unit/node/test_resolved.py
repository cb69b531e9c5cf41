"""systemd-resolved registration (tunnelmesh.node.resolved): detection and the exact resolvectl commands.

This container (like CI) has no systemd-resolved, so the commands go to an injected runner that records them
and answers as resolvectl would; the detection's "not running" branch is also checked against the real host.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tunnelmesh.errors import ConfigError
from tunnelmesh.node import resolved
from tunnelmesh.node.resolved import (
    ResolvedError,
    fallback_hint,
    register_with_resolved,
    resolved_running,
)


class FakeResolvectl:
    """Records every argv; fails the verbs in ``fail`` as resolvectl does (exit 1, a message on stderr)."""

    def __init__(self, fail: Sequence[str] = (), missing: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = set(fail)
        self.missing = missing

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        if self.missing:
            raise FileNotFoundError(2, "No such file or directory", "resolvectl")
        if argv[1] in self.fail:
            return subprocess.CompletedProcess(argv, 1, "", f"Failed to {argv[1]}: Unknown verb\n")
        return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "resolve"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _fresh_fallback_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolved, "_fallback_logged", False)


def test_registers_dns_server_routing_domain_and_no_default_route(run_dir: Path) -> None:
    fake = FakeResolvectl()
    reg = register_with_resolved("tm0", "100.64.0.5", "mesh.internal", runner=fake, run_dir=run_dir)
    assert reg is not None
    assert fake.calls == [
        ["resolvectl", "status"],
        ["resolvectl", "dns", "tm0", "100.64.0.5"],
        ["resolvectl", "domain", "tm0", "~mesh.internal"],
        ["resolvectl", "default-route", "tm0", "false"],
    ]
    reg.revert()
    assert fake.calls[-1] == ["resolvectl", "revert", "tm0"]


def test_search_domains_and_non_default_port(run_dir: Path) -> None:
    fake = FakeResolvectl()
    register_with_resolved(
        "tm0",
        "fd7a::5",
        "mesh.internal.",
        port=5353,
        search_domains=["mesh.internal"],
        runner=fake,
        run_dir=run_dir,
    )
    assert ["resolvectl", "dns", "tm0", "[fd7a::5]:5353"] in fake.calls
    assert ["resolvectl", "domain", "tm0", "~mesh.internal", "mesh.internal"] in fake.calls


def test_not_running_without_the_runtime_dir_changes_nothing_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeResolvectl()
    with caplog.at_level(logging.WARNING, logger="tunnelmesh.node.resolved"):
        for _ in range(3):
            assert (
                register_with_resolved(
                    "tm0", "100.64.0.5", "mesh.internal", runner=fake, run_dir=tmp_path / "x"
                )
                is None
            )
    assert fake.calls == []  # not even `resolvectl status`
    warnings = [r.getMessage() for r in caplog.records if "dns_resolved_absent" in r.getMessage()]
    assert len(warnings) == 1
    assert "server=/mesh.internal/100.64.0.5" in warnings[0] and "nameserver 100.64.0.5" in warnings[0]


def test_not_running_when_resolvectl_status_fails_or_is_missing(run_dir: Path) -> None:
    assert not resolved_running(runner=FakeResolvectl(fail=["status"]), run_dir=run_dir)
    assert not resolved_running(runner=FakeResolvectl(missing=True), run_dir=run_dir)
    assert resolved_running(runner=FakeResolvectl(), run_dir=run_dir)


def test_this_host_has_no_resolved() -> None:
    """The real detection, real paths and real runner: this container and CI run no systemd-resolved."""
    if Path("/run/systemd/resolve").is_dir():
        pytest.skip("systemd-resolved runtime dir present on this host")
    assert resolved_running() is False


def test_a_refused_domain_reverts_the_link_and_raises(run_dir: Path) -> None:
    fake = FakeResolvectl(fail=["domain"])
    with pytest.raises(
        ResolvedError, match=r"`resolvectl domain tm0 ~mesh.internal` failed: Failed to domain"
    ):
        register_with_resolved("tm0", "100.64.0.5", "mesh.internal", runner=fake, run_dir=run_dir)
    assert fake.calls[-1] == ["resolvectl", "revert", "tm0"]


def test_old_resolvectl_without_default_route_still_registers(run_dir: Path) -> None:
    fake = FakeResolvectl(fail=["default-route"])
    assert (
        register_with_resolved("tm0", "100.64.0.5", "mesh.internal", runner=fake, run_dir=run_dir) is not None
    )
    assert ["resolvectl", "revert", "tm0"] not in fake.calls


def test_revert_never_raises(run_dir: Path) -> None:
    reg = register_with_resolved(
        "tm0", "100.64.0.5", "mesh.internal", runner=FakeResolvectl(), run_dir=run_dir
    )
    assert reg is not None
    reg.runner = FakeResolvectl(fail=["revert"])
    reg.revert()
    reg.runner = FakeResolvectl(missing=True)
    reg.revert()


def test_bad_domain_or_ip_is_a_config_error(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="mesh domain"):
        register_with_resolved("tm0", "100.64.0.5", "bad..domain", runner=FakeResolvectl(), run_dir=run_dir)
    with pytest.raises(ConfigError, match="not-an-ip"):
        register_with_resolved("tm0", "not-an-ip", "mesh.internal", runner=FakeResolvectl(), run_dir=run_dir)


def test_fallback_hint_names_the_server_and_domain() -> None:
    hint = fallback_hint("100.64.0.5", "mesh.internal")
    assert "dig @100.64.0.5 <node>.mesh.internal" in hint
