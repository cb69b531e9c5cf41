"""wg-quick configuration files: parse ``[Interface]`` and ``[Peer]`` sections into data plane configs.

The format is wg-quick's (``wg-quick(8)``, ``wg(8)``): INI-like, ``Key = Value`` lines, ``#`` comments, keys
case-insensitive, any number of ``[Peer]`` sections, list values comma-separated and repeatable
(``AllowedIPs`` on several lines add up). ``FwMark`` and ``Table`` mean what they mean to wg-quick (a /0
with ``Table = auto`` becomes policy routing; see docs/dataplane.md, Full tunnel). ``PreUp``/``PostUp``/
``PreDown``/``PostDown`` (repeatable, in order) are collected as ``Hooks`` for ``tunnelmesh dataplane up`` to
run as wg-quick does. ``DNS`` (comma-separated, repeatable: IP addresses are name servers, anything else a
search domain) is set through ``resolvconf`` while the interface is up (``node/resolvconf.py``). Existing
files work unchanged: ``SaveConfig`` is accepted and reported as ignored. ``PrivateKeyFile`` and
``PresharedKeyFile`` are TunnelMesh additions that keep secrets out of the config file (key files must be mode
0600, as ``tunnelmesh.identity`` requires). ``diff`` compares two versions of a file for ``tunnelmesh
dataplane reload``: what changed in the peers, and which ``[Interface]`` settings would need a restart.
``Endpoint`` host names are resolved while parsing; ``up`` retries a lookup that failed for a reason that may
pass, as wg(8) does (``WG_ENDPOINT_RESOLUTION_RETRIES``).

Every error names the file, the line and the field, and says what a valid value looks like; no error message
contains key material.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tunnelmesh.errors import ConfigError, IdentityError
from tunnelmesh.identity import parse_private_key, parse_public_key, read_private_key_file
from tunnelmesh.node.dataplane import DEFAULT_MTU, InterfaceConfig, PeerConfig

__all__ = [
    "ConfigChange",
    "Dns",
    "Hooks",
    "WgQuickConfig",
    "diff",
    "interface_name_for",
    "load",
    "parse",
    "resolution_retries",
]

log = logging.getLogger(__name__)

# Endpoint host names: a lookup that fails for a reason that may pass (no network yet at boot, a name server
# not answering) is tried again, as wg(8) does, under wg(8)'s variable: unit files that set it keep working.
RESOLUTION_RETRIES_ENV: Final = "WG_ENDPOINT_RESOLUTION_RETRIES"
DEFAULT_RESOLUTION_RETRIES: Final = 15  # wg(8)'s default: about 72 s of waits in all
RESOLUTION_FIRST_WAIT: Final = 1.0  # seconds; each wait is 1.2 times the last, at most RESOLUTION_MAX_WAIT
RESOLUTION_MAX_WAIT: Final = 20.0
# The answers no retry can change (glibc: "EAI_FAIL, EAI_NONAME and EAI_NODATA are all permanent").
_PERMANENT_GAI_ERRORS: Final = frozenset(
    {socket.EAI_NONAME, socket.EAI_FAIL} | ({socket.EAI_NODATA} if hasattr(socket, "EAI_NODATA") else set())
)

_INTERFACE_KEYS = {
    "privatekey",
    "privatekeyfile",
    "listenport",
    "address",
    "mtu",
    "fwmark",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "dns",
}
_IGNORED_INTERFACE_KEYS = {"saveconfig"}
_HOOK_KEYS = ("preup", "postup", "predown", "postdown")
# Where iproute2 looks up table names (``table NAME``); /etc overrides /usr/share (iproute2 6.5+).
RT_TABLES = (Path("/usr/share/iproute2/rt_tables"), Path("/etc/iproute2/rt_tables"))
_BUILTIN_TABLES = {"default": 253, "main": 254, "local": 255}  # iproute2 knows these without any file
_U32_MAX = 0xFFFFFFFF
_LOOKS_LIKE_ADDRESS = re.compile(r"[0-9.]+")  # wg-quick's test: such a DNS item is a server, not a domain
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_PEER_KEYS = {
    "publickey",
    "presharedkey",
    "presharedkeyfile",
    "endpoint",
    "allowedips",
    "persistentkeepalive",
}
_CANONICAL = {
    "privatekey": "PrivateKey",
    "privatekeyfile": "PrivateKeyFile",
    "listenport": "ListenPort",
    "address": "Address",
    "mtu": "MTU",
    "fwmark": "FwMark",
    "table": "Table",
    "preup": "PreUp",
    "postup": "PostUp",
    "predown": "PreDown",
    "postdown": "PostDown",
    "dns": "DNS",
    "publickey": "PublicKey",
    "presharedkey": "PresharedKey",
    "presharedkeyfile": "PresharedKeyFile",
    "endpoint": "Endpoint",
    "allowedips": "AllowedIPs",
    "persistentkeepalive": "PersistentKeepalive",
}


@dataclass(frozen=True, slots=True)
class Hooks:
    """wg-quick's shell commands, each run by ``bash -c`` with ``%i`` replaced by the interface name: before
    the interface is made, once it is up, before it is taken down and after it is gone."""

    pre_up: tuple[str, ...] = ()
    post_up: tuple[str, ...] = ()
    pre_down: tuple[str, ...] = ()
    post_down: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Dns:
    """wg-quick's ``DNS``: the name servers and search domains the system uses while the interface is up."""

    servers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.servers or self.search)


