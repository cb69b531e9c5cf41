"""Typed configuration for coordinators and nodes: models, loading and validation with clear errors.

Theory of operation
-------------------
A configuration is built from four layers, each overriding the one before it, key by key::

    defaults  <  YAML file  <  environment (TUNNELMESH_*)  <  flags (overrides passed by the CLI)

Every layer becomes a plain nested dict plus an *origin* for each key it sets (``file:line``, an environment
variable's name, or a flag). The dicts are deep-merged (a later layer replaces a key's whole value, lists
included), validated once by the frozen pydantic models below, and every validation error is translated
back to the origin of the offending key. That is how an error can say
``/etc/tunnelmesh/tunnelmesh.yaml:7: coord.listen: ...`` or
``environment variable TUNNELMESH_NODE__MTU: node.mtu: ...`` and what to write instead. Unknown keys are
errors, with a "did you mean" suggestion: a typo must never be ignored silently.

The file holds three sections, all optional: ``coord`` (a coordinator), ``node`` (a node agent) and ``log``.
One file may configure both roles, as ``tunnelmesh up`` does on a single machine. ``docs/configuration.md``
lists every field.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tunnelmesh.errors import ConfigError

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_MESH_CIDR",
    "DEFAULT_MESH_DOMAIN",
    "ENV_PREFIX",
    "Config",
    "CoordConfig",
    "InterfaceConfig",
    "LoadedConfig",
    "LogConfig",
    "NodeConfig",
    "RaftConfig",
    "StorageConfig",
    "TlsConfig",
    "default_config_path",
    "default_data_dir",
    "format_duration",
    "load_config",
    "load_config_with_sources",
    "load_coord_config",
    "load_node_config",
    "parse_duration",
    "render_config",
    "split_host_port",
]

ENV_PREFIX = "TUNNELMESH_"
# Names the config file; it is not itself a config key, so the environment layer skips it.
CONFIG_ENV_VAR = "TUNNELMESH_CONFIG"
DEFAULT_MESH_CIDR = "100.64.0.0/10"  # RFC 6598 shared address space, as CGNAT-style meshes use
# ".internal" is reserved by ICANN for private use (2024): it is never delegated in public DNS, so mesh names
# cannot collide with real ones, and unlike ".local" it is not captured by mDNS (systemd-resolved, macOS).
DEFAULT_MESH_DOMAIN = "mesh.internal"
SECTIONS = ("coord", "node", "log")
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# Defaults that depend on the machine


def default_data_dir() -> Path:
    """Where state lives: ``/var/lib/tunnelmesh`` for root, else ``$XDG_DATA_HOME/tunnelmesh``
    (``~/.local/share/tunnelmesh``)."""
    if os.geteuid() == 0:
        return Path("/var/lib/tunnelmesh")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "tunnelmesh"


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """The config file used when none is given: ``$TUNNELMESH_CONFIG``, else
    ``/etc/tunnelmesh/tunnelmesh.yaml`` for root, else ``$XDG_CONFIG_HOME/tunnelmesh/tunnelmesh.yaml``."""
    env = os.environ if env is None else env
    if env.get(CONFIG_ENV_VAR):
        return Path(env[CONFIG_ENV_VAR]).expanduser()
    if os.geteuid() == 0:
        return Path("/etc/tunnelmesh/tunnelmesh.yaml")
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "tunnelmesh" / "tunnelmesh.yaml"


def _default_node_name() -> str:
    """The host name's first label, made a valid DNS label (it becomes ``<name>.<mesh domain>``)."""
    label = socket.gethostname().split(".")[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", label).strip("-")[:63].strip("-")
    return label or "node"


# ------------------------------------------------------------------------------------------------------------
# Value types. Each validator raises PydanticCustomError whose message says what is expected, with an example;
# the loader adds where (file/line or variable) and the offending value.


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("tunnelmesh", message)


_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOSTNAME_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def _valid_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    return all(_HOSTNAME_LABEL_RE.match(label) for label in host.rstrip(".").split("."))


def split_host_port(value: str) -> tuple[str, int]:
    """Split a validated ``host:port`` (``[v6]:port`` for IPv6) into host and port.

    Raises ``ValueError`` with a user-facing message if ``value`` is not a valid address.
    """
    example = "e.g. 0.0.0.0:8443, coord1.example.com:8443 or [2001:db8::1]:8443"
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [ipv6-address]:port, {example}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"'{host}' inside [...] is not an IPv6 address; expected host:port, {example}"
            ) from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"missing the ':port' part; expected host:port, {example}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets; expected host:port, {example}")
        if not host:
            raise ValueError(
                f"missing the host; to listen on every interface write 0.0.0.0:{port_text or 8443}"
            )
        if not _valid_hostname(host):
            raise ValueError(
                f"'{host}' is not a valid host name or IP address; expected host:port, {example}"
            )
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535; expected host:port, {example}")
    return host, int(port_text)


