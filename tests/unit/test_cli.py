"""The `tunnelmesh` command as a user meets it: the installed console script, not click internals."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRODUCT_GROUPS = [
    "up", "down", "service", "coord", "join", "node", "status", "nodes", "tokens", "cluster", "dataplane",
    "policy", "export", "federation", "s3", "nfs", "demo", "chaos", "version",
]  # fmt: skip


def tunnelmesh(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("tunnelmesh")
    assert exe, "the `tunnelmesh` console script is not installed: run `pip install -e .`"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_help_lists_every_product_group_in_order() -> None:
    result = tunnelmesh("--help")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert [name for name in listed if name in PRODUCT_GROUPS] == PRODUCT_GROUPS


def test_version_names_the_package_and_its_wire_libraries() -> None:
    result = tunnelmesh("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tunnelmesh 0.")
    assert "protobuf " in result.stdout and "grpcio " in result.stdout


@pytest.mark.parametrize("args", [["policy", "plan", "--file", "x.yaml"], ["s3"], ["federation", "--help"]])
def test_command_not_built_yet_says_so_and_exits_non_zero(args: list[str]) -> None:
    result = tunnelmesh(*args)
    assert result.returncode == 3
    assert "not built yet" in result.stderr
    assert f"tunnelmesh {args[0]}" in result.stderr


def test_readme_first_command_is_built_and_takes_the_documented_flags() -> None:
    result = tunnelmesh("up", "--help")
    assert result.returncode == 0, result.stderr
    assert "not built yet" not in result.stdout
    for flag in ("--data-dir", "--listen", "--advertise", "--interface"):
        assert flag in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = tunnelmesh("frobnicate")
    assert result.returncode == 2
    assert "No such command" in result.stderr


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```")[1].splitlines()[1:]  # the first code block holds the two commands
    install_command, test_command = (line.split("#")[0].strip() for line in block if line.strip())
    assert install_command == "pip install . && tunnelmesh up"
    assert test_command == "./scripts/test"
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"exec {test_command}" in ci


def test_config_validate_reports_file_line_field_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "coord.yaml"
    bad.write_text("coord:\n  lisen: 0.0.0.0:8443\n")
    result = tunnelmesh("config", "validate", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}:2: coord.lisen: unknown key 'lisen'; did you mean 'listen'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_prints_effective_yaml_with_sources(tmp_path: Path) -> None:
    good = tmp_path / "node.yaml"
    good.write_text("node:\n  mtu: 1380\n")
    result = tunnelmesh("config", "show", "--config", str(good), "--section", "node", "--sources")
    assert result.returncode == 0, result.stderr
    assert f"mtu: 1380  # from {good}:2" in result.stdout


def test_node_keygen_writes_a_private_key_that_wg_agrees_with(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    result = tunnelmesh("node", "keygen", "--key-file", str(key))
    assert result.returncode == 0, result.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    wg = subprocess.run(["wg", "pubkey"], input=key.read_text(), capture_output=True, text=True, timeout=10)
    assert wg.stdout.strip() == result.stdout.strip()
    again = tunnelmesh("node", "keygen", "--key-file", str(key))
    assert again.returncode == 1 and "already exists" in again.stderr


def test_status_table_shows_each_peers_receive_loss() -> None:
    """`tunnelmesh status`: RX LOSS is the share of a peer's messages that never arrived (the data plane's
    rx_lost against what did), "-" before anything was received."""
    from tunnelmesh.cli.status_cmd import format_agent_status

    def peer(name: str, received: int, lost: int) -> dict[str, object]:
        return {"public_key": name.upper() + "=", "name": name, "rx_packets": received, "rx_lost": lost}

    status = {
        "interface": "tm0",
        "public_key": "PUB=",
        "listen_port": 51820,
        "agent": {"name": "a", "node_id": "n1", "mesh_addresses": ["100.64.0.1"]},
        "peers": [peer("b", 970, 30), peer("c", 5000, 0), peer("d", 0, 0)],
    }
    lines = format_agent_status(status, now=1000.0).splitlines()
    header = next(line for line in lines if "PEER" in line)
    assert header.split()[-2:] == ["RX", "LOSS"]
    rows = {line.split()[0]: line.split()[-1] for line in lines[lines.index(header) + 1 :]}
    assert rows == {"b": "3%", "c": "0%", "d": "-"}


def test_cluster_members_table_shows_lag_and_last_contact() -> None:
    """`cluster status`: LAG is the commit index minus the member's match index (the leader's view), CONTACT
    the time since it last answered; "-" where the serving coordinator does not know."""
    from tunnelmesh.api.v1 import admin_pb2
    from tunnelmesh.cli.cluster_cmd import members_table

    leader = admin_pb2.Member(member_id="aa", role=admin_pb2.MEMBER_ROLE_VOTER, is_leader=True, healthy=True)
    leader.match_index = 120
    behind = admin_pb2.Member(member_id="bb", role=admin_pb2.MEMBER_ROLE_LEARNER, match_index=20)
    behind.last_contact_age.FromMilliseconds(2500)
    unknown = admin_pb2.Member(member_id="cc", role=admin_pb2.MEMBER_ROLE_VOTER)
    header, *rows = members_table([leader, behind, unknown], commit=120)
    assert header.split()[5:7] == ["LAG", "CONTACT"]
    assert rows[0].split() == ["aa", "voter", "*", "yes", "0", "-"]  # no name or addresses here
    assert rows[1].split() == ["bb", "learner", "-", "100", "2.5s"]
    assert rows[2].split() == ["cc", "voter", "-", "-", "-"]
    assert members_table([behind])[1].split() == ["bb", "learner", "-", "-", "2.5s"]  # no commit index


def test_cluster_health_problems_in_the_leader_s_view() -> None:
    """`cluster status --check`: unhealthy without a leader, or with a voter that does not answer it; a
    learner still catching up is not a problem."""
    from tunnelmesh.api.v1 import admin_pb2
    from tunnelmesh.cli.cluster_cmd import health_problems

    def member(mid: str, role: int, healthy: bool, contact_ms: int | None = None) -> admin_pb2.Member:
        m = admin_pb2.Member(member_id=mid, role=role, healthy=healthy, is_leader=mid == "aa")
        m.info.name = f"c-{mid}"
        if contact_ms is not None:
            m.last_contact_age.FromMilliseconds(contact_ms)
        return m

    voter, learner = admin_pb2.MEMBER_ROLE_VOTER, admin_pb2.MEMBER_ROLE_LEARNER
    st = admin_pb2.GetClusterStatusResponse(leader_id="aa", member_id="aa")
    st.members.extend([member("aa", voter, True), member("bb", voter, True), member("dd", learner, False)])
    assert health_problems(st) == []
    st.members.extend([member("cc", voter, False, 12_300), member("ee", voter, False)])
    assert health_problems(st) == [
        "voter cc (c-cc) last answered 12.3s ago",
        "voter ee (c-ee) never answered",
    ]
    assert health_problems(admin_pb2.GetClusterStatusResponse(member_id="aa")) == [
        "no leader (an election in progress, or no quorum)"
    ]


def test_a_command_loads_only_what_it_needs() -> None:
    """`tunnelmesh dataplane show` must not pay for the coordinator, gRPC and aiohttp (about 1.3 s of imports
    on a small machine): the root loads a command's module when that command runs."""
    code = (
        "import sys; from tunnelmesh.cli.main import cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('tunnelmesh.cli.')))\n"
        "cli.get_command(None, 'dataplane')\n"
        "print(sorted(m for m in ('tunnelmesh.coord.server', 'grpc', 'aiohttp') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == ["['tunnelmesh.cli.main']", "[]"], out.stdout