@dataclass(frozen=True, slots=True)
class WgQuickConfig:
    interface: InterfaceConfig
    peers: tuple[PeerConfig, ...]
    ignored: tuple[str, ...] = field(default=())  # "file:line: Key" of keys we accept but do not act on
    hooks: Hooks = field(default_factory=Hooks)
    dns: Dns = field(default_factory=Dns)


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """What a new version of a running interface's file changes (``diff``). ``restart`` names the
    ``[Interface]`` settings that differ: a running interface cannot take them, so a reload refuses."""

    added: tuple[PeerConfig, ...] = ()
    removed: tuple[bytes, ...] = ()  # public keys
    changed: tuple[tuple[PeerConfig, frozenset[str]], ...] = ()  # the new peer, its changed fields
    unchanged: int = 0
    restart: tuple[str, ...] = ()


# The InterfaceConfig fields a wg-quick file sets, by their key in the file.
_RESTART_FIELDS = {
    "private_key": "PrivateKey",
    "listen_port": "ListenPort",
    "addresses": "Address",
    "mtu": "MTU",
    "manage_routes": "Table",
    "table": "Table",
    "fwmark": "FwMark",
}
# The PeerConfig fields a reload can change, and their keys in the file.
PEER_FIELD_KEYS = {
    "endpoint": "Endpoint",
    "allowed_ips": "AllowedIPs",
    "preshared_key": "PresharedKey",
    "persistent_keepalive": "PersistentKeepalive",
}


def diff(running: WgQuickConfig, new: WgQuickConfig) -> ConfigChange:
    """Compare the file a running interface came up from with a new version of it. Peers are matched by
    public key; a peer's fields count as changed only where the two files differ, so an endpoint the peer
    roamed to is kept while the file's ``Endpoint`` stays the same."""
    restart = [
        key
        for f, key in _RESTART_FIELDS.items()
        if getattr(running.interface, f) != getattr(new.interface, f)
    ]
    if running.dns != new.dns:
        restart.append("DNS")
    if running.hooks != new.hooks:
        restart.append("PreUp/PostUp/PreDown/PostDown")
    old = {p.public_key: p for p in running.peers}
    current = {p.public_key: p for p in new.peers}
    changed: list[tuple[PeerConfig, frozenset[str]]] = []
    unchanged = 0
    for key, peer in current.items():
        before = old.get(key)
        if before is None:
            continue
        fields = {f for f in PEER_FIELD_KEYS if getattr(before, f) != getattr(peer, f)}
        if peer.endpoint is None:
            fields.discard("endpoint")  # as with `wg`: an endpoint is never unset, only replaced
        if fields:
            changed.append((peer, frozenset(fields)))
        else:
            unchanged += 1
    return ConfigChange(
        added=tuple(p for k, p in current.items() if k not in old),
        removed=tuple(k for k in old if k not in current),
        changed=tuple(changed),
        unchanged=unchanged,
        restart=tuple(dict.fromkeys(restart)),  # Table covers two fields: name it once
    )


def interface_name_for(path: str | os.PathLike[str]) -> str:
    """The interface name wg-quick derives from a config path: the file name without ``.conf``."""
    name = Path(path).name
    if name.endswith(".conf"):
        name = name[: -len(".conf")]
    return name


