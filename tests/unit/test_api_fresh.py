"""API contracts: generated code is fresh, imports and round-trips; services, roles, naming as specified.

If test_generated_code_is_fresh fails, run `scripts/gen-proto` and commit the result together with the .proto
change. See docs/api.md ("Changing the contracts").
"""

from __future__ import annotations

import filecmp
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor, descriptor_pb2

from tunnelmesh.api.raft.v1 import raft_pb2, raft_pb2_grpc
from tunnelmesh.api.v1 import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc, state_pb2

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
GEN_PROTO = REPO / "scripts" / "gen-proto"
API_DIR = REPO / "tunnelmesh" / "api"

ALL_MODULES = [common_pb2, node_pb2, admin_pb2, state_pb2, raft_pb2]


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _tool_versions() -> str:
    versions = []
    for dist in ("grpcio-tools", "protobuf", "mypy-protobuf"):
        try:
            versions.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    return ", ".join(versions)


# ------------------------------------------------------------------------------------------------------
# Freshness


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """tunnelmesh/api/ is byte-for-byte what scripts/gen-proto produces from proto/ (no missing, stale or
    stray files)."""
    proc = subprocess.run(
        [sys.executable, str(GEN_PROTO), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"scripts/gen-proto failed:\n{proc.stderr}"

    want, have = _files(tmp_path), _files(API_DIR)
    problems = [f"missing: tunnelmesh/api/{p}" for p in sorted(want - have)]
    problems += [
        f"stale: tunnelmesh/api/{p}"
        for p in sorted(want & have)
        if not filecmp.cmp(tmp_path / p, API_DIR / p, shallow=False)
    ]
    problems += [f"not generated from proto/ (delete it): tunnelmesh/api/{p}" for p in sorted(have - want)]
    if problems:
        pytest.fail(
            "The committed generated code does not match proto/:\n  "
            + "\n  ".join(problems)
            + "\nRegenerate with:  scripts/gen-proto\n"
            + f"(tools in this environment: {_tool_versions()}; they must match the pins in pyproject.toml)",
            pytrace=False,
        )


# ------------------------------------------------------------------------------------------------------
# Import and round-trip


def test_modules_register_under_proto_paths() -> None:
    """Files are registered under their proto paths: what server reflection serves and grpcurl asks for."""
    assert node_pb2.DESCRIPTOR.name == "tunnelmesh/v1/node.proto"
    assert node_pb2.DESCRIPTOR.package == "tunnelmesh.v1"
    assert raft_pb2.DESCRIPTOR.name == "tunnelmesh/raft/v1/raft.proto"
    assert raft_pb2.DESCRIPTOR.package == "tunnelmesh.raft.v1"
    assert node_pb2.Peer.__module__ == "tunnelmesh.api.v1.node_pb2"


def test_watch_config_response_round_trips() -> None:
    peer = node_pb2.Peer(
        node_id="n-0123456789ab",
        name="laptop",
        public_key=bytes(range(32)),
        mesh_ips=["100.64.0.9"],
        allowed_ips=["100.64.0.9/32"],
        endpoints=[
            common_pb2.Candidate(type=common_pb2.CANDIDATE_TYPE_REFLEXIVE, address="[2001:db8::1]:51820"),
        ],
        tags=["tag:dev"],
    )
    peer.persistent_keepalive.FromSeconds(25)
    msg = node_pb2.WatchConfigResponse(snapshot=node_pb2.ConfigSnapshot(version=42, peers=[peer]))

    decoded = node_pb2.WatchConfigResponse.FromString(msg.SerializeToString())

    assert decoded == msg
    assert decoded.WhichOneof("update") == "snapshot"
    assert decoded.snapshot.peers[0].persistent_keepalive.ToSeconds() == 25


def test_command_round_trips_with_idempotency_key() -> None:
    cmd = state_pb2.Command(
        request_id="3f2b8c1e-9d7a-4a61-8a1e-2b9c4d5e6f70",
        actor="api-token:at-1",
        kv_compare_and_set=state_pb2.KvCompareAndSet(key=b"k", new_value=b"v2", expected_value=b"v1"),
    )
    cmd.proposed_at.FromSeconds(1_700_000_000)

    decoded = state_pb2.Command.FromString(cmd.SerializeToString())

    assert decoded == cmd
    assert decoded.WhichOneof("command") == "kv_compare_and_set"
    assert decoded.kv_compare_and_set.HasField("expected_value")


# ------------------------------------------------------------------------------------------------------
# Service shapes: (client streaming, server streaming) per method


def _shapes(service: descriptor.ServiceDescriptor) -> dict[str, tuple[bool, bool]]:
    return {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}


UNARY = (False, False)


def test_node_service_methods() -> None:
    service = node_pb2.DESCRIPTOR.services_by_name["NodeService"]
    assert _shapes(service) == {
        "GetServerInfo": UNARY,
        "Register": UNARY,
        "WatchConfig": (False, True),
        "ReportStatus": UNARY,
    }
    for name in ("GetServerInfo", "Register", "WatchConfig", "ReportStatus"):
        assert hasattr(node_pb2_grpc.NodeServiceServicer, name)
    assert callable(node_pb2_grpc.add_NodeServiceServicer_to_server)


def test_admin_service_methods_and_roles() -> None:
    """Every AdminService method names the least role allowed to call it (fail closed); all are unary but the
    backup stream."""
    service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    expected = {
        "ListNodes": common_pb2.ROLE_READ_ONLY,
        "GetNode": common_pb2.ROLE_READ_ONLY,
        "RenameNode": common_pb2.ROLE_OPERATOR,
        "RemoveNode": common_pb2.ROLE_OPERATOR,
        "CreateJoinToken": common_pb2.ROLE_OPERATOR,
        "ListJoinTokens": common_pb2.ROLE_READ_ONLY,
        "RevokeJoinToken": common_pb2.ROLE_OPERATOR,
        "CreateApiToken": common_pb2.ROLE_ADMIN,
        "ListApiTokens": common_pb2.ROLE_ADMIN,
        "RevokeApiToken": common_pb2.ROLE_ADMIN,
        "GetClusterStatus": common_pb2.ROLE_READ_ONLY,
        "ListMembers": common_pb2.ROLE_READ_ONLY,
        "TransferLeadership": common_pb2.ROLE_ADMIN,
        "RemoveMember": common_pb2.ROLE_ADMIN,
        "SaveSnapshot": common_pb2.ROLE_ADMIN,
    }
    roles = {m.name: m.GetOptions().Extensions[common_pb2.required_role] for m in service.methods}
    assert roles == expected
    shapes = _shapes(service)
    assert shapes.pop("SaveSnapshot") == (False, True)
    assert set(shapes.values()) == {UNARY}
    for name in expected:
        assert hasattr(admin_pb2_grpc.AdminServiceServicer, name)


def test_mutating_admin_requests_carry_a_request_id() -> None:
    """Retries of writes apply once: every request of a method that changes something (not List/Get, not the
    backup, which only reads) starts with request_id."""
    service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    for method in service.methods:
        if method.name.startswith(("List", "Get")) or method.name == "SaveSnapshot":
            continue
        field = method.input_type.fields_by_name.get("request_id")
        assert field is not None and field.number == 1, f"{method.name} needs `string request_id = 1`"


def test_raft_service_methods() -> None:
    service = raft_pb2.DESCRIPTOR.services_by_name["Raft"]
    assert _shapes(service) == {
        "RequestVote": UNARY,
        "AppendEntries": UNARY,
        "InstallSnapshot": (True, False),
        "TimeoutNow": UNARY,
        "Join": UNARY,
        "Propose": UNARY,
        "ProposeBatch": UNARY,
        "ReadIndex": UNARY,
        "Send": UNARY,
        "Stream": (True, False),
    }
    assert hasattr(raft_pb2_grpc, "RaftStub")
    assert callable(raft_pb2_grpc.add_RaftServicer_to_server)


def test_every_raft_message_carries_the_header() -> None:
    """Cluster id and sender/recipient ids in every message, so another cluster's coordinator is refused."""
    service = raft_pb2.DESCRIPTOR.services_by_name["Raft"]
    for method in service.methods:
        for message in (method.input_type, method.output_type):
            header = message.fields_by_name.get("header")
            assert header is not None, f"{message.full_name} has no header"
            assert header.number == 1 and header.message_type is raft_pb2.RaftHeader.DESCRIPTOR
    assert set(raft_pb2.RaftHeader.DESCRIPTOR.fields_by_name) == {"cluster_id", "from_id", "to_id"}


# ------------------------------------------------------------------------------------------------------
# Style (proto style guide), checked on the descriptors


def _all_enums() -> list[descriptor.EnumDescriptor]:
    enums: list[descriptor.EnumDescriptor] = []

    def walk(message: descriptor.Descriptor) -> None:
        enums.extend(message.enum_types)
        for nested in message.nested_types:
            walk(nested)

    for module in ALL_MODULES:
        enums.extend(module.DESCRIPTOR.enum_types_by_name.values())
        for message in module.DESCRIPTOR.message_types_by_name.values():
            walk(message)
    return enums


def _screaming_snake(camel: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(camel)).upper()


@pytest.mark.parametrize("enum", _all_enums(), ids=lambda e: e.full_name)
def test_enum_values_are_prefixed_and_zero_is_unspecified(enum: descriptor.EnumDescriptor) -> None:
    prefix = _screaming_snake(enum.name) + "_"
    assert enum.values[0].number == 0
    assert enum.values[0].name == prefix + "UNSPECIFIED"
    for value in enum.values:
        assert value.name.startswith(prefix), f"{enum.full_name}.{value.name} should start with {prefix}"


def test_field_names_are_snake_case() -> None:
    def walk(message: descriptor.Descriptor) -> None:
        for field in message.fields:
            assert field.name == field.name.lower(), f"{message.full_name}.{field.name}"
        for nested in message.nested_types:
            walk(nested)

    for module in ALL_MODULES:
        for message in module.DESCRIPTOR.message_types_by_name.values():
            walk(message)


def _undocumented(fd: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Elements of one file without a leading or trailing comment. Request/response messages of RPCs may rely
    on their method's comment; everything else (messages, fields, enums, values, methods) needs its own."""
    commented = {
        tuple(loc.path)
        for loc in fd.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }
    missing: list[str] = []

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], name: str) -> None:
        if path not in commented:
            missing.append(f"enum {name}")
        missing.extend(
            f"enum value {name}.{v.name}" for i, v in enumerate(e.value) if (*path, 2, i) not in commented
        )

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str) -> None:
        if path not in commented and not name.endswith(("Request", "Response")):
            missing.append(f"message {name}")
        missing.extend(
            f"field {name}.{f.name}" for i, f in enumerate(m.field) if (*path, 2, i) not in commented
        )
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, 3, i), f"{name}.{nested.name}")
        for i, e in enumerate(m.enum_type):
            enum(e, (*path, 4, i), f"{name}.{e.name}")

    # Paths are FileDescriptorProto field numbers: 4 message_type, 5 enum_type, 6 service (2 method).
    for i, m in enumerate(fd.message_type):
        message(m, (4, i), m.name)
    for i, e in enumerate(fd.enum_type):
        enum(e, (5, i), e.name)
    for i, svc in enumerate(fd.service):
        missing.extend(
            f"method {svc.name}.{m.name}" for j, m in enumerate(svc.method) if (6, i, 2, j) not in commented
        )
    return [f"{fd.name}: {item}" for item in missing]


def test_every_element_is_documented(tmp_path: Path) -> None:
    """Every message, field, enum value and method says what it means (and its units): the protos are the
    reference documentation of the API."""
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    out = tmp_path / "descriptors.pb"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *protos,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    missing = [item for fd in files for item in _undocumented(fd)]
    assert not missing, "add a comment (meaning, units, what unset means) to:\n  " + "\n  ".join(missing)
