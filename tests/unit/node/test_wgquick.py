"""wg-quick config files: what `tunnelmesh dataplane up --config` accepts, and how it says what is wrong.

Each case cites the wg-quick(8)/wg(8) rule it checks. Errors must name file, line and field and never
contain key material.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import nacl.public
import pytest

from tunnelmesh.cli.dataplane_cmd import format_status
from tunnelmesh.errors import ConfigError
from tunnelmesh.node import resolvconf, wgquick

# Fixed keys: they appear in test ids, which must not change between runs (or between pytest-xdist workers).
PRIV = base64.b64encode(bytes(nacl.public.PrivateKey(bytes(range(1, 33))))).decode()
PEER_PRIV = nacl.public.PrivateKey(bytes(range(33, 65)))
PUB = base64.b64encode(bytes(PEER_PRIV.public_key)).decode()
PSK = base64.b64encode(bytes(range(32))).decode()


def conf(body: str) -> str:
    return f"[Interface]\nPrivateKey = {PRIV}\n{body}"


def test_full_file_as_wg_quick_writes_it() -> None:
    text = f"""
    # a comment
    [Interface]
    PrivateKey = {PRIV}
    ListenPort = 51820
    Address = 10.0.0.1/24, fd00::1/64
    MTU = 1380
    DNS = 1.1.1.1
    SaveConfig = true
    PostUp = iptables -A FORWARD -i %i -j ACCEPT
    PostUp = echo second
    PreDown = echo bye %i

    [Peer]
    PublicKey = {PUB}
    PresharedKey = {PSK}
    Endpoint = 192.0.2.7:51820
    AllowedIPs = 10.0.0.2/32
    AllowedIPs = 10.1.0.0/16
    PersistentKeepalive = 25
    """
    cfg = wgquick.parse(text.replace("    ", ""), source="wg0.conf", name="wg0")
    assert cfg.interface.name == "wg0"
    assert cfg.interface.listen_port == 51820
    assert cfg.interface.addresses == ("10.0.0.1/24", "fd00::1/64")
    assert cfg.interface.mtu == 1380
    (peer,) = cfg.peers
    assert peer.public_key == bytes(PEER_PRIV.public_key)
    assert peer.preshared_key == bytes(range(32))
    assert peer.endpoint == ("192.0.2.7", 51820)
    assert peer.allowed_ips == ("10.0.0.2/32", "10.1.0.0/16")  # repeated keys add up (wg-quick)
    assert peer.persistent_keepalive == 25.0
    assert [w.split(": ")[1] for w in cfg.ignored] == ["SaveConfig"]
    assert cfg.dns == wgquick.Dns(servers=("1.1.1.1",))
    # Hooks repeat and keep their order; %i is replaced when they run (tunnelmesh dataplane up).
    assert cfg.hooks == wgquick.Hooks(
        post_up=("iptables -A FORWARD -i %i -j ACCEPT", "echo second"), pre_down=("echo bye %i",)
    )


def test_keys_are_case_insensitive_and_address_without_prefix_is_a_host() -> None:
    cfg = wgquick.parse(f"[interface]\nprivatekey={PRIV}\naddress=10.0.0.1\n[PEER]\npublickey={PUB}\n")
    assert cfg.interface.addresses == ("10.0.0.1/32",)
    assert cfg.peers[0].allowed_ips == ()


def test_private_key_file_must_be_private(tmp_path: Path) -> None:
    key = tmp_path / "wg.key"
    key.write_text(PRIV + "\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"c.conf:2: PrivateKeyFile: .*chmod 600"):
        wgquick.parse("[Interface]\nPrivateKeyFile = wg.key\n", source="c.conf", base_dir=tmp_path)
    key.chmod(0o600)
    cfg = wgquick.parse("[Interface]\nPrivateKeyFile = wg.key\n", source="c.conf", base_dir=tmp_path)
    assert base64.b64encode(cfg.interface.private_key).decode() == PRIV


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("192.0.2.7:51820", ("192.0.2.7", 51820)),
        ("[2001:db8::1]:51820", ("2001:db8::1", 51820)),  # wg(8): IPv6 in brackets
        ("[2001:DB8:0::1]:1", ("2001:db8::1", 1)),  # canonical form: compares equal to received sources
        ("[::ffff:192.0.2.7]:51820", ("192.0.2.7", 51820)),  # v4-mapped: the data plane sees an IPv4 peer
        ("[fe80::1%lo]:51820", ("fe80::1%1", 51820)),  # link-local: scope as the interface index
        ("[fe80::1%1]:51820", ("fe80::1%1", 51820)),
        ("localhost:7", ("127.0.0.1", 7)),  # a name resolves once, at load
    ],
)
def test_endpoints_ipv4_ipv6_and_names(endpoint: str, parsed: tuple[str, int]) -> None:
    cfg = wgquick.parse(conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = {endpoint}\n"))
    assert cfg.peers[0].endpoint == parsed


def test_a_name_that_resolves_to_ipv6_gives_an_ipv6_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """wg(8) takes the first address getaddrinfo returns, of either family (this host's /etc/hosts has no
    IPv6 name, so the resolver's answer is stood in for)."""
    answers = {"v6.example": [(socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("2001:db8::7", 5, 0, 0))]}
    real = socket.getaddrinfo

    def resolve(host: str, *args: object, **kwargs: object) -> object:
        return answers[host] if host in answers else real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    cfg = wgquick.parse(conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = v6.example:5\n"))
    assert cfg.peers[0].endpoint == ("2001:db8::7", 5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"no \[Interface\] section"),
        ("[Interface]\nListenPort = 1\n", r"c.conf:1: \[Interface\] has no PrivateKey"),
        ("[Interface]\nPrivateKey = nope\n", r"c.conf:2: PrivateKey: a private key is 32 bytes"),
        (conf("ListenPort = 70000\n"), r"c.conf:3: ListenPort 70000 is out of range"),
        (conf("MTU = big\n"), r"c.conf:3: MTU 'big' is not a number"),
        (conf("Address = 10.0.0.300/24\n"), r"c.conf:3: Address '10.0.0.300/24'"),
        (conf("Colour = blue\n"), r"c.conf:3: unknown key `Colour` in \[Interface\]"),
        (conf("ListenPort = 1\nListenPort = 2\n"), r"c.conf:4: `ListenPort` is set twice .*line 3"),
        (conf("[Peer]\nAllowedIPs = 10.0.0.2/32\n"), r"c.conf:3: \[Peer\] has no PublicKey"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nAllowedIPs = 10.0.0.2/33\n"), r"c.conf:5: AllowedIPs entry"),
        (
            conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = 192.0.2.1\n"),
            r"c.conf:5: Endpoint .* needs host:port",
        ),
        (conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = ::1:5\n"), r"c.conf:5: .*brackets"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = [::1:5\n"), r"c.conf:5: .*missing the closing"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = [::1]\n"), r"c.conf:5: .*needs :port after"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = [::1]:99999\n"), r"c.conf:5: Endpoint port 99999"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = [::1]:x\n"), r"c.conf:5: Endpoint port 'x'"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = [192.0.2.1]:5\n"), r"c.conf:5: .*only IPv6 .*brackets"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = [vpn.example]:5\n"), r"c.conf:5: .*not an IPv6"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = [fe80::1%nosuch0]:5\n"), r"c.conf:5: .*'nosuch0'"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nPersistentKeepalive = -1\n"), r"c.conf:5: PersistentKeepalive"),
        (conf(f"[Peer]\nPublicKey = {PUB}\nPresharedKey = xx\n"), r"c.conf:5: PresharedKey: .*preshared key"),
        (
            conf(f"[Peer]\nPublicKey = {PUB}\n[Peer]\nPublicKey = {PUB}\n"),
            r"c.conf:5: .*repeats the PublicKey",
        ),
        (conf("[Peers]\n"), r"c.conf:3: unknown section \[Peers\]"),
        ("PrivateKey = x\n", r"c.conf:1: `PrivateKey` appears before any"),
        (conf("just words\n"), r"c.conf:3: expected `Key = Value`"),
        (conf("FwMark = 0xfffffffff\n"), r"c.conf:3: FwMark 0xfffffffff is out of range"),
        (conf("FwMark = -1\n"), r"c.conf:3: FwMark -1 is out of range"),
        (conf("FwMark = 0xzz\n"), r"c.conf:3: FwMark '0xzz' is not a number; use decimal, 0x-hex or off"),
        (conf("FwMark = 1\nFwMark = 2\n"), r"c.conf:4: `FwMark` is set twice"),
        (conf("Table = 0\n"), r"c.conf:3: Table 0 is out of range"),
        (conf("Table = 4294967296\n"), r"c.conf:3: Table 4294967296 is out of range"),
        (conf("Table = no-such-table\n"), r"c.conf:3: Table 'no-such-table' is not auto, off, a number"),
        (conf("DNS = 10.0.0.300\n"), r"c.conf:3: DNS '10.0.0.300' is not an IP address"),
        (conf("DNS = 10.0.0.1\nDNS = fd00::1::2\n"), r"c.conf:4: DNS 'fd00::1::2' is not an IP address"),
        (conf("DNS = corp example\n"), r"c.conf:3: DNS 'corp example' is neither an IP address nor a domain"),
        (conf("DNS = -corp.example\n"), r"c.conf:3: DNS '-corp.example' is neither"),
        (conf("DNS = a..b\n"), r"c.conf:3: DNS 'a..b' is neither"),
        (conf(f"DNS = {'x' * 64}.example\n"), r"c.conf:3: DNS 'x+.example' is neither"),
    ],
)
def test_errors_name_file_line_and_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        wgquick.parse(text, source="c.conf")
    assert PRIV not in str(info.value) and PSK not in str(info.value)


