"""Configuration: precedence (defaults < file < environment < flags), validation, and actionable errors.

Every error must name where the bad value came from (``file:line``, the environment variable, or the flag),
the field path, and what to write instead. These tests assert on those message parts, so a regression in the
wording that loses one of them fails here.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnelmesh import config as config_module
from tunnelmesh.config import (
    Config,
    CoordConfig,
    NodeConfig,
    default_data_dir,
    format_duration,
    load_config,
    load_config_with_sources,
    load_coord_config,
    load_node_config,
    parse_duration,
    render_config,
    split_host_port,
)
from tunnelmesh.errors import ConfigError


@pytest.fixture(autouse=True)
def no_default_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests must not pick up /etc/tunnelmesh/tunnelmesh.yaml from the machine running them."""
    original = config_module.default_config_path

    def isolated(env: Any = None) -> Path:
        if env and env.get("TUNNELMESH_CONFIG"):
            return original(env)
        return tmp_path / "absent.yaml"

    monkeypatch.setattr(config_module, "default_config_path", isolated)


def write(tmp_path: Path, text: str, name: str = "tunnelmesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def config_error(path: Path | None = None, *, env: dict[str, str] | None = None, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {}, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------------
# Defaults


def test_defaults_are_production_ready() -> None:
    cfg = load_config(env={})
    assert cfg.coord.listen == "0.0.0.0:8443"
    assert cfg.coord.mesh_cidr == IPv4Network("100.64.0.0/10")
    assert cfg.coord.mesh_domain == "mesh.internal"
    assert cfg.coord.mdns is True
    assert cfg.coord.raft.tick == timedelta(milliseconds=100)
    assert cfg.coord.raft.election_ticks > cfg.coord.raft.heartbeat_ticks
    assert cfg.coord.max_voters % 2 == 1
    assert cfg.coord.dead_voter_timeout == timedelta(minutes=5)  # a spare learner replaces a dead voter
    never = load_config(env={"TUNNELMESH_COORD__DEAD_VOTER_TIMEOUT": "0s"})
    assert never.coord.dead_voter_timeout == timedelta(0)
    assert cfg.coord.storage.replication_factor is None  # auto: min(3, coordinators)
    assert cfg.node.mtu == 1420
    assert cfg.node.listen_port == 51820
    assert cfg.node.key_file == cfg.node.data_dir / "node.key"
    assert cfg.node.key_path == cfg.node.key_file
    assert cfg.log.level == "info"
    # every listen address on its own port
    ports = {split_host_port(a)[1] for a in (cfg.coord.listen, cfg.coord.peer_listen, cfg.coord.http_listen)}
    assert len(ports) == 3


def test_default_data_dir_for_root_and_users(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_data_dir() == Path("/var/lib/tunnelmesh")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".local/share/tunnelmesh"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg/tunnelmesh"


def test_models_are_frozen() -> None:
    cfg = load_config(env={})
    with pytest.raises(ValueError):
        setattr(cfg.coord, "listen", "1.2.3.4:5")  # noqa: B010 (mypy cannot see pydantic's frozen)


# ------------------------------------------------------------------------------------------------------------
# Precedence: defaults < file < environment < flags


def test_file_overrides_defaults_and_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        coord:
          listen: 10.0.0.1:1001
          mdns: false
        node:
          mtu: 1380
        """,
    )
    env = {"TUNNELMESH_COORD__LISTEN": "10.0.0.2:1002"}
    flags = {"coord": {"listen": "10.0.0.3:1003"}}

    assert load_config(path, env={}).coord.listen == "10.0.0.1:1001"
    assert load_config(path, env=env).coord.listen == "10.0.0.2:1002"
    merged = load_config(path, env=env, flags=flags)
    assert merged.coord.listen == "10.0.0.3:1003"
    # Keys no later layer touches keep their file value: layers merge per key, not per section.
    assert merged.coord.mdns is False
    assert merged.node.mtu == 1380
    assert merged.coord.peer_listen == "0.0.0.0:8444"  # default


def test_env_nesting_and_types() -> None:
    env = {
        "TUNNELMESH_COORD__RAFT__TICK": "50ms",
        "TUNNELMESH_COORD__MDNS": "false",
        "TUNNELMESH_NODE__MTU": "1380",
        "TUNNELMESH_COORD__SEEDS": "c1.example.com:8444, [2001:db8::1]:8444",
        "TUNNELMESH_LOG__LEVEL": "DEBUG",
    }
    cfg = load_config(env=env)
    assert cfg.coord.raft.tick == timedelta(milliseconds=50)
    assert cfg.coord.mdns is False
    assert cfg.node.mtu == 1380
    assert cfg.coord.seeds == ("c1.example.com:8444", "[2001:db8::1]:8444")
    assert cfg.log.level == "debug"


def test_env_lists_accept_yaml_style_brackets_and_case_insensitive_choices() -> None:
    cfg = load_config(
        env={"TUNNELMESH_NODE__COORDINATORS": "[c1:8443, 'c2:8443']", "TUNNELMESH_LOG__FORMAT": "JSON"}
    )
    assert cfg.node.coordinators == ("c1:8443", "c2:8443")
    assert cfg.log.format == "json"


def test_world_readable_file_with_secrets_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "node:\n  join_token: s3cret\n")
    path.chmod(0o644)
    load_config(path, env={})
    assert "event=config_secrets_world_readable" in caplog.text and "node.join_token" in caplog.text
    assert "s3cret" not in caplog.text
    caplog.clear()
    path.chmod(0o640)
    load_config(path, env={})
    assert "config_secrets_world_readable" not in caplog.text


def test_empty_env_var_unsets_an_optional_value(tmp_path: Path) -> None:
    path = write(tmp_path, "coord:\n  advertise_host: coord1.example.com\n")
    assert load_config(path, env={}).coord.advertise_host == "coord1.example.com"
    assert load_config(path, env={"TUNNELMESH_COORD__ADVERTISE_HOST": ""}).coord.advertise_host is None


def test_non_config_env_vars_are_left_alone(tmp_path: Path) -> None:
    # TUNNELMESH_CONFIG names the file; other single-word variables belong to the CLI (tokens, endpoints).
    path = write(tmp_path, "node:\n  mtu: 1300\n", name="other.yaml")
    cfg = load_config(env={"TUNNELMESH_CONFIG": str(path), "TUNNELMESH_TOKEN": "x", "OTHER": "y"})
    assert cfg.node.mtu == 1300


def test_tunnelmesh_config_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    message = config_error(env={"TUNNELMESH_CONFIG": str(tmp_path / "nope.yaml")})
    assert "nope.yaml" in message and "not found" in message


def test_flags_accept_dotted_keys_and_ignore_none() -> None:
    flags = {"coord.listen": "127.0.0.1:9443", "node.mtu": None, "node": {"dns": False, "name": None}}
    cfg = load_config(env={}, flags=flags)
    assert cfg.coord.listen == "127.0.0.1:9443"
    assert cfg.node.mtu == 1420
    assert cfg.node.dns is False


def test_load_coord_and_node_config_resolve_log_level(tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  level: warning\nnode:\n  log_level: debug\n")
    assert load_coord_config(path, env={}).log_level == "warning"
    node = load_node_config(path, env={})
    assert node.log_level == "debug"
    assert node.key_file is not None


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", "node:\n  data_dir: state\n")
    cfg = load_config(path, env={})
    assert cfg.node.data_dir == tmp_path / "etc" / "state"
    assert cfg.node.key_file == tmp_path / "etc" / "state" / "node.key"


def test_relative_paths_from_env_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(env={"TUNNELMESH_NODE__KEY_FILE": "keys/node.key", "TUNNELMESH_NODE__SSH_KEY": "~/id"})
    assert cfg.node.key_file == tmp_path / "keys/node.key"
    assert cfg.node.ssh_key == Path("~/id").expanduser()


# ------------------------------------------------------------------------------------------------------------
# Errors from the file name file, line, field and the fix


FILE_ERRORS = [
    # (yaml, line, field, fix text that must appear)
    ("coord:\n  listen: 0.0.0.0\n", 2, "coord.listen", "expected host:port, e.g. 0.0.0.0:8443"),
    ("coord:\n  listen: 8443\n", 2, "coord.listen", "a bare port is not enough"),
    ("coord:\n  listen: ':8443'\n", 2, "coord.listen", "0.0.0.0:8443"),
    ("coord:\n  listen: '::1:8443'\n", 2, "coord.listen", "IPv6 addresses need brackets"),
    ("coord:\n  listen: 0.0.0.0:99999\n", 2, "coord.listen", "port must be a number from 1 to 65535"),
    ("coord:\n  seeds:\n    - a.example:8444\n    - b.example\n", 4, "coord.seeds[1]", "expected host:port"),
    ("coord:\n  mesh_cidr: 100.64.0.1/10\n", 2, "coord.mesh_cidr", "did you mean 100.64.0.0/10?"),
    ("coord:\n  mesh_cidr: banana\n", 2, "coord.mesh_cidr", "CIDR notation, e.g. 100.64.0.0/10"),
    ("coord:\n  mesh_cidr: 10.0.0.0/31\n", 2, "coord.mesh_cidr", "too small"),
    ("coord:\n  mesh_domain: corp.local\n", 2, "coord.mesh_domain", "use e.g. mesh.internal"),
    ("coord:\n  mesh_domain: mesh\n", 2, "coord.mesh_domain", "two or more labels"),
    ("coord:\n  raft:\n    tick: 100\n", 3, "coord.raft.tick", "add a unit, e.g. 100s or 100ms"),
    ("coord:\n  raft:\n    tick: 5 parsecs\n", 3, "coord.raft.tick", "expected a duration with a unit"),
    ("coord:\n  raft:\n    tick: 1h\n", 3, "coord.raft.tick", "between 1ms and 10s"),
    (
        "coord:\n  raft:\n    election_ticks: 3\n    heartbeat_ticks: 3\n",
        2,
        "coord.raft",
        "must be greater than heartbeat_ticks",
    ),
    ("coord:\n  max_voters: 4\n", 2, "coord.max_voters", "use an odd number, e.g. 3 or 5"),
    ("coord:\n  dead_voter_timeout: 1s\n", 2, "coord.dead_voter_timeout", "twice the election timeout"),
    (
        "coord:\n  raft:\n    tick: 1s\n  dead_voter_timeout: 15s\n",
        4,
        "coord.dead_voter_timeout",
        "(raft.tick x raft.election_ticks = 10s)",
    ),
    ("coord:\n  tls:\n    cert_file: /x.pem\n", 2, "coord.tls", "set all of cert_file, key_file and ca_file"),
    ("coord:\n  http_listen: 0.0.0.0:8443\n", 2, "coord.http_listen", "listen and http_listen both use"),
    ("coord:\n  listen: 127.0.0.1:8444\n", 1, "coord.peer_listen", "listen and peer_listen both use"),
    ("coord:\n  name: Bad_Name!\n", 2, "coord.name", "expected a DNS label"),
    ("coord:\n  storage:\n    replication_factor: 0\n", 3, "coord.storage.replication_factor", ">= 1"),
    ("node:\n  mtu: 100\n", 2, "node.mtu", "greater than or equal to 1280"),
    ("node:\n  listen_port: 70000\n", 2, "node.listen_port", "less than or equal to 65535"),
    ("node:\n  listen_port: many\n", 2, "node.listen_port", "expected a whole number, e.g. 51820"),
    ("node:\n  dns: maybe\n", 2, "node.dns", "expected true or false"),
    ("node:\n  interface: a-very-long-interface-name\n", 2, "node.interface", "1-15 letters"),
    ("node:\n  coordinators: c1.example.com:8443\n", 2, "node.coordinators", ""),  # comma list of one: fine
    ("node:\n  coordinators: {a: b}\n", 2, "node.coordinators", "expected a list"),
    ("node:\n  persistent_keepalive: -5s\n", 2, "node.persistent_keepalive", "expected a duration"),
    ("node: 5\n", 1, "node", "expected a mapping of settings"),
    ("log:\n  level: loud\n", 2, "log.level", "'debug', 'info', 'warning' or 'error'"),
    ("log:\n  format: xml\n", 2, "log.format", "'text' or 'json'"),
]


@pytest.mark.parametrize(
    ("text", "line", "field", "fix"), FILE_ERRORS, ids=[c[2] + ":" + c[3] for c in FILE_ERRORS]
)
def test_file_errors_name_file_line_field_and_fix(
    tmp_path: Path, text: str, line: int, field: str, fix: str
) -> None:
    path = write(tmp_path, text)
    if field == "node.coordinators" and not fix:
        assert load_config(path, env={}).node.coordinators == ("c1.example.com:8443",)
        return
    message = config_error(path)
    assert f"{path}:{line}: {field}: " in message, message
    assert fix.replace(">= 1", "greater than or equal to 1") in message, message


def test_all_problems_are_reported_in_line_order(tmp_path: Path) -> None:
    path = write(tmp_path, "node:\n  mtu: 1\n  dns: maybe\ncoord:\n  listen: nope\n")
    message = config_error(path)
    assert message.startswith("invalid configuration (3 problems):")
    lines = message.splitlines()[1:]
    assert [ln.strip().split(": ")[0] for ln in lines] == [f"{path}:2", f"{path}:3", f"{path}:5"]


def test_unknown_key_suggests_the_closest_name(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "coord:\n  listen: 0.0.0.0:8443\n  lisen: 0.0.0.0:9443\n"))
    assert (
        f"{tmp_path}/tunnelmesh.yaml:3: coord.lisen: unknown key 'lisen'; did you mean 'listen'?" in message
    )


def test_unknown_section_suggests_the_closest_section(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "cord:\n  listen: 0.0.0.0:8443\n"))
    assert ":1: cord: unknown key 'cord'; did you mean 'coord'?" in message


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "coord:\n  mtu: 1400\n"))
    assert ":2: coord.mtu: unknown key 'mtu'; did you mean node.mtu?" in message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "log:\n  colour: blue\n"))
    assert ":2: log.colour: unknown key 'colour'; valid keys here: level, format" in message


def test_unknown_key_value_is_not_echoed(tmp_path: Path) -> None:
    # A mistyped secret key must not print the secret.
    message = config_error(write(tmp_path, "node:\n  join_tokn: s3cr3t-value\n"))
    assert "did you mean 'join_token'?" in message
    assert "s3cr3t-value" not in message


def test_secret_values_are_not_echoed_in_errors(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "node:\n  join_token: [s3cr3t-value]\n"))
    assert "node.join_token" in message and "s3cr3t-value" not in message


# YAML-level problems


@pytest.mark.parametrize(
    ("text", "line", "fix"),
    [
        ("coord:\n  listen: [\n", 3, "not valid YAML"),
        ("coord:\n\tlisten: x\n", 2, "spaces, not tabs"),
        ("coord:\n  listen: a:1\n  listen: b:2\n", 3, "duplicate key (first set on line 2)"),
        ("coord:\n  1: x\n", 2, "keys must be text"),
        ("coord:\n  data_dir: 2024-13-45\n", 0, "quote it"),
        ("- coord\n", 1, "the file must be a mapping of sections"),
        ("a: 1\n---\nb: 2\n", 0, "not valid YAML"),
    ],
)
def test_yaml_problems_name_the_file_and_line(tmp_path: Path, text: str, line: int, fix: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert str(path) in message
    if line:
        assert f"{path}:{line}" in message, message
    assert fix in message, message


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing yet\n"), env={}) == load_config(env={})


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    assert "config file not found" in config_error(tmp_path / "missing.yaml")
    assert "is a directory" in config_error(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"coord:\n  name: caf\xe9\n")
    assert "not UTF-8" in config_error(tmp_path / "latin1.yaml")


# Errors from the environment and flags name the variable / flag


def test_env_errors_name_the_variable_and_field() -> None:
    message = config_error(env={"TUNNELMESH_NODE__MTU": "big"})
    assert "environment variable TUNNELMESH_NODE__MTU: node.mtu: expected a whole number" in message


def test_env_unknown_key_names_the_variable_and_suggests() -> None:
    message = config_error(env={"TUNNELMESH_COORD__LISTN": "0.0.0.0:1"})
    assert "environment variable TUNNELMESH_COORD__LISTN: coord.listn: unknown key 'listn'" in message
    assert "did you mean 'listen'?" in message
    message = config_error(env={"TUNNELMESH_NOD__MTU": "1400"})
    assert "environment variable TUNNELMESH_NOD__MTU: nod: unknown key 'nod'; did you mean 'node'?" in message


def test_env_malformed_name() -> None:
    message = config_error(env={"TUNNELMESH_COORD____LISTEN": "x"})
    assert "environment variable TUNNELMESH_COORD____LISTEN" in message and "two underscores" in message


def test_env_overriding_a_file_value_blames_the_variable_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "coord:\n  listen: 0.0.0.0:8443\n")
    message = config_error(path, env={"TUNNELMESH_COORD__LISTEN": "nope"})
    assert "environment variable TUNNELMESH_COORD__LISTEN: coord.listen:" in message
    assert f"{path}:2" not in message


def test_flag_errors_name_the_flag() -> None:
    message = config_error(flags={"node.mtu": 10})
    assert "flag node.mtu: node.mtu: input should be greater than or equal to 1280" in message


# ------------------------------------------------------------------------------------------------------------
# Rendering


def test_render_redacts_secrets_and_round_trips(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        coord:
          seeds: [c1.example.com:8444]
          admin_token: admin-s3cret
          raft: {tick: 250ms}
          mesh_cidr: fd00:1::/48
        node:
          join_token: join-s3cret
          persistent_keepalive: 1m30s
        """,
    )
    cfg = load_config(path, env={})
    assert cfg.coord.admin_token is not None and cfg.coord.admin_token.get_secret_value() == "admin-s3cret"
    assert cfg.coord.mesh_cidr == IPv6Network("fd00:1::/48")
    shown = render_config(cfg)
    assert "s3cret" not in shown and shown.count("<redacted>") == 2
    assert "tick: 250ms" in shown and "persistent_keepalive: 1m30s" in shown

    # The rendered config is itself a valid config file that loads to the same values (secrets aside).
    data = yaml.safe_load(shown)
    data["coord"]["admin_token"] = data["node"]["join_token"] = None
    reloaded = load_config(write(tmp_path, yaml.safe_dump(data), name="shown.yaml"), env={})
    expected = cfg.model_copy(
        update={
            "coord": cfg.coord.model_copy(update={"admin_token": None}),
            "node": cfg.node.model_copy(update={"join_token": None}),
        }
    )
    assert reloaded == expected


def test_sources_say_where_each_setting_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, "coord:\n  listen: 10.0.0.1:1\n  seeds: [a:1]\nnode:\n  mtu: 1300\n")
    loaded = load_config_with_sources(
        path, env={"TUNNELMESH_NODE__MTU": "1380"}, flags={"log.level": "debug", "node.data_dir": "/x\ny"}
    )
    assert loaded.file == path
    assert loaded.sources == {
        "coord.listen": f"{path}:2",
        "coord.seeds": f"{path}:3",
        "node.mtu": "environment variable TUNNELMESH_NODE__MTU",
        "log.level": "flag log.level",
        "node.data_dir": "flag node.data_dir",
    }
    shown = render_config(loaded.config, sources=loaded.sources)
    assert f"  listen: 10.0.0.1:1  # from {path}:2\n" in shown
    assert f"  seeds:  # from {path}:3\n" in shown
    assert "  mtu: 1380  # from environment variable TUNNELMESH_NODE__MTU\n" in shown
    assert "  level: debug  # from flag log.level\n" in shown
    assert "peer_listen: 0.0.0.0:8444\n" in shown  # defaults carry no comment
    assert yaml.safe_load(shown)["node"]["data_dir"] == "/x\ny"  # comments never land inside a value


