"""wg-quick's policy routing for a full tunnel (a peer with ``AllowedIPs = 0.0.0.0/0`` or ``::/0``), in the
calling thread's network namespace, through netlink (pyroute2).

Packets without the tunnel's fwmark look up table T (= the fwmark: ``FwMark``, or 51820 and up), whose
default route is the TUN device, after the main table has answered for anything more specific than its own
default route (``suppress_prefixlength 0``); the tunnel's own UDP carries the mark, so it skips table T and
leaves by the main table. ``DataPlane._sync_full_tunnel`` decides when; this module does the netlink work and
undoes exactly what it did (rules by priority and attributes: another interface's rules stay).

With them, wg-quick's nftables table ``tunnelmesh-<iface>`` (``nft -f``, one per interface and family): the
tunnel's UDP gets its mark saved in conntrack, the peer's replies get it back, so that strict reverse-path
filtering (``src_valid_mark``) checks them against the main table; and packets for the tunnel's addresses
must come in through the tunnel.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import re
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tunnelmesh.node.errors import DataplaneError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

FAMILY: Final = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT_DST: Final = {4: "0.0.0.0/0", 6: "::/0"}
FULL_TUNNEL_TABLE: Final = 51820  # wg-quick's fwmark and table when ``FwMark`` is unset (the first free one)
_MAIN_TABLE: Final = 254
_IPV4_CONF: Final = "/proc/sys/net/ipv4/conf"
_FIB_RULE_INVERT: Final = 0x2  # include/uapi/linux/fib_rules.h: "not fwmark ..."
_MAIN_RULE_PREF: Final = 32766  # `from all lookup main`; new rules go just before the first rule after 0
_NFT_FAMILY: Final = {4: "ip", 6: "ip6"}
_NFT_TIMEOUT: Final = 3.0  # seconds; below DataPlane's THREAD_JOIN, which bounds a call in the namespace
_NFT_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")  # what nft takes unquoted (it takes no quoted table name)


def free_table() -> int:
    """The fwmark/table for a full tunnel whose ``FwMark`` is unset: 51820, or the next table with no routes
    in either family (as wg-quick picks it; a second full-tunnel interface gets 51821)."""
    from pyroute2 import IPRoute

    table = FULL_TUNNEL_TABLE
    with IPRoute() as ipr:
        while any(list(ipr.get_routes(family=af, table=table)) for af in FAMILY.values()):
            table += 1
    return table


def full_tunnel_up(name: str, version: int, table: int) -> tuple[int, int]:
    """In the interface's namespace: ``default dev <name> table T``, then the rules ``table main
    suppress_prefixlength 0`` and ``not fwmark T table T`` (in that order: each step alone is harmless) just
    before the namespace's first rule, as the kernel would place them for ``ip rule add``. Returns the two
    rules' priorities, by which they are removed (another interface's identical rules are not ours). Leftover
    rules of table T (a killed process) are removed first, so a restart does not stack them."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    af = FAMILY[version]
    added: list[int] = []
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise DataplaneError(f"{name}: interface gone")
            for rule in list(ipr.get_rules(family=af)):
                pref = rule.get("priority") or 0
                if _is_fwmark_rule(rule, table):
                    log.warning("event=stale_rule_removed iface=%s table=%d pref=%d", name, table, pref)
                    _del_rules(ipr, af, table, (pref - 1, pref))
            if version == 4:
                with open(f"{_IPV4_CONF}/all/src_valid_mark", "w") as f:  # this thread's namespace
                    f.write("1")
            ipr.route("replace", dst=_DEFAULT_DST[version], oif=found[0], table=table, family=af)
            first = min(
                (p for r in ipr.get_rules(family=af) if (p := r.get("priority") or 0) > 0),
                default=_MAIN_RULE_PREF,
            )
            if first < 3:
                raise DataplaneError(f"{name}: no free rule priority below {first}")
            suppress, fwmark = first - 2, first - 1
            ipr.rule("add", family=af, table=_MAIN_TABLE, suppress_prefixlen=0, priority=suppress)
            added.append(suppress)
            ipr.rule("add", family=af, table=table, fwmark=table, flags=_FIB_RULE_INVERT, priority=fwmark)
            return suppress, fwmark
    except Exception as exc:
        with contextlib.suppress(Exception):  # leave nothing half-done; the error below says what failed
            full_tunnel_down(name, version, table, (added[0] if added else 0, 0))
        if isinstance(exc, NetlinkError):
            raise DataplaneError(f"{name}: full-tunnel routing for IPv{version} failed: {exc}") from exc
        raise


def full_tunnel_down(name: str, version: int, table: int, prefs: tuple[int, int]) -> None:
    """Undo ``full_tunnel_up``: its two rules (by priority) and its default route in table T; anything else
    in table T stays. Already gone is fine."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    af = FAMILY[version]
    with IPRoute() as ipr:
        _del_rules(ipr, af, table, prefs)
        found = ipr.link_lookup(ifname=name)
        if found:
            try:
                ipr.route("del", dst=_DEFAULT_DST[version], oif=found[0], table=table, family=af)
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise DataplaneError(
                        f"{name}: removing the default route of table {table}: {exc}"
                    ) from exc


def nft_table(name: str) -> str:
    """The nftables table of interface ``name`` (family ip and/or ip6); wg-quick's is ``wg-quick-<name>``."""
    if not _NFT_NAME.fullmatch(name):
        raise DataplaneError(
            f"{name}: nftables takes only letters, digits, '_', '.' and '-' in a table name; rename the "
            "interface to get the full tunnel's nftables rules"
        )
    return f"tunnelmesh-{name}"