@pytest.mark.parametrize(
    ("value", "mark"),
    [
        ("51820", 51820),
        ("0xca6c", 51820),
        ("0XCA6C", 51820),
        ("0", 0),
        ("off", 0),
        ("Off", 0),
        ("0xffffffff", 2**32 - 1),
    ],
)
def test_fwmark_is_decimal_or_hex_and_off_or_0_disables_it(value: str, mark: int) -> None:
    """wg(8) fwmark: "a 32-bit fwmark for outgoing packets. If set to 0 or "off", this option is disabled.
    May be specified in hexadecimal by prepending "0x"."""
    assert wgquick.parse(conf(f"FwMark = {value}\n")).interface.fwmark == mark


def test_fwmark_and_table_default_to_none_and_auto() -> None:
    iface = wgquick.parse(conf("")).interface
    assert (iface.fwmark, iface.manage_routes, iface.table) == (0, True, None)


@pytest.mark.parametrize(
    ("value", "routes", "table"),
    [
        ("auto", True, None),
        ("off", False, None),
        ("1234", True, 1234),
        ("main", True, 254),
        ("4294967295", True, 2**32 - 1),
    ],
)
def test_table_auto_off_number_or_name(value: str, routes: bool, table: int | None) -> None:
    """wg-quick(8) Table: "off" adds no routes; "auto" (the default) adds them to the main table, a default
    route through policy routing; a number or name puts them in that table."""
    iface = wgquick.parse(conf(f"Table = {value}\n")).interface
    assert (iface.manage_routes, iface.table) == (routes, table)