def test_render_a_single_section() -> None:
    cfg = load_config(env={})
    assert yaml.safe_load(render_config(cfg.node))["node"]["mtu"] == 1420
    assert isinstance(cfg.coord, CoordConfig) and isinstance(cfg.node, NodeConfig) and isinstance(cfg, Config)


def test_every_field_is_documented_with_its_environment_variable() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for field in config_module._field_paths(Config):
        env = "TUNNELMESH_" + field.replace(".", "__").upper()
        assert f"| `{field}` |" in doc and f"`{env}`" in doc, f"docs/configuration.md lacks {field} / {env}"


# ------------------------------------------------------------------------------------------------------------
# Value parsers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100ms", timedelta(milliseconds=100)),
        ("25s", timedelta(seconds=25)),
        ("1m30s", timedelta(seconds=90)),
        ("2h", timedelta(hours=2)),
        ("1.5s", timedelta(milliseconds=1500)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "10", "5 parsecs", "s", "-1s", "1s2", "1e3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10 * 365 * 86400 * 1_000_000))
def test_duration_format_round_trips(micros: int) -> None:
    value = timedelta(microseconds=micros)
    assert parse_duration(format_duration(value)) == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8443", ("0.0.0.0", 8443)),
        ("coord1.example.com:1", ("coord1.example.com", 1)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


# ------------------------------------------------------------------------------------------------------------
# Property tests: whatever the input, the only failure is a ConfigError


# Fragments of YAML syntax and of our own keys and values, so the fuzzer reaches past the YAML parser.
YAMLISH = st.lists(
    st.sampled_from(
        [
            *"{}[],:-#&*!|>'\"%@`?\t\n ~",
            "  ",
            "\n  ",
            "- ",
            ": ",
            "coord",
            "node",
            "log",
            "listen",
            "seeds",
            "mtu",
            "raft",
            "tick",
            "0.0.0.0:8443",
            "100.64.0.0/10",
            "25s",
            "&a ",
            "*a",
            "<<: ",
            "!!binary ",
            "!!set ",
            "2024-13-45",
            "0x1F",
            "1e999",
            "null",
            "yes",
            "\u00e9",
            "\x85",
            "\ufeff",
        ]
    ),
    max_size=60,
).map("".join)
KEYS = st.sampled_from(
    [
        "coord",
        "node",
        "log",
        "listen",
        "seeds",
        "mtu",
        "raft",
        "tick",
        "tls",
        "cert_file",
        "level",
        "dns",
        "x",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["0.0.0.0:8443", "100.64.0.0/10", "25s", "[::1]:1", "mesh.internal", "info", "~/x"]),
)
STRUCTURES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=20,
)


def _only_config_errors(path: Path, env: dict[str, str] | None = None) -> None:
    with contextlib.suppress(ConfigError):
        load_config(path, env=env or {})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=300), YAMLISH))
def test_arbitrary_text_raises_only_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", errors="replace"))  # lone surrogates cannot be written as UTF-8
    _only_config_errors(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(KEYS, STRUCTURES, max_size=4))
def test_arbitrary_structures_raise_only_config_error(tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    _only_config_errors(path)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "TUNNELMESH_COORD__LISTEN",
                "TUNNELMESH_NODE__MTU",
                "TUNNELMESH_COORD__SEEDS",
                "TUNNELMESH_LOG",
                "TUNNELMESH_COORD__RAFT__TICK",
                "TUNNELMESH_X__Y",
                "TUNNELMESH___",
                "TUNNELMESH_NODE__DATA_DIR",
            ]
        ),
        st.text(max_size=40).filter(lambda s: "\x00" not in s),
        max_size=4,
    )
)
def test_arbitrary_environment_raises_only_config_error(env: dict[str, str]) -> None:
    with contextlib.suppress(ConfigError):
        load_config(env=env)