def resolution_retries(env: Mapping[str, str] = os.environ) -> int | None:
    """How many times a transient failure to resolve an ``Endpoint`` host is retried, from
    ``$WG_ENDPOINT_RESOLUTION_RETRIES`` (a number, or ``infinity``: None); 15 if unset."""
    value = env.get(RESOLUTION_RETRIES_ENV, "").strip()
    if not value:
        return DEFAULT_RESOLUTION_RETRIES
    if value.lower() == "infinity":
        return None
    if not value.isdigit():
        raise ConfigError(f"{RESOLUTION_RETRIES_ENV}={value!r}: expected a number of retries or 'infinity'")
    return int(value)


def load(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    resolve_retries: int | None = 0,
    sleep: Callable[[float], None] = time.sleep,
) -> WgQuickConfig:
    """Read and parse a config file. ``resolve_retries``: how often a transient failure to resolve an
    ``Endpoint`` host name is retried (None: until it resolves), after waits growing from 1 s to 20 s."""
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{target}: config file not found") from None
    except PermissionError:
        raise ConfigError(f"{target}: permission denied reading the config file; run as root") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{target}: not a text file (UTF-8 expected)") from None
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read the config file: {exc.strerror}") from None
    return parse(
        text,
        source=str(target),
        name=name or interface_name_for(target),
        base_dir=target.parent,
        resolve_retries=resolve_retries,
        sleep=sleep,
    )


class _Section:
    def __init__(self, kind: str, line: int) -> None:
        self.kind = kind
        self.line = line
        self.values: dict[str, list[tuple[int, str]]] = {}