def test_table_names_come_from_iproute2_rt_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As iproute2 reads them: /etc/iproute2/rt_tables and rt_tables.d/*.conf override /usr/share."""
    share, etc = tmp_path / "share", tmp_path / "etc"
    (etc / "rt_tables.d").mkdir(parents=True)
    share.mkdir()
    (share / "rt_tables").write_text("255 local\n254 main\n100 vpn\n")
    (etc / "rt_tables").write_text("# comment\n200\tvpn # moved\n0x10 hexed\n")
    (etc / "rt_tables.d" / "extra.conf").write_text("300 extra\n")
    monkeypatch.setattr(wgquick, "RT_TABLES", (share / "rt_tables", etc / "rt_tables"))
    names = ("vpn", "hexed", "extra", "main")
    tables = [wgquick.parse(conf(f"Table = {n}\n")).interface.table for n in names]
    assert tables == [200, 16, 300, 254]


def test_dns_servers_and_search_domains() -> None:
    """wg-quick(8): DNS items that are IP addresses are name servers, the others search domains; lists are
    comma-separated and the key repeats. Repeats count once, addresses are written canonically."""
    cfg = wgquick.parse(
        conf("DNS = 10.0.0.53, FD00:0::53 , corp.example.\nDNS = 10.0.0.53,lab.corp.example, corp.example\n")
    )
    assert cfg.dns == wgquick.Dns(
        servers=("10.0.0.53", "fd00::53"), search=("corp.example", "lab.corp.example")
    )
    assert not cfg.ignored
    assert not wgquick.parse(conf("")).dns  # none: `dataplane up` leaves the system's resolver alone


def test_resolvconf_record_takes_the_interface_order_prefix(tmp_path: Path) -> None:
    """wg-quick's resolvconf_iface_prefix: Debian's resolvconf orders records by interface-order, whose first
    ``name*`` pattern names the prefix; without the file the record is the interface name."""
    order = tmp_path / "interface-order"
    assert resolvconf.record_name("wg0", order) == "wg0"
    # Debian's file: `lo.inet*` is no plain-name pattern, `tun*` is the first.
    order.write_text("# interfaces in order\nlo.inet6\nlo.inet*\nlo\ntun*\ntap*\nem+([0-9])\n")
    assert resolvconf.record_name("wg0", order) == "tun.wg0"
    order.write_text("wg*\ntun*\n")
    assert resolvconf.record_name("wg0", order) == "wg.wg0"


def test_peer_with_own_public_key_is_refused() -> None:
    own = base64.b64encode(bytes(nacl.public.PrivateKey(base64.b64decode(PRIV)).public_key)).decode()
    with pytest.raises(ConfigError, match="own public key"):
        wgquick.parse(conf(f"[Peer]\nPublicKey = {own}\n"), source="c.conf")


def test_load_names_the_interface_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tm7.conf"
    path.write_text(conf(""))
    assert wgquick.load(path).interface.name == "tm7"
    with pytest.raises(ConfigError, match="config file not found"):
        wgquick.load(tmp_path / "missing.conf")


def test_show_prints_like_wg_show() -> None:
    status = {
        "interface": "tm0",
        "public_key": "PUB=",
        "listen_port": 51820,
        "offloads": {"tun": ["csum", "tso4"], "udp_gso": True, "udp_gro": False},
        "peers": [
            {
                "public_key": "PEER=",
                "endpoint": "192.0.2.7:51820",
                "allowed_ips": ["10.0.0.2/32"],
                "latest_handshake": 1000.0 - 75,
                "rx_bytes": 2048,
                "tx_bytes": 3 * 1024 * 1024,
                "persistent_keepalive": 25,
                "preshared_key": True,
            }
        ],
    }
    text = format_status(status, now=1000.0)
    assert "interface: tm0" in text and "listening port: 51820" in text
    assert "peer: PEER=" in text and "endpoint: 192.0.2.7:51820" in text
    assert "latest handshake: 1 minute, 15 seconds ago" in text
    assert "transfer: 2.00 KiB received, 3.00 MiB sent" in text
    assert "persistent keepalive: every 25 seconds" in text
    assert "preshared key: (hidden)" in text
    assert "fwmark" not in text  # like `wg show`: only when set
    assert "  fwmark: 0xca6c\n" in format_status({**status, "fwmark": 51820}, now=1000.0)
    assert "loss" not in text  # only when something was lost
    assert "warm wake-ups" not in text  # a status from before they existed
    warm = {**status, "warm_tick": 0.001, "warm_period": 1.0}
    assert "  warm wake-ups: every 1 ms for 1 s after traffic\n" in format_status(warm, now=1000.0)
    low = format_status({**warm, "warm_tick": 0}, now=1000.0)
    assert "  warm wake-ups: off (low power)\n" in low
    peers: list[dict[str, object]] = status["peers"]  # type: ignore[assignment]
    lossy = {**peers[0], "rx_packets": 997, "rx_lost": 3}
    assert "  receive loss: 3 packets (0.3%)" in format_status({**status, "peers": [lossy]}, now=1000.0)


def _pub() -> str:
    return base64.b64encode(bytes(nacl.public.PrivateKey.generate().public_key)).decode()


def test_diff_sorts_peers_into_added_removed_changed_and_unchanged() -> None:
    """`dataplane reload`: peers match by public key; a field is changed only where the two files differ."""
    a, b, c, d = _pub(), _pub(), _pub(), _pub()
    old = wgquick.parse(
        conf("Address = 10.9.0.1/24\n")
        + f"[Peer]\nPublicKey = {a}\nAllowedIPs = 10.9.0.2/32\nEndpoint = 192.0.2.1:51820\n"
        + f"[Peer]\nPublicKey = {b}\nAllowedIPs = 10.9.0.3/32\n"
        + f"[Peer]\nPublicKey = {c}\nAllowedIPs = 10.9.0.4/32\nEndpoint = 192.0.2.4:51820\n"
    )
    new = wgquick.parse(
        conf("Address = 10.9.0.1/24\n")
        + f"[Peer]\nPublicKey = {a}\nAllowedIPs = 10.9.0.2/32\nEndpoint = 192.0.2.1:51820\n"
        + f"[Peer]\nPublicKey = {c}\nAllowedIPs = 10.9.0.4/32, 10.9.1.0/24\nPresharedKey = {PSK}\n"
        + "PersistentKeepalive = 25\n"
        + f"[Peer]\nPublicKey = {d}\nAllowedIPs = 10.9.0.5/32\n"
    )
    change = wgquick.diff(old, new)
    assert [base64.b64encode(p.public_key).decode() for p in change.added] == [d]
    assert [base64.b64encode(k).decode() for k in change.removed] == [b]
    ((peer, fields),) = change.changed
    assert base64.b64encode(peer.public_key).decode() == c
    # Endpoint gone from the file: kept, as `wg` never unsets one.
    assert fields == {"allowed_ips", "preshared_key", "persistent_keepalive"}
    assert change.unchanged == 1 and change.restart == ()
    assert wgquick.diff(new, new) == wgquick.ConfigChange(unchanged=3)


@pytest.mark.parametrize(
    ("body", "restart"),
    [
        ("Address = 10.9.0.9/24\n", ("Address",)),
        ("Address = 10.9.0.1/24\nListenPort = 51821\nMTU = 1380\n", ("ListenPort", "MTU")),
        ("Address = 10.9.0.1/24\nTable = off\n", ("Table",)),
        ("Address = 10.9.0.1/24\nDNS = 10.9.0.53\nPostUp = true\n", ("DNS", "PreUp/PostUp/PreDown/PostDown")),
    ],
)
def test_diff_names_interface_settings_that_need_a_restart(body: str, restart: tuple[str, ...]) -> None:
    old = wgquick.parse(conf("Address = 10.9.0.1/24\n"))
    assert wgquick.diff(old, wgquick.parse(conf(body))).restart == restart
    other_key = (
        f"[Interface]\nPrivateKey = {base64.b64encode(bytes(PEER_PRIV)).decode()}\nAddress = 10.9.0.1/24\n"
    )
    assert wgquick.diff(old, wgquick.parse(other_key)).restart == ("PrivateKey",)


def test_diff_resolves_endpoint_names_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload resolves host names anew: a peer behind dynamic DNS that moved gets its new address (what
    wireguard-tools' reresolve-dns.sh does); the same answer changes nothing."""
    answer = {"peer.example": "192.0.2.10"}

    def resolve(host: str, port: object, *args: object, **kwargs: object) -> object:
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", (answer[host], int(str(port))))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    text = conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = peer.example:51820\n")
    before = wgquick.parse(text)
    assert wgquick.diff(before, wgquick.parse(text)) == wgquick.ConfigChange(unchanged=1)
    answer["peer.example"] = "192.0.2.77"
    ((peer, fields),) = wgquick.diff(before, wgquick.parse(text)).changed
    assert fields == {"endpoint"} and peer.endpoint == ("192.0.2.77", 51820)


class _FlakyResolver:
    """``getaddrinfo`` that fails with ``error`` ``failures`` times, then answers 192.0.2.10."""

    def __init__(self, failures: int, error: int = socket.EAI_AGAIN) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self, host: str, port: object, *args: object, **kwargs: object) -> object:
        self.calls += 1
        if self.calls <= self.failures:
            raise socket.gaierror(self.error, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.10", int(str(port))))]


def _no_wait(seconds: float) -> None:
    raise AssertionError(f"waited {seconds} s: nothing should be retried here")


PEER_BY_NAME = conf(f"[Peer]\nPublicKey = {PUB}\nEndpoint = peer.example:51820\n")


def test_a_transient_resolution_failure_is_retried_with_growing_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """wg(8): a name server that does not answer yet (boot) is waited for; every retry is logged."""
    resolver, waits = _FlakyResolver(failures=3), list[float]()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    cfg = wgquick.parse(PEER_BY_NAME, source="tm0.conf", resolve_retries=15, sleep=waits.append)
    assert cfg.peers[0].endpoint == ("192.0.2.10", 51820)
    assert waits == pytest.approx([1.0, 1.2, 1.44])
    retries = [r.getMessage() for r in caplog.records if "endpoint_resolve_retry" in r.getMessage()]
    assert len(retries) == 3 and "where=tm0.conf:5 host=peer.example" in retries[0]
    assert "retry=3/15" in retries[2]


def test_waits_between_retries_stop_growing_at_20_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(socket, "getaddrinfo", _FlakyResolver(failures=30))
    wgquick.parse(PEER_BY_NAME, resolve_retries=None, sleep=waits.append)  # None: until it resolves
    assert len(waits) == 30 and max(waits) == 20.0 and waits[-1] == 20.0
    assert waits == sorted(waits)


def test_resolution_gives_up_after_its_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(socket, "getaddrinfo", _FlakyResolver(failures=10))
    with pytest.raises(ConfigError) as err:
        wgquick.parse(PEER_BY_NAME, source="tm0.conf", resolve_retries=2, sleep=waits.append)
    assert str(err.value) == (
        "tm0.conf:5: Endpoint host 'peer.example' does not resolve now: "
        "Temporary failure in name resolution; tried 3 times "
        "(WG_ENDPOINT_RESOLUTION_RETRIES sets how often `up` retries, or 'infinity')"
    )
    assert len(waits) == 2


def test_without_retries_a_transient_failure_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (and `reload`): no waiting."""
    resolver = _FlakyResolver(failures=1)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with pytest.raises(ConfigError, match=r"does not resolve now: Temporary failure in name resolution \("):
        wgquick.parse(PEER_BY_NAME, sleep=_no_wait)
    assert resolver.calls == 1


@pytest.mark.parametrize("error", [socket.EAI_NONAME, socket.EAI_FAIL, socket.EAI_NODATA])
def test_a_permanent_resolution_failure_is_not_retried(monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    resolver = _FlakyResolver(failures=1, error=error)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with pytest.raises(ConfigError, match=r"tm0\.conf:5: Endpoint host 'peer\.example' does not resolve: "):
        wgquick.parse(PEER_BY_NAME, source="tm0.conf", resolve_retries=15, sleep=_no_wait)
    assert resolver.calls == 1


@pytest.mark.parametrize(
    ("value", "retries"), [(None, 15), ("", 15), ("0", 0), ("3", 3), ("infinity", None), (" Infinity ", None)]
)
def test_resolution_retries_come_from_wg_s_variable(value: str | None, retries: int | None) -> None:
    env = {} if value is None else {"WG_ENDPOINT_RESOLUTION_RETRIES": value}
    assert wgquick.resolution_retries(env) == retries


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_a_bad_resolution_retries_value_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=f"WG_ENDPOINT_RESOLUTION_RETRIES='{value}': expected a number"):
        wgquick.resolution_retries({"WG_ENDPOINT_RESOLUTION_RETRIES": value})
