"""Faults that can be switched on and off while a lab runs: partitions and UDP blocking.

(Loss is a setting rather than a handle: see `Lab.set_loss`.) All faults are enforced in the lab's switch
namespace, on the bridge ports of the nodes involved, so nothing a test runs inside a node (including its own
nftables rules) can disturb or see them.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Self

from tunnelmesh.netlab import nft
from tunnelmesh.netlab.errors import NetlabError
from tunnelmesh.netlab.topology import Lan, Node, Router

if TYPE_CHECKING:
    from tunnelmesh.netlab.lab import Lab


class Fault:
    """An active fault. `remove()` (or leaving its `with` block) ends it."""

    def __init__(self, lab: Lab, description: str):
        self.lab = lab
        self.description = description
        self.active = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description} {'active' if self.active else 'removed'}>"

    def rules(self) -> list[str]:
        raise NotImplementedError

    def remove(self) -> None:
        """End the fault (idempotent)."""
        self.lab._remove_fault(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def nat_fronts(node: Node) -> list[Router]:
    """The NAT routers that stand between `node` and the rest of the lab (nearest first)."""
    fronts: list[Router] = []
    seen: set[int] = {id(node)}
    pending = [iface.lan for iface in node.interfaces]
    while pending:
        gateway = pending.pop(0).gateway
        if gateway is None or id(gateway) in seen:
            continue
        seen.add(id(gateway))
        if gateway.nat is not None:
            fronts.append(gateway)
        if gateway.wan is not None:
            pending.append(gateway.wan)
    return fronts


class Partition(Fault):
    """Two groups of nodes that cannot exchange IP packets (any protocol, both directions).

    Enforced at each member's own links: a packet leaving a member of one side towards an address of the
    other side is dropped. A node behind NAT is addressed from outside by its NAT's WAN address, so that
    address counts as the node's too (unless the NAT router is itself in the other group, which already
    stops the traffic). Consequence: while a host behind a NAT is partitioned from X, X cannot reach the
    other hosts behind that NAT either. A router in a group drops what it forwards towards the other side.
    """

    def __init__(self, lab: Lab, side_a: list[Node], side_b: list[Node] | None):
        names_b = "everyone else" if side_b is None else ",".join(n.name for n in side_b)
        super().__init__(lab, f"{','.join(n.name for n in side_a)} | {names_b}")
        self.side_a = side_a
        self._side_b = side_b

    @property
    def side_b(self) -> list[Node]:
        """The other side; "everyone else" is evaluated now, so it includes nodes added later."""
        if self._side_b is not None:
            return self._side_b
        ids = {id(n) for n in self.side_a}
        return [n for n in self.lab.nodes if id(n) not in ids]

    heal = Fault.remove

    def rules(self) -> list[str]:
        side_b = self.side_b
        rules = []
        for here, there in ((self.side_a, side_b), (side_b, self.side_a)):
            for node in here:
                addrs = _addresses_seen_from(node, there)
                for iface in node.interfaces:
                    if addrs:
                        rules.append(nft.drop_to(iface.port, addrs, f"partition {self.description}"))
        return rules


def _addresses_seen_from(viewer: Node, group: Iterable[Node]) -> set[str]:
    group = list(group)
    group_ids = {id(n) for n in group}
    viewer_fronts = {id(r) for r in nat_fronts(viewer)}
    addrs: set[str] = set()
    for node in group:
        addrs.update(node.ips)
        for router in nat_fronts(node):
            # A NAT both sides sit behind is not on the path between them; a NAT in the group drops by itself.
            if id(router) not in viewer_fronts and id(router) not in group_ids:
                addrs.add(router.wan_ip)
    return addrs


class UdpBlock(Fault):
    """A firewall that drops all UDP to and from `target` (TCP and ICMP pass).

    A host: UDP is dropped on all its links. A router, or a LAN with a router: on the router's WAN link, so
    the network behind it keeps UDP inside but cannot use UDP with the outside.
    """

    def __init__(self, lab: Lab, target: Node | Lan):
        super().__init__(lab, f"udp blocked for {target.name}")
        self.target = target

    def ports(self) -> list[str]:
        target = self.target
        if isinstance(target, Lan):
            if target.gateway is None:
                raise NetlabError(f"LAN {target.name} has no router to block UDP at; block its hosts instead")
            target = target.gateway
        if isinstance(target, Router) and target.wan is not None:
            return [target.interface_on(target.wan).port]
        return [iface.port for iface in target.interfaces]

    def rules(self) -> list[str]:
        return [rule for port in self.ports() for rule in nft.drop_udp(port, self.description)]