def firewall_up(name: str, version: int, mark: int, addresses: Sequence[str]) -> None:
    """In the interface's namespace, wg-quick's nftables rules for a full tunnel of this family, replacing a
    leftover table of the same name (a killed process) in the same transaction:

    * preraw: a packet for one of the tunnel's ``addresses`` that came in on another interface, from a
      source that is not local, is dropped (anti-spoofing);
    * postmangle: the tunnel's UDP (marked ``mark``) saves its mark in its conntrack entry;
    * premangle: UDP packets get their conntrack mark back, so the peer's replies carry ``mark`` and the
      reverse-path check (``src_valid_mark``) routes their source by the main table, not the tunnel.
    """
    family, table = _NFT_FAMILY[version], nft_table(name)
    daddrs = [str(ip.ip) for a in addresses if (ip := ipaddress.ip_interface(a)).version == version]
    preraw = "".join(
        f'    iifname != "{name}" {family} daddr {a} fib saddr type != local drop\n' for a in daddrs
    )
    _nft(
        f"{_nft_gone(family, table)}"
        f"table {family} {table} {{\n"
        "  chain preraw {\n    type filter hook prerouting priority raw; policy accept;\n"
        f"{preraw}  }}\n"
        "  chain premangle {\n    type filter hook prerouting priority mangle; policy accept;\n"
        "    meta l4proto udp meta mark set ct mark\n  }\n"
        "  chain postmangle {\n    type filter hook postrouting priority mangle; policy accept;\n"
        f"    meta l4proto udp meta mark {mark} ct mark set meta mark\n  }}\n"
        "}\n"
    )


def firewall_down(name: str, version: int) -> None:
    """Remove ``firewall_up``'s table of this family; already gone is fine."""
    _nft(_nft_gone(_NFT_FAMILY[version], nft_table(name)))


def warn_strict_rp_filter(name: str) -> None:
    """Log the interfaces whose strict reverse-path filtering drops the peer's packets without
    ``firewall_up``'s rules (their source routes through the tunnel)."""
    if strict := _strict_rp_filter(name):
        log.warning(
            "event=rp_filter_strict iface=%s interfaces=%s reason=%r",
            name,
            ",".join(strict),
            "without the nftables rules strict reverse-path filtering drops the peer's packets (their source "
            "routes through the tunnel): install nft, or set net.ipv4.conf.{all,IFACE}.rp_filter=2 (loose)",
        )


def _nft_gone(family: str, table: str) -> str:
    """nft commands that delete ``table`` whether or not it exists (this nft may not have ``destroy``)."""
    return f"table {family} {table} {{}}\ndelete table {family} {table}\n"


def _nft(script: str) -> None:
    """Run ``nft -f -`` on ``script`` (one transaction: all of it or nothing) in this thread's namespace."""
    try:
        done = subprocess.run(
            ["nft", "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=_NFT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise DataplaneError(
            "nft not found: install the nftables package for the full tunnel's rules"
        ) from None
    except subprocess.TimeoutExpired:
        raise DataplaneError(f"nft did not finish within {_NFT_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise DataplaneError(f"nft failed (exit {done.returncode}): {done.stderr.strip()}")


def _strict_rp_filter(tunnel: str) -> list[str]:
    """Interfaces (other than ``tunnel``) whose effective rp_filter, max(all, own), is 1: strict."""
    conf = Path(_IPV4_CONF)
    strict = []
    try:
        everywhere = int((conf / "all" / "rp_filter").read_text())
        for d in sorted(conf.iterdir()):
            skip = d.name in ("all", "default", "lo", tunnel)
            if not skip and max(everywhere, int((d / "rp_filter").read_text())) == 1:
                strict.append(d.name)
    except (OSError, ValueError):  # an interface that went away meanwhile; this is only advice
        pass
    return strict


def _del_rules(ipr: IPRoute, af: int, table: int, prefs: tuple[int, int]) -> None:
    """Delete our ``suppress_prefixlength 0`` rule at ``prefs[0]`` and ``not fwmark`` rule at ``prefs[1]``
    (0: none); the kernel deletes only a rule matching every attribute given."""
    from pyroute2.netlink.exceptions import NetlinkError

    suppress, fwmark = prefs
    for pref, attrs in (
        (fwmark, {"table": table, "fwmark": table, "flags": _FIB_RULE_INVERT}),
        (suppress, {"table": _MAIN_TABLE, "suppress_prefixlen": 0}),
    ):
        if pref <= 0:
            continue
        try:
            ipr.rule("del", family=af, priority=pref, **attrs)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise DataplaneError(f"removing rule {pref} (table {table}): {exc}") from exc


def _is_fwmark_rule(rule: Any, table: int) -> bool:
    """``not fwmark T lookup T``: the rule a full tunnel with table T adds (wg-quick's too)."""
    return bool(
        rule.get("table") == table and rule.get("fwmark") == table and rule["flags"] & _FIB_RULE_INVERT
    )
