"""nftables rulesets netlab installs: faults on the switch's bridges and NAT on routers.

Everything here renders text for `nft -f`; each ruleset is replaced as a whole in one transaction
(`add table` + `delete table` + the new table), so a change is atomic and never leaves half a ruleset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from tunnelmesh.netlab.commands import run_tool
from tunnelmesh.netlab.errors import NetlabError
from tunnelmesh.netlab.namespace import entered

NatMode = Literal["eim", "symmetric"]
Direction = Literal["egress", "ingress"]

FAULT_TABLE = "netlab_faults"
NAT_TABLE = "netlab_nat"
# `numgen random mod LOSS_SCALE < n`: loss is settable in steps of 0.01 %.
LOSS_SCALE = 10_000


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def _ruleset(family: str, table: str, body: str) -> str:
    # `add` then `delete` makes the delete valid whether or not the table exists; all three lines are one
    # transaction, so packets never see the table missing.
    return f"add table {family} {table}\ndelete table {family} {table}\ntable {family} {table} {{\n{body}}}\n"


def render_faults(rules: Sequence[str]) -> str:
    """The switch namespace's fault table: `rules` run in the bridge forward hook, which sees every frame
    crossing a LAN. A frame leaves node X's link when `iifname` is X's switch port, enters it on `oifname`."""
    lines = "".join(f"        {rule}\n" for rule in rules)
    body = (
        f"    chain forward {{\n        type filter hook forward priority 0; policy accept;\n{lines}    }}\n"
    )
    return _ruleset("bridge", FAULT_TABLE, body)


def drop_to(port: str, addresses: Iterable[str], comment: str) -> str:
    """Drop IPv4 packets leaving through `port` towards any of `addresses`."""
    addrs = ", ".join(sorted(addresses))
    return f"iifname {_quote(port)} ip daddr {{ {addrs} }} drop comment {_quote(comment)}"


def drop_udp(port: str, comment: str) -> list[str]:
    """Drop UDP both leaving and entering through `port`."""
    return [
        f"iifname {_quote(port)} meta l4proto udp drop comment {_quote(comment)}",
        f"oifname {_quote(port)} meta l4proto udp drop comment {_quote(comment)}",
    ]


def random_loss(port: str, direction: Direction, percent: float, comment: str) -> str:
    """Drop `percent` % of IP packets leaving (egress) or entering (ingress) a node through `port`.

    ARP is exempt: lost ARP would add unpredictable extra loss on top of the nominal rate.
    """
    threshold = round(percent * LOSS_SCALE / 100)
    match = "iifname" if direction == "egress" else "oifname"
    # nft rejects `< LOSS_SCALE` (out of numgen's range 0..LOSS_SCALE-1): 100 % is a plain drop.
    draw = f"numgen random mod {LOSS_SCALE} < {threshold} " if threshold < LOSS_SCALE else ""
    return f"{match} {_quote(port)} ether type ip {draw}drop comment {_quote(comment)}"


def render_nat(wan_if: str, mode: NatMode) -> str:
    """A home-router style NAT: masquerade out of `wan_if` and drop unsolicited packets coming in on it
    (forwarded ones, and TCP/UDP to the router itself; it still answers ping).

    * ``eim``: plain `masquerade`. Linux keeps the source port when it is free, and otherwise picks one and
      reuses that mapping for the socket's later destinations (NAT looks up existing mappings of the same
      source first), so one internal socket keeps one external ip:port whatever the destination
      (endpoint-independent mapping) while any of its conntrack entries lives. Inbound is filtered per
      remote address and port by conntrack (a "port-restricted cone").
    * ``symmetric``: `masquerade random`: every new conntrack entry (every new destination) gets a freshly
      randomised external port (address-and-port-dependent mapping).
    """
    flags = " random" if mode == "symmetric" else ""
    wan = _quote(wan_if)
    body = (
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f"        oifname {wan} masquerade{flags}\n"
        "    }\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy accept;\n"
        f"        iifname {wan} ct state established,related accept\n"
        f"        iifname {wan} ct status dnat accept\n"
        f"        iifname {wan} drop\n"
        "    }\n"
        # Unsolicited TCP/UDP to the router itself is dropped here, before conntrack confirms an entry for
        # it. Otherwise a peer's early hole-punch packet would leave an entry that holds the external
        # ip:port pair the LAN host's own outgoing punch needs, and the NAT would remap that to a new port.
        "    chain input {\n"
        "        type filter hook input priority filter; policy accept;\n"
        f"        iifname {wan} ct state new meta l4proto {{ tcp, udp }} drop\n"
        "    }\n"
    )
    return _ruleset("ip", NAT_TABLE, body)


def apply(netns: str, ruleset: str) -> None:
    """Load `ruleset` into namespace `netns` (nft runs as a child of a thread that entered it)."""
    try:
        with entered(netns):
            run_tool(["nft", "-f", "-"], input=ruleset)
    except NetlabError as exc:
        raise NetlabError(f"loading nftables rules into namespace {netns}: {exc}") from exc