def parse(
    text: str,
    *,
    source: str = "<config>",
    name: str = "tm0",
    base_dir: Path | None = None,
    resolve_retries: int | None = 0,
    sleep: Callable[[float], None] = time.sleep,
) -> WgQuickConfig:
    """Parse wg-quick config ``text``; ``source`` names it in errors. ``resolve_retries`` as for ``load``."""
    sections: list[_Section] = []
    ignored: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"{where}: section header {line!r} is missing its closing ']'")
            kind = line[1:-1].strip().lower()
            if kind not in ("interface", "peer"):
                raise ConfigError(
                    f"{where}: unknown section [{line[1:-1].strip()}]; expected [Interface] or [Peer]"
                )
            if kind == "interface" and any(s.kind == "interface" for s in sections):
                raise ConfigError(f"{where}: a second [Interface] section; a config has exactly one")
            sections.append(_Section(kind, lineno))
            continue
        if "=" not in line:
            raise ConfigError(f"{where}: expected `Key = Value`, got {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        lkey = key.lower()
        if not sections:
            raise ConfigError(f"{where}: `{key}` appears before any [Interface] or [Peer] section")
        section = sections[-1]
        allowed = _INTERFACE_KEYS if section.kind == "interface" else _PEER_KEYS
        if section.kind == "interface" and lkey in _IGNORED_INTERFACE_KEYS:
            ignored.append(f"{where}: {key}")
            continue
        if lkey not in allowed:
            names = ", ".join(_CANONICAL[k] for k in sorted(allowed))
            raise ConfigError(
                f"{where}: unknown key `{key}` in [{section.kind.title()}]; expected one of {names}"
            )
        if lkey not in ("address", "allowedips", "dns", *_HOOK_KEYS) and lkey in section.values:
            first = section.values[lkey][0][0]
            raise ConfigError(f"{where}: `{key}` is set twice in this section (first on line {first})")
        section.values.setdefault(lkey, []).append((lineno, value))

    interfaces = [s for s in sections if s.kind == "interface"]
    if not interfaces:
        raise ConfigError(f"{source}: no [Interface] section; a config needs one with a PrivateKey")
    iface = _interface(interfaces[0], source, name, base_dir)
    peers: list[PeerConfig] = []
    seen: dict[bytes, int] = {}
    for s in sections:
        if s.kind != "peer":
            continue
        peer = _peer(s, source, base_dir, _Resolver(resolve_retries, sleep))
        if peer.public_key in seen:
            raise ConfigError(
                f"{source}:{s.line}: [Peer] repeats the PublicKey of the [Peer] "
                f"on line {seen[peer.public_key]}"
            )
        if peer.public_key == _public_of(iface.private_key):
            raise ConfigError(f"{source}:{s.line}: [Peer] has this interface's own public key")
        seen[peer.public_key] = s.line
        peers.append(peer)
    hooks = Hooks(*(tuple(v for _, v in interfaces[0].values.get(k, ()) if v) for k in _HOOK_KEYS))
    return WgQuickConfig(iface, tuple(peers), tuple(ignored), hooks, _dns(interfaces[0], source))


def _dns(s: _Section, source: str) -> Dns:
    """wg-quick(8) ``DNS``: an item that looks like an address (digits and dots, or a colon) must be one and
    is a name server; anything else must be a domain name and is a search domain. Duplicates are dropped."""
    servers: list[str] = []
    search: list[str] = []
    for lineno, value in _list(s, "dns"):
        if _LOOKS_LIKE_ADDRESS.fullmatch(value) or ":" in value:
            try:
                item = str(ipaddress.ip_address(value))
            except ValueError:
                raise ConfigError(
                    f"{source}:{lineno}: DNS {value!r} is not an IP address (name servers are given by "
                    f"address, e.g. 10.0.0.53 or fd00::53)"
                ) from None
            if item not in servers:
                servers.append(item)
            continue
        name = value.rstrip(".")
        labels = name.split(".")
        if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise ConfigError(
                f"{source}:{lineno}: DNS {value!r} is neither an IP address nor a domain name "
                f"(a search domain is letters, digits and hyphens in dot-separated labels, e.g. corp.example)"
            )
        if name not in search:
            search.append(name)
    return Dns(tuple(servers), tuple(search))


def _public_of(private_key: bytes) -> bytes:
    import nacl.bindings

    return bytes(nacl.bindings.crypto_scalarmult_base(private_key))


def _one(s: _Section, key: str) -> tuple[int, str] | None:
    found = s.values.get(key)
    return found[0] if found else None


def _list(s: _Section, key: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for lineno, value in s.values.get(key, []):
        out += [(lineno, item.strip()) for item in value.split(",") if item.strip()]
    return out


def _key_file(path_text: str, where: str, field_name: str, base_dir: Path | None) -> bytes:
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return read_private_key_file(path, field_name)
    except IdentityError as exc:
        raise ConfigError(f"{where}: {field_name}: {exc}") from None


def _interface(s: _Section, source: str, name: str, base_dir: Path | None) -> InterfaceConfig:
    key = _one(s, "privatekey")
    key_file = _one(s, "privatekeyfile")
    if key and key_file:
        raise ConfigError(f"{source}:{key_file[0]}: set PrivateKey or PrivateKeyFile, not both")
    if key is None and key_file is None:
        raise ConfigError(
            f"{source}:{s.line}: [Interface] has no PrivateKey; generate one with `wg genkey` "
            f"(or set PrivateKeyFile to a 0600 file holding it)"
        )
    try:
        if key is not None:
            private = parse_private_key(key[1], source=f"{source}:{key[0]}: PrivateKey")
        else:
            assert key_file is not None
            where = f"{source}:{key_file[0]}"
            raw = _key_file(key_file[1], where, "PrivateKeyFile", base_dir)
            private = parse_private_key(raw, source=f"{where}: PrivateKeyFile {key_file[1]}")
    except IdentityError as exc:
        raise ConfigError(str(exc)) from None
    port = 0
    if (lp := _one(s, "listenport")) is not None:
        port = _int(lp, source, "ListenPort", 0, 65535)
    mtu = DEFAULT_MTU
    if (m := _one(s, "mtu")) is not None:
        mtu = _int(m, source, "MTU", 576, 65535)
    addresses: list[str] = []
    for lineno, value in _list(s, "address"):
        try:
            iface = ipaddress.ip_interface(value)
        except ValueError:
            raise ConfigError(
                f"{source}:{lineno}: Address {value!r} is not an address with prefix, e.g. 10.0.0.1/24"
            ) from None
        if "/" not in value:
            iface = ipaddress.ip_interface(f"{value}/{iface.max_prefixlen}")
        addresses.append(str(iface))
    fwmark = 0
    if (fm := _one(s, "fwmark")) is not None:
        fwmark = _fwmark(fm, source)
    manage_routes, table = True, None
    if (t := _one(s, "table")) is not None:
        manage_routes, table = _table(t, source)
    return InterfaceConfig(
        private_key=bytes(private.private_key),
        name=name,
        listen_port=port,
        addresses=tuple(addresses),
        mtu=mtu,
        fwmark=fwmark,
        manage_routes=manage_routes,
        table=table,
    )


def _fwmark(item: tuple[int, str], source: str) -> int:
    """wg(8): a 32-bit mark, decimal or 0x-hex; 0 or ``off`` disables it."""
    lineno, value = item
    if value.lower() == "off":
        return 0
    try:
        mark = int(value, 16) if value.lower().startswith("0x") else int(value, 10)
    except ValueError:
        raise ConfigError(
            f"{source}:{lineno}: FwMark {value!r} is not a number; use decimal, 0x-hex or off"
        ) from None
    if not 0 <= mark <= _U32_MAX:
        raise ConfigError(f"{source}:{lineno}: FwMark {value} is out of range (0-0xffffffff)")
    return mark


def _table(item: tuple[int, str], source: str) -> tuple[bool, int | None]:
    """wg-quick(8) ``Table``: (routes managed?, table). ``auto`` (None: main, and policy routing for a /0),
    ``off`` (no routes), a table number or a name from iproute2's rt_tables."""
    lineno, value = item
    low = value.lower()
    if low == "auto":
        return True, None
    if low == "off":
        return False, None
    if value.isdigit():
        table = int(value, 10)
    else:
        found = rt_table_names().get(value)
        if found is None:
            raise ConfigError(
                f"{source}:{lineno}: Table {value!r} is not auto, off, a number or a table name from "
                f"{RT_TABLES[-1]}"
            )
        table = found
    if not 0 < table <= _U32_MAX:
        raise ConfigError(f"{source}:{lineno}: Table {value} is out of range (1-4294967295)")
    return True, table


def rt_table_names() -> dict[str, int]:
    """Routing table names as iproute2 reads them: its built-ins, then rt_tables (and ``rt_tables.d/*.conf``)
    under /usr/share/iproute2 and /etc/iproute2, later files overriding earlier ones."""
    names = dict(_BUILTIN_TABLES)
    for base in RT_TABLES:
        for path in (base, *sorted(base.parent.glob("rt_tables.d/*.conf"))):
            try:
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2:
                    with contextlib.suppress(ValueError):
                        names[fields[1]] = int(fields[0], 0)
    return names


def _peer(s: _Section, source: str, base_dir: Path | None, resolver: _Resolver) -> PeerConfig:
    pk = _one(s, "publickey")
    if pk is None:
        raise ConfigError(f"{source}:{s.line}: [Peer] has no PublicKey (the peer's `wg pubkey` output)")
    try:
        public = bytes(parse_public_key(pk[1], source=f"{source}:{pk[0]}: PublicKey"))
    except IdentityError as exc:
        raise ConfigError(str(exc)) from None
    psk: bytes | None = None
    psk_line, psk_file = _one(s, "presharedkey"), _one(s, "presharedkeyfile")
    if psk_line and psk_file:
        raise ConfigError(f"{source}:{psk_file[0]}: set PresharedKey or PresharedKeyFile, not both")
    try:
        if psk_line is not None:
            psk = bytes(parse_public_key(psk_line[1], source=f"{source}:{psk_line[0]}: PresharedKey"))
        elif psk_file is not None:
            where = f"{source}:{psk_file[0]}"
            raw = _key_file(psk_file[1], where, "PresharedKeyFile", base_dir)
            psk = bytes(parse_public_key(raw, source=f"{where}: PresharedKeyFile {psk_file[1]}"))
    except IdentityError as exc:
        # parse_public_key says "public key"; a PSK has the same encoding (`wg genpsk`).
        raise ConfigError(str(exc).replace("public key", "preshared key (`wg genpsk` output)")) from None
    endpoint = None
    if (ep := _one(s, "endpoint")) is not None:
        endpoint = _endpoint(ep, source, resolver)
    keepalive = 0.0
    if (ka := _one(s, "persistentkeepalive")) is not None:
        keepalive = (
            0.0 if ka[1].lower() == "off" else float(_int(ka, source, "PersistentKeepalive", 0, 65535))
        )
    allowed: list[str] = []
    for lineno, value in _list(s, "allowedips"):
        try:
            allowed.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            raise ConfigError(
                f"{source}:{lineno}: AllowedIPs entry {value!r} is not a network, "
                "e.g. 10.0.0.2/32 or fd00::/64"
            ) from None
    return PeerConfig(
        public_key=public,
        allowed_ips=tuple(allowed),
        endpoint=endpoint,
        preshared_key=psk,
        persistent_keepalive=keepalive,
    )


def _int(item: tuple[int, str], source: str, field_name: str, lo: int, hi: int) -> int:
    lineno, value = item
    try:
        n = int(value, 10)
    except ValueError:
        raise ConfigError(f"{source}:{lineno}: {field_name} {value!r} is not a number ({lo}-{hi})") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{source}:{lineno}: {field_name} {n} is out of range ({lo}-{hi})")
    return n


@dataclass(frozen=True)
class _Resolver:
    """Looks up an Endpoint host name, retrying failures that may pass (see RESOLUTION_RETRIES_ENV)."""

    retries: int | None  # None: until it resolves
    sleep: Callable[[float], None]

    def __call__(self, host: str, port: int, where: str) -> list[tuple[object, ...]]:
        wait, attempt = RESOLUTION_FIRST_WAIT, 0
        while True:
            try:
                infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
                return [info[4] for info in infos]
            except UnicodeError as exc:  # not a valid (IDNA) name: permanent
                raise ConfigError(f"{where}: Endpoint host {host!r} is not a valid name: {exc}") from None
            except socket.gaierror as exc:
                reason = exc.strerror or str(exc)
                if exc.errno in _PERMANENT_GAI_ERRORS:
                    raise ConfigError(f"{where}: Endpoint host {host!r} does not resolve: {reason}") from None
                if self.retries is not None and attempt >= self.retries:
                    tried = f"; tried {attempt + 1} times" if attempt else ""
                    raise ConfigError(
                        f"{where}: Endpoint host {host!r} does not resolve now: {reason}{tried} "
                        f"({RESOLUTION_RETRIES_ENV} sets how often `up` retries, or 'infinity')"
                    ) from None
            attempt += 1
            limit = "" if self.retries is None else f"/{self.retries}"
            log.warning(
                "event=endpoint_resolve_retry where=%s host=%s reason=%r retry=%d%s in_seconds=%.2f",
                where, host, reason, attempt, limit, wait,
            )  # fmt: skip
            self.sleep(wait)
            wait = min(wait * 1.2, RESOLUTION_MAX_WAIT)


def _endpoint(item: tuple[int, str], source: str, resolver: _Resolver) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as wg(8) takes it. A host name is resolved to its first address (either
    family, in the system's preference order, as wg does); a link-local ``[fe80::1%eth0]`` keeps its scope as
    the interface index (``fe80::1%2``), the form the data plane reports received packets in."""
    lineno, value = item
    where = f"{source}:{lineno}"
    example = "e.g. 198.51.100.7:51820 or [2001:db8::1]:51820"
    bracketed = value.startswith("[")
    if bracketed:
        host, close, port_text = value[1:].partition("]")
        if not close:
            raise ConfigError(f"{where}: Endpoint {value!r} is missing the closing ']' ({example})")
        if not port_text.startswith(":"):
            raise ConfigError(f"{where}: Endpoint {value!r} needs :port after the ']' ({example})")
        port_text = port_text[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{where}: Endpoint {value!r} needs host:port, {example}")
        if ":" in host or "]" in host:
            raise ConfigError(f"{where}: Endpoint {value!r}: put an IPv6 address in brackets, {example}")
    port = _int((lineno, port_text), source, "Endpoint port", 1, 65535)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            raise ConfigError(
                f"{where}: Endpoint {value!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
        host = _scoped(resolver(host, port, where)[0])
        addr = ipaddress.ip_address(host)
    if addr.version == 4:
        if bracketed:
            raise ConfigError(f"{where}: Endpoint {value!r}: only IPv6 addresses go in brackets")
        return str(addr), port
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped), port  # how the data plane reports that peer's packets
    if "%" not in host:
        return str(addr), port
    try:  # the scope may be an interface name or index; the kernel wants the index
        infos = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        raise ConfigError(
            f"{where}: Endpoint {value!r}: no interface {host.partition('%')[2]!r} for the link-local scope"
        ) from None
    return _scoped(infos[0][4]), port


def _scoped(sockaddr: tuple[object, ...]) -> str:
    """The host of a resolved address, with an IPv6 scope as ``%index`` (as ``UdpSocket`` reports it)."""
    host = str(sockaddr[0])
    return f"{host}%{sockaddr[3]}" if len(sockaddr) == 4 and sockaddr[3] else host