def _host_port(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail("expected host:port as text, e.g. 0.0.0.0:8443 (a bare port is not enough)")
    try:
        host, port = split_host_port(value.strip())
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail("expected a host name or IP address, e.g. coord1.example.com or 203.0.113.7")
    host = value.strip()
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not _valid_hostname(host):
        raise _fail("expected a host name or IP address, e.g. coord1.example.com or 203.0.113.7 (no port)")
    return host.lower()


def _address_list(value: Any) -> Any:
    # Environment variables and flags carry lists as comma-separated text: "a:8443,b:8443".
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]") and not text.endswith("]:"):
            text = text[1:-1]  # a YAML/JSON-style list given as text: [a:8443, b:8443]
        return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
    return value


def _cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        network = value
    else:
        if not isinstance(value, str) or "/" not in value:
            raise _fail("expected a network in CIDR notation, e.g. 100.64.0.0/10")
        try:
            network = ipaddress.ip_network(value.strip(), strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                raise _fail("expected a network in CIDR notation, e.g. 100.64.0.0/10") from None
            raise _fail(f"host bits are set; did you mean {loose}?") from None
    if network.num_addresses < 4:
        raise _fail("network is too small for a mesh; use a prefix of /30 or shorter, e.g. 100.64.0.0/10")
    return network


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration (``100ms``, ``25s``, ``1m30s``, ``2h``). Raises ``ValueError``."""
    compact = text.strip().replace(" ", "")
    if not compact or _DURATION_RE.sub("", compact):
        raise ValueError("expected a duration with a unit, e.g. 100ms, 25s, 1m30s or 2h")
    seconds = sum(float(num) * _DURATION_UNITS[unit] for num, unit in _DURATION_RE.findall(compact))
    if seconds > 10 * 365 * 86400:
        raise ValueError("duration is longer than ten years; expected e.g. 100ms, 25s or 2h")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The inverse of :func:`parse_duration`, in the largest exact units: ``timedelta(seconds=90)`` ->
    ``1m30s``, ``timedelta(milliseconds=100)`` -> ``100ms``."""
    micros = round(value.total_seconds() * 1_000_000)
    if micros == 0:
        return "0s"
    parts = []
    for unit, size in (("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000), ("ms", 1000), ("us", 1)):
        count, micros = divmod(micros, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool | int | float):
        # A bare number is ambiguous (seconds? milliseconds?): exactly the bug a config file must not hide.
        raise _fail(f"add a unit, e.g. {value}s or {value}ms; expected a duration like 100ms, 25s or 1m30s")
    if not isinstance(value, str):
        raise _fail("expected a duration with a unit, e.g. 100ms, 25s, 1m30s or 2h")
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _dns_label(value: Any) -> str:
    if not isinstance(value, str) or not _LABEL_RE.match(value.strip().lower()):
        raise _fail(
            "expected a DNS label: 1-63 letters, digits or '-', not starting or ending with '-', "
            "e.g. laptop-1"
        )
    return value.strip().lower()


def _domain(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail("expected a DNS domain, e.g. mesh.internal")
    domain = value.strip().lower().rstrip(".")
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 2 or not all(_LABEL_RE.match(label) for label in labels):
        raise _fail("expected a DNS domain of two or more labels, e.g. mesh.internal or mesh.example.com")
    if labels[-1] == "local":
        raise _fail(
            "'.local' belongs to multicast DNS (RFC 6762): systemd-resolved and macOS send it to mDNS, "
            "not to the mesh resolver; use e.g. mesh.internal"
        )
    return domain


_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _ifname(value: Any) -> str:
    if not isinstance(value, str) or not _IFNAME_RE.match(value) or value in {".", ".."}:
        raise _fail(
            "expected a network interface name of 1-15 letters, digits, '_', '.' or '-', e.g. tunnelmesh0"
        )
    return value


def _path(value: Any) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise _fail("expected a file system path, e.g. /var/lib/tunnelmesh")
    try:
        return Path(value.strip()).expanduser()
    except RuntimeError:  # "~name" for a user that does not exist, or no home directory
        raise _fail(
            "cannot expand '~' here (unknown user or no home directory); write the full path"
        ) from None


def _log_level(value: Any) -> Any:
    if isinstance(value, str):
        level = value.strip().lower()
        return "warning" if level == "warn" else level
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _replicas(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in {"auto", ""}:
        return None
    return value


def _redact(_: SecretStr) -> str:
    return "<redacted>"


HostPort = Annotated[str, BeforeValidator(_host_port)]
Host = Annotated[str, BeforeValidator(_host)]
AddressList = Annotated[tuple[HostPort, ...], BeforeValidator(_address_list)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_cidr)]
Duration = Annotated[
    timedelta, BeforeValidator(_duration), PlainSerializer(format_duration, when_used="json")
]
DnsLabel = Annotated[str, BeforeValidator(_dns_label)]
Domain = Annotated[str, BeforeValidator(_domain)]
InterfaceName = Annotated[str, BeforeValidator(_ifname)]
FilePath = Annotated[Path, BeforeValidator(_path)]
Secret = Annotated[SecretStr, PlainSerializer(_redact, when_used="json")]
LogLevel = Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_log_level)]


# ------------------------------------------------------------------------------------------------------------
# Models


class _Model(BaseModel):
    # Frozen: a loaded config is a value, shared by tasks without copies. Unknown keys are errors.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)


_M = TypeVar("_M", bound=_Model)


class LogConfig(_Model):
    """Logging for every TunnelMesh process (``coord.log_level`` / ``node.log_level`` override the level)."""

    level: LogLevel = Field(default="info", description="Minimum level logged.", examples=["info"])
    format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = Field(
        default="text",
        description="'text' (key=value lines) or 'json' (one object per line).",
        examples=["json"],
    )


class TlsConfig(_Model):
    """Coordinator TLS. All unset: the coordinator creates a cluster CA and certificates in its data dir."""

    cert_file: FilePath | None = Field(
        default=None, description="PEM certificate chain.", examples=["/etc/tm/coord.crt"]
    )
    key_file: FilePath | None = Field(
        default=None, description="PEM private key.", examples=["/etc/tm/c1.key"]
    )
    ca_file: FilePath | None = Field(
        default=None,
        description="PEM CA that signs every coordinator (mutual TLS).",
        examples=["/etc/tm/ca.crt"],
    )

    @model_validator(mode="after")
    def _all_or_none(self) -> TlsConfig:
        given = [name for name in ("cert_file", "key_file", "ca_file") if getattr(self, name) is not None]
        if given and len(given) != 3:
            missing = sorted({"cert_file", "key_file", "ca_file"} - set(given))
            raise _fail(
                "set all of cert_file, key_file and ca_file, or none of them (to use the generated "
                f"cluster CA); missing: {', '.join(missing)}"
            )
        return self


class RaftConfig(_Model):
    """Raft timing. Election timeout = ``tick * election_ticks`` (randomised up to twice that)."""

    tick: Duration = Field(
        default=timedelta(milliseconds=100),
        description="Length of one logical clock tick.",
        examples=["100ms"],
    )
    election_ticks: int = Field(
        default=10, ge=2, le=1000, description="Ticks without a leader before an election."
    )
    heartbeat_ticks: int = Field(default=1, ge=1, le=100, description="Ticks between leader heartbeats.")

    @field_validator("tick")
    @classmethod
    def _tick_range(cls, value: timedelta) -> timedelta:
        if not timedelta(milliseconds=1) <= value <= timedelta(seconds=10):
            raise _fail("tick must be between 1ms and 10s; expected e.g. 100ms")
        return value

    @model_validator(mode="after")
    def _election_after_heartbeat(self) -> RaftConfig:
        if self.election_ticks <= self.heartbeat_ticks:
            # Followers would time out between heartbeats and depose a healthy leader.
            raise PydanticCustomError(
                "tunnelmesh_election",
                "election_ticks ({e}) must be greater than heartbeat_ticks ({h}); etcd recommends 10x, "
                "e.g. election_ticks: {suggest}",
                {"e": self.election_ticks, "h": self.heartbeat_ticks, "suggest": 10 * self.heartbeat_ticks},
            )
        return self


class StorageConfig(_Model):
    """Replicated object storage (S3 / NFS) on coordinators."""

    replication_factor: Annotated[int | None, BeforeValidator(_replicas)] = Field(
        default=None,
        ge=1,
        le=9,
        description="Coordinators holding each chunk; unset or 'auto' = min(3, number of coordinators).",
        examples=[3],
    )


class CoordConfig(_Model):
    """A coordinator: Raft member, node/admin API, relay, storage."""

    data_dir: FilePath = Field(
        default_factory=lambda: default_data_dir() / "coord",
        description="Raft log, snapshots, storage chunks, generated TLS.",
        examples=["/var/lib/tunnelmesh/coord"],
    )
    cluster_id: DnsLabel | None = Field(
        default=None,
        description="Only join a cluster with this id; unset = generated at bootstrap, learned when joining.",
        examples=["prod-eu"],
    )
    node_id: DnsLabel | None = Field(
        default=None,
        description="This coordinator's Raft id; unset = generated once, kept in data_dir.",
        examples=["c1"],
    )
    name: DnsLabel = Field(
        default_factory=_default_node_name, description="Human-readable name; default the host name."
    )
    listen: HostPort = Field(
        default="0.0.0.0:8443", description="gRPC node and admin API.", examples=["0.0.0.0:8443"]
    )
    peer_listen: HostPort = Field(
        default="0.0.0.0:8444",
        description="Coordinator-to-coordinator gRPC (Raft), mutual TLS.",
        examples=["0.0.0.0:8444"],
        validate_default=True,  # a default can clash with a port set for another listener
    )
    http_listen: HostPort = Field(
        default="0.0.0.0:8080",
        validate_default=True,
        description="HTTP: /metrics, /healthz, /readyz, web UI, WebSocket relay (/relay).",
        examples=["0.0.0.0:8080"],
    )
    relay_listen: HostPort = Field(
        default="0.0.0.0:8443",
        description="UDP endpoint reflector and blind relay (UDP; may share the API's TCP port number).",
        examples=["0.0.0.0:8443"],
    )
    advertise_host: Host | None = Field(
        default=None,
        description="Host name or IP others use to reach this coordinator; unset = the source address it is "
        "reached from / first non-loopback address.",
        examples=["coord1.example.com"],
    )
    seeds: AddressList = Field(
        default=(),
        description="Public API (coord.listen) addresses of coordinators to join through; comma-separated in "
        "env/flags.",
        examples=[["coord1.example.com:8443"]],
    )
    mdns: bool = Field(default=True, description="Announce and discover coordinators on the LAN with mDNS.")
    mesh_cidr: Network = Field(
        default=ipaddress.IPv4Network(DEFAULT_MESH_CIDR),
        description="Mesh address range (used when bootstrapping a cluster).",
        examples=[DEFAULT_MESH_CIDR],
    )
    mesh_domain: Domain = Field(
        default=DEFAULT_MESH_DOMAIN,
        description="DNS domain of mesh names: <node>.<mesh_domain>.",
        examples=["mesh.internal"],
    )
    tls: TlsConfig = Field(default_factory=lambda: TlsConfig())
    raft: RaftConfig = Field(default_factory=lambda: RaftConfig())
    max_voters: int = Field(
        default=5,
        ge=1,
        le=9,
        description="Voting members at most; further coordinators stay learners.",
        examples=[5],
    )
    dead_voter_timeout: Duration = Field(
        default=timedelta(minutes=5),
        description="A voter the leader has not heard from for this long is replaced by a caught-up learner, "
        "when one is waiting (removed, then the learner promoted); 0s = never (replace with cluster remove).",
        examples=["5m"],
    )
    storage: StorageConfig = Field(default_factory=lambda: StorageConfig())
    admin_token: Secret | None = Field(
        default=None, description="Initial admin API token; unset = generated at bootstrap and printed once."
    )
    log_level: LogLevel | None = Field(default=None, description="Overrides log.level for the coordinator.")

    @field_validator("max_voters")
    @classmethod
    def _odd_voters(cls, value: int) -> int:
        if value % 2 == 0:
            # n and n-1 voters tolerate the same number of failures; the extra voter only slows commits.
            raise _fail(
                f"use an odd number, e.g. {value - 1} or {value + 1}: {value} voters tolerate no more "
                f"failures than {value - 1}"
            )
        return value

    @field_validator("dead_voter_timeout")
    @classmethod
    def _dead_voter_timeout(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        raft = info.data.get("raft")  # validated first (declared above): absent only if it failed itself
        election = raft.tick * raft.election_ticks if isinstance(raft, RaftConfig) else timedelta(0)
        if value and value < 2 * election:
            # A live voter can be silent for about an election timeout (a restart, a re-election).
            raise _fail(
                f"use 0s (never) or at least twice the election timeout (raft.tick x raft.election_ticks = "
                f"{format_duration(election)}), e.g. 5m"
            )
        return value

    @field_validator("peer_listen", "http_listen")
    @classmethod
    def _own_tcp_port(cls, value: str, info: ValidationInfo) -> str:
        """Each TCP listener on a port of its own (relay_listen is UDP). Checked on the later of two, so the
        error points at a setting involved rather than at the section."""
        wildcard = {"0.0.0.0", "::"}
        host, port = split_host_port(value)
        for earlier in ("listen", "peer_listen"):
            if earlier == info.field_name:
                break
            other = info.data.get(earlier)  # absent if it failed its own validation
            if other is None:
                continue
            other_host, other_port = split_host_port(other)
            if port == other_port and (host == other_host or host in wildcard or other_host in wildcard):
                raise _fail(
                    f"{earlier} and {info.field_name} both use TCP port {port}; give each a port of its own"
                )
        return value


class InterfaceConfig(_Model):
    """The tunnel interface: shared by the node agent and the standalone data plane."""

    interface: InterfaceName = Field(
        default="tunnelmesh0", description="TUN interface name.", examples=["tunnelmesh0"]
    )
    listen_port: int = Field(
        default=51820,
        ge=0,
        le=65535,
        description="UDP port of the data plane; 0 = any free port.",
        examples=[51820],
    )
    mtu: int = Field(
        default=1420,
        ge=1280,
        le=9000,
        description="Tunnel MTU: link MTU minus 80 bytes of WireGuard/IPv6 overhead.",
    )
    persistent_keepalive: Duration = Field(
        default=timedelta(seconds=25),
        description="Keepalive to peers, keeps NAT mappings open; 0s disables.",
        examples=["25s"],
    )


class NodeConfig(InterfaceConfig):
    """A node agent: joins the mesh and runs the data plane."""

    data_dir: FilePath = Field(
        default_factory=lambda: default_data_dir() / "node",
        description="Node state: key, last config (kept to run without coordinators).",
        examples=["/var/lib/tunnelmesh/node"],
    )
    name: DnsLabel = Field(
        default_factory=_default_node_name,
        description="Mesh name: <name>.<mesh_domain>. Default: the host name.",
        examples=["laptop-1"],
    )
    coordinators: AddressList = Field(
        default=(),
        description="Coordinator API addresses (coord.listen); comma-separated in env/flags.",
        examples=[["coord1.example.com:8443", "coord2.example.com:8443"]],
    )
    key_file: FilePath | None = Field(
        default=None,
        description="Private key (base64, like wg genkey); default <data_dir>/node.key.",
        examples=["node.key"],
    )
    ssh_key: FilePath | None = Field(
        default=None,
        description="Derive the node key from this unencrypted OpenSSH ed25519 private key, not key_file.",
        examples=["~/.ssh/id_ed25519"],
    )
    join_token: Secret | None = Field(default=None, description="Token for the first registration.")
    dns: bool = Field(default=True, description="Run the mesh DNS resolver and register it with the system.")
    log_level: LogLevel | None = Field(default=None, description="Overrides log.level for the node agent.")

    @property
    def key_path(self) -> Path:
        """The private key file in effect (``key_file``, or ``node.key`` in ``data_dir``)."""
        return self.key_file if self.key_file is not None else self.data_dir / "node.key"


class Config(_Model):
    """A whole configuration file: every section is optional."""

    coord: CoordConfig = Field(default_factory=lambda: CoordConfig())
    node: NodeConfig = Field(default_factory=lambda: NodeConfig())
    log: LogConfig = Field(default_factory=lambda: LogConfig())


# ------------------------------------------------------------------------------------------------------------
# Layers and origins


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a key's value came from, as shown in an error."""

    # "/etc/tunnelmesh/tunnelmesh.yaml:7", "environment variable TUNNELMESH_NODE__MTU" or "flag node.mtu"
    where: str
    layer: int  # 0 file, 1 environment, 2 flags: the order problems are listed (and usually fixed) in
    line: int = 0

    @property
    def from_file(self) -> bool:
        return self.layer == 0


Key = tuple[str | int, ...]
_Origins = dict[Key, _Origin]


def _yaml_error(path: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(
        f"{path}{line}: not valid YAML: {problem}; check indentation (spaces, not tabs) and quoting "
        f"(quote values containing ': ' or '#')"
    )


_MAX_KEYS = 10_000


def _walk_yaml(node: yaml.Node, key: Key, path: str, origins: _Origins, problems: list[str]) -> None:
    """Record the line of every key and sequence item, and reject non-text and duplicate keys."""
    if len(origins) > _MAX_KEYS:
        raise ConfigError(
            f"{path}: more than {_MAX_KEYS} keys (aliases expanding?); a config file needs far fewer"
        )
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                _walk_yaml(value_node, key, path, origins, problems)
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                where = ".".join(str(k) for k in key) or "top level"
                problems.append(
                    f"{path}:{line}: {where}: keys must be text names; quote the key or fix indentation"
                )
                continue
            name = key_node.value
            if name in seen:
                field = ".".join(str(k) for k in (*key, name))
                problems.append(
                    f"{path}:{line}: {field}: duplicate key (first set on line {seen[name]}); YAML would "
                    "silently keep only the last one, so remove one of them"
                )
            seen[name] = line
            origins[(*key, name)] = _Origin(f"{path}:{line}", 0, line)
            _walk_yaml(value_node, (*key, name), path, origins, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            line = item.start_mark.line + 1
            origins[(*key, index)] = _Origin(f"{path}:{line}", 0, line)
            _walk_yaml(item, (*key, index), path, origins, problems)


def _file_layer(path: Path) -> tuple[dict[str, Any], _Origins]:
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{label}: config file not found; create it (see docs/configuration.md) or fix --config / "
            f"{CONFIG_ENV_VAR}"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory; --config expects a YAML file") from None
    except PermissionError:
        raise ConfigError(f"{label}: permission denied; run as a user that can read it") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror}") from None
    return _parse_yaml(text, label)


def _parse_yaml(text: str, label: str) -> tuple[dict[str, Any], _Origins]:
    origins: _Origins = {}
    problems: list[str] = []
    try:
        # Parsed twice (nodes for line numbers, then values): config files are small; both calls are typed.
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _walk_yaml(node, (), label, origins, problems)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(label, exc) from None
    except RecursionError:
        raise ConfigError(
            f"{label}: YAML is nested too deeply; a config file needs a few levels at most"
        ) from None
    except (ValueError, TypeError, OverflowError) as exc:
        # PyYAML's constructors raise these for values like the timestamp 2024-13-45.
        raise ConfigError(f"{label}: invalid YAML value ({exc}); quote it to make it text") from None
    if problems:
        raise _config_error(label, problems)
    if data is None:
        return {}, origins
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(
            f"{label}:{line}: the file must be a mapping of sections, e.g.\n"
            "  coord:\n    listen: 0.0.0.0:8443"
        )
    return data, origins


def _env_layer(env: Mapping[str, str]) -> tuple[dict[str, Any], _Origins]:
    """``TUNNELMESH_COORD__LISTEN=x`` -> ``{"coord": {"listen": "x"}}``. Variables without ``__`` that name no
    section (``TUNNELMESH_CONFIG``, the CLI's own) are not config keys and are left alone."""
    data: dict[str, Any] = {}
    origins: _Origins = {}
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV_VAR:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if "__" not in rest and rest not in SECTIONS:
            continue
        parts = rest.split("__")
        where = f"environment variable {name}"
        if not all(parts):
            raise ConfigError(
                f"{where}: empty name part; nest with exactly two underscores, e.g. TUNNELMESH_COORD__LISTEN"
            )
        value: Any = env[name]
        # An empty variable resets an optional setting (e.g. one set in the file) to unset.
        _set(data, origins, tuple(parts), None if value == "" else value, _Origin(where, 1))
    return data, origins


def _flags_layer(flags: Mapping[str, Any]) -> tuple[dict[str, Any], _Origins]:
    """Accepts nested dicts or dotted keys (``{"coord.listen": "..."}``); ``None`` means "flag not given"."""
    data: dict[str, Any] = {}
    origins: _Origins = {}

    def add(prefix: tuple[str, ...], mapping: Mapping[str, Any]) -> None:
        for raw_key, value in mapping.items():
            key = (*prefix, *str(raw_key).split("."))
            if isinstance(value, Mapping):
                add(key, value)
            elif value is not None:
                _set(data, origins, key, value, _Origin(f"flag {'.'.join(key)}", 2))

    add((), flags)
    return data, origins


def _set(data: dict[str, Any], origins: _Origins, key: tuple[str, ...], value: Any, origin: _Origin) -> None:
    target = data
    for part in key[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[key[-1]] = value
    origins[key] = origin


def _merge(
    base: dict[str, Any],
    base_origins: _Origins,
    top: Mapping[str, Any],
    top_origins: _Origins,
    prefix: Key = (),
) -> None:
    """Deep-merge ``top`` into ``base``; a replaced key drops the origins of everything below it."""
    for key, value in top.items():
        here = (*prefix, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], base_origins, value, top_origins, here)
            if here in top_origins:
                base_origins[here] = top_origins[here]
            continue
        for old in [k for k in base_origins if k[: len(here)] == here]:
            del base_origins[old]
        base[key] = value
        for new, origin in top_origins.items():
            if new[: len(here)] == here:
                base_origins[new] = origin


# ------------------------------------------------------------------------------------------------------------
# Turning pydantic errors into messages a user can act on


def _nested_model(annotation: Any) -> type[_Model] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, _Model) else None


def _field_paths(model: type[_Model], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        nested = _nested_model(info.annotation)
        if nested is not None:
            yield from _field_paths(nested, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


_TYPE_HINTS = {
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "string_type": "expected text (quote it in YAML if it looks like a number or boolean)",
    "tuple_type": "expected a list, e.g. [a:8443, b:8443]",
    "list_type": "expected a list, e.g. [a:8443, b:8443]",
    "model_type": "expected a mapping of settings (key: value lines indented under this key)",
    "model_attributes_type": "expected a mapping of settings (key: value lines indented under this key)",
    "dict_type": "expected a mapping of settings (key: value lines indented under this key)",
}


def _describe_value(value: Any) -> str:
    if isinstance(value, dict | list | tuple):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(error: Mapping[str, Any], origins: _Origins, label: str) -> tuple[tuple[int, int, str], str]:
    """One validation error as ``(sort key, message)``."""
    loc: list[str | int] = []
    model: type[_Model] | None = Config
    field_info = None
    raw_loc = list(error["loc"])
    for index, part in enumerate(raw_loc):
        if isinstance(part, int):
            loc.append(part)
        elif model is not None and part in model.model_fields:
            loc.append(part)
            field_info = model.model_fields[part]
            model = _nested_model(field_info.annotation)
        elif error["type"] == "extra_forbidden" and index == len(raw_loc) - 1:
            loc.append(part)
        # anything else is a pydantic-internal step (union member, validator): not part of the user's path
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "top level"

    key = tuple(loc)
    origin = origins.get(key)
    if origin is None:
        for length in range(len(key) - 1, -1, -1):
            origin = origins.get(key[:length])
            if origin is not None:
                break
    if origin is None:
        below = [o for k, o in origins.items() if k[: len(key)] == key]
        origin = below[0] if below else None
    where = origin.where if origin is not None else f"{label} (default value)"
    order = (origin.layer, origin.line, where) if origin is not None else (3, 0, where)

    kind = error["type"]
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        parent_model: type[_Model] = Config
        for part in loc[:-1]:
            if isinstance(part, str):
                nested = _nested_model(parent_model.model_fields[part].annotation)
                if nested is None:
                    break
                parent_model = nested
        valid = list(parent_model.model_fields)
        close = difflib.get_close_matches(name.lower(), valid, n=1, cutoff=0.6)
        elsewhere = [p for p in _field_paths(Config) if p.rsplit(".", 1)[-1] == name.lower()]
        if close:
            hint = f"did you mean '{close[0]}'?"
        elif elsewhere:
            hint = f"did you mean {' or '.join(elsewhere)}? (it belongs in another section)"
        else:
            hint = f"valid keys here: {', '.join(valid)}"
        # The value of an unknown key is not echoed: it might be a mistyped secret.
        return order, f"{where}: {field}: unknown key '{name}'; {hint}"

    message = str(error["msg"])
    if kind == "tunnelmesh":
        what = message
    elif kind in _TYPE_HINTS:
        what = _TYPE_HINTS[kind]
    else:
        what = message[0].lower() + message[1:] if message else kind
    if kind != "tunnelmesh" and field_info is not None and field_info.examples and "e.g." not in what:
        example = field_info.examples[0]
        what += f", e.g. {'[' + ', '.join(map(str, example)) + ']' if isinstance(example, list) else example}"
    secret = field_info is not None and "Secret" in str(field_info.annotation)
    got = ""
    if not secret and kind != "missing" and not isinstance(error.get("input"), dict | _Model | type(None)):
        got = f" (got {_describe_value(error['input'])})"
    return order, f"{where}: {field}: {what}{got}"


def _config_error(label: str, problems: list[str]) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(f"invalid configuration: {problems[0]}")
    body = "\n".join(f"  {p}" for p in problems)
    return ConfigError(f"invalid configuration ({len(problems)} problems):\n{body}")


# ------------------------------------------------------------------------------------------------------------
# Loading


def _rebase_paths(model: _M, origins: _Origins, base: Path | None, prefix: Key = ()) -> _M:
    """Relative paths from the file are relative to the file's directory (where the author looked when writing
    them); relative paths from the environment or flags are relative to the current directory."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, _Model):
            rebased = _rebase_paths(value, origins, base, (*prefix, name))
            if rebased is not value:
                updates[name] = rebased
        elif isinstance(value, Path) and not value.is_absolute():
            origin = origins.get((*prefix, name))
            from_file = origin is not None and origin.from_file
            root = base if from_file and base is not None else Path.cwd()
            updates[name] = root / value
    return model.model_copy(update=updates) if updates else model


def _warn_if_secrets_exposed(path: Path, data: Mapping[str, Any]) -> None:
    # A warning, not an error: config files are often 0644, and only the secrets in them make that a problem.
    secrets = [
        f"{section}.{key}"
        for section, key in (("coord", "admin_token"), ("node", "join_token"))
        if isinstance(data.get(section), dict) and data[section].get(key)
    ]
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if secrets and mode & 0o004:
        _log.warning(
            "event=config_secrets_world_readable file=%s mode=%04o fields=%s fix=%s",
            path,
            mode,
            ",".join(secrets),
            f"'chmod 640 {path}' or pass the secrets as TUNNELMESH_* environment variables",
        )


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A loaded configuration and where each setting came from (for ``tunnelmesh config show --sources``)."""

    config: Config
    file: Path | None
    # field path ("coord.listen") -> "file.yaml:3", "environment variable TUNNELMESH_...", "flag ..."; fields
    # left at their default are absent.
    sources: Mapping[str, str]


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Load the effective configuration: defaults < YAML file < ``TUNNELMESH_*`` environment < ``flags``.

    ``path=None`` uses :func:`default_config_path` if that file exists (no file is fine: defaults apply); an
    explicit path must exist. ``env`` defaults to ``os.environ``. ``flags`` holds CLI overrides as nested
    dicts or dotted keys (``{"coord.listen": "0.0.0.0:9443"}``); ``None`` values are ignored. Raises
    :class:`ConfigError` naming the file and line, the variable or the flag, the field, and what to write
    instead.
    """
    return load_config_with_sources(path, env=env, flags=flags).config


def load_config_with_sources(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """:func:`load_config`, also reporting the file used and the origin of every non-default setting."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    origins: _Origins = {}
    file_path: Path | None = None
    if path is not None:
        file_path = Path(path).expanduser()
    else:
        candidate = default_config_path(env)
        if env.get(CONFIG_ENV_VAR) or candidate.exists():
            file_path = candidate
    label = str(file_path) if file_path is not None else "<no config file>"
    if file_path is not None:
        data, origins = _file_layer(file_path)
        _warn_if_secrets_exposed(file_path, data)
    for layer, layer_origins in (_env_layer(env), _flags_layer(flags or {})):
        _merge(data, origins, layer, layer_origins)

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # File problems first in line order, then environment, then flags; the sort is stable.
        ranked = sorted(
            (_problem(error, origins, label) for error in exc.errors(include_url=False)), key=lambda p: p[0]
        )
        problems = [message for _, message in ranked]
        raise _config_error(label, problems) from None
    base = file_path.resolve().parent if file_path is not None else None
    config = _rebase_paths(config, origins, base)
    if config.node.key_file is None:
        config = config.model_copy(
            update={"node": config.node.model_copy(update={"key_file": config.node.data_dir / "node.key"})}
        )
    fields = set(_field_paths(Config))
    sources = {
        ".".join(str(k) for k in key): origin.where
        for key, origin in origins.items()
        if ".".join(str(k) for k in key) in fields
    }
    return LoadedConfig(config=config, file=file_path, sources=sources)


def load_coord_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> CoordConfig:
    """The coordinator section of :func:`load_config`, with ``log_level`` resolved (never ``None``)."""
    config = load_config(path, env=env, flags=flags)
    return config.coord.model_copy(update={"log_level": config.coord.log_level or config.log.level})


def load_node_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """The node section of :func:`load_config`, ``log_level`` and ``key_file`` resolved (never ``None``)."""
    config = load_config(path, env=env, flags=flags)
    return config.node.model_copy(update={"log_level": config.node.log_level or config.log.level})


def _complete_line(line: str) -> bool:
    # A comment may only follow a value that ends on this line (not inside a multi-line quoted scalar).
    try:
        return isinstance(yaml.safe_load(line.strip()), dict)
    except yaml.YAMLError:
        return False


def render_config(
    config: Config | CoordConfig | NodeConfig | LogConfig, *, sources: Mapping[str, str] | None = None
) -> str:
    """The effective configuration as YAML, secrets shown as ``<redacted>``: what ``tunnelmesh config show``
    prints. The output is itself a valid config file (apart from the redacted secrets). With ``sources``
    (from :func:`load_config_with_sources`), each setting that is not a default gets a ``# from ...`` comment.
    """
    data = config.model_dump(mode="json")
    if not isinstance(config, Config):
        section = {CoordConfig: "coord", NodeConfig: "node", LogConfig: "log"}[type(config)]
        data = {section: data}
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000)
    if not sources:
        return text
    out: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for line in text.splitlines():
        match = re.match(r"^( *)([a-z_]+):(?: |$)", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match.group(2)))
            origin = sources.get(".".join(key for _, key in stack))
            if origin is not None and _complete_line(line):
                line = f"{line}  # from {origin}"
        out.append(line)
    return "\n".join(out) + "\n"
