"""`Lab`: builds a virtual network out of network namespaces and takes it down again.

Theory of operation. A lab with id `abc123` owns namespaces `tmabc123-<node>` (one per host or router) and
`tmabc123_sw`, its switch: every LAN is a bridge in the switch, and every node interface is one end of a
veth pair whose other end is a port of that bridge. The root namespace is never touched. Faults (loss,
partitions, UDP blocks) are one nftables table in the switch, rebuilt atomically from the lab's state on each
change. Routers are nodes with forwarding on and, optionally, an nftables NAT table.

Before creating anything the lab records its owner in /run/tunnelmesh-netlab/<id>.json (see cleanup.py), so
a crashed owner's lab can be removed by `clean_leftovers()` / `tunnelmesh netlab clean`. A lab is removed by
`close()`, by leaving its `with` block, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

from tunnelmesh.netlab import cleanup, namespace, nft
from tunnelmesh.netlab.commands import ip_batch, run_tool
from tunnelmesh.netlab.errors import NetlabError
from tunnelmesh.netlab.faults import Fault, Partition, UdpBlock
from tunnelmesh.netlab.nft import NatMode
from tunnelmesh.netlab.process import Argv, Process, normalize_argv
from tunnelmesh.netlab.topology import Host, Interface, Lan, Node, Route, Router

log = logging.getLogger(__name__)

LossDirection = Literal["egress", "ingress", "both"]
_F = TypeVar("_F", bound=Fault)

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
_IFNAMSIZ = 15  # usable characters in a Linux interface name
_STOP_GRACE = 3.0  # seconds processes get after SIGTERM when the lab closes


class Lab:
    """A virtual network of hosts, LANs and routers built from network namespaces.

    Use it as a context manager::

        with Lab() as lab:
            inet = lab.lan("inet", "198.18.0.0/24")
            office = lab.lan("office", "10.10.1.0/24")
            a = lab.host("a", office)
            s = lab.host("s", inet)
            lab.router("r1", wan=inet, lan=office, nat="eim")
            a.run(["ping", "-c1", s.ip])

    `log_dir`: where spawned processes' logs go. By default a temporary directory that is removed when the
    lab closes cleanly and kept (its path is logged) when the `with` block exits with an exception.
    `clean_stale`: first remove leftovers of labs whose owner died.
    """

    def __init__(self, *, log_dir: str | Path | None = None, clean_stale: bool = True):
        if os.geteuid() != 0:
            raise NetlabError(
                "netlab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces"
            )
        if clean_stale:
            try:
                cleanup.clean_leftovers()
            except NetlabError as exc:
                log.warning("event=netlab_stale_cleanup_failed error=%s", exc)
        self._owns_log_dir = log_dir is None
        if log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="tunnelmesh-netlab-"))
        else:
            self.log_dir = Path(log_dir)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.id = cleanup.reserve_lab(self.log_dir, self._owns_log_dir)
        except BaseException:
            if self._owns_log_dir:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            raise
        self.prefix = f"tm{self.id}"
        self.switch_netns = f"{self.prefix}_sw"
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()
        self._closed = False
        self._nodes: dict[str, Node] = {}
        self._lans: dict[str, Lan] = {}
        self._port_seq = 0
        self._loss: dict[tuple[str, nft.Direction], tuple[float, str]] = {}
        self._faults: list[Fault] = []
        self._processes: list[Process] = []
        atexit.register(self._close_at_exit)
        try:
            namespace.create(self.switch_netns)
            with namespace.entered(self.switch_netns):
                # If br_netfilter is loaded, bridged frames would also cross the switch's IP hooks; keep the
                # switch a plain switch.
                for key in (
                    "bridge-nf-call-iptables",
                    "bridge-nf-call-ip6tables",
                    "bridge-nf-call-arptables",
                ):
                    if Path(f"/proc/sys/net/bridge/{key}").exists():
                        namespace.write_sysctl(f"net.bridge.{key}", "0")
            self._apply_faults()
        except BaseException:
            self.close()
            raise
        log.info("event=netlab_lab_created lab=%s pid=%d log_dir=%s", self.id, self._owner_pid, self.log_dir)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Lab {self.id} nodes={len(self._nodes)} lans={len(self._lans)}{state}>"

    # -- building ---------------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    @property
    def lans(self) -> list[Lan]:
        return list(self._lans.values())

    def node(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise NetlabError(f"lab {self.id} has no node {name!r}") from None

    def lan(self, name: str, subnet: str, *, mtu: int = 1500) -> Lan:
        """A new LAN segment (a bridge in the switch) with IPv4 `subnet`, e.g. "10.10.1.0/24"."""
        with self._lock:
            self._check_open()
            self._check_name(name, self._lans, "LAN")
            try:
                net = ipaddress.IPv4Network(subnet)
            except ValueError as exc:
                raise NetlabError(
                    f"LAN {name}: {subnet!r} is not an IPv4 subnet like 10.10.1.0/24 ({exc})"
                ) from exc
            if net.prefixlen > 29:
                raise NetlabError(f"LAN {name}: {subnet} is too small (use /29 or larger)")
            for other in self._lans.values():
                if net.overlaps(other.subnet):
                    raise NetlabError(f"LAN {name}: {subnet} overlaps LAN {other.name} ({other.subnet})")
            bridge = _short(f"br{len(self._lans)}-{name}")
            run_tool(
                ["ip", "-n", self.switch_netns, "link", "add", bridge, "mtu", str(mtu), "type", "bridge"]
            )
            run_tool(["ip", "-n", self.switch_netns, "link", "set", bridge, "up"])
            lan = Lan(name=name, subnet=net, bridge=bridge, mtu=mtu)
            self._lans[name] = lan
            log.info("event=netlab_lan_created lab=%s lan=%s subnet=%s bridge=%s", self.id, name, net, bridge)
            return lan

    def host(self, name: str, lan: Lan | None = None, *, ip: str | None = None) -> Host:
        """A new host, attached to `lan` (next free address unless `ip` is given) with the LAN's router, if
        it has one now or gets one later, as its default gateway."""
        with self._lock:
            self._check_open()
            self._check_name(name, self._nodes, "node")
            addr = lan.allocate(ip) if lan is not None else None  # bad input fails before anything exists
            host = Host(self, name, f"{self.prefix}-{name}")
            with self._undo_on_error(host, [(lan, addr)] if lan is not None and addr is not None else ()):
                if lan is not None and addr is not None:
                    self._attach(host, lan, addr, "eth0")
                self._refresh_faults_for_new_links()
            log.info(
                "event=netlab_host_created lab=%s host=%s ips=%s", self.id, name, ",".join(host.ips) or "-"
            )
            return host

    def attach(self, node: Node, lan: Lan, *, ip: str | None = None) -> Interface:
        """Give `node` one more interface, on `lan` (a host on two LANs, say)."""
        with self._lock:
            self._check_open()
            self._check_member(node)
            if any(iface.lan is lan for iface in node.interfaces):
                raise NetlabError(f"{node.kind} {node.name} is already on LAN {lan.name}")
            addr = lan.allocate(ip)
            try:
                iface = self._attach(node, lan, addr, f"eth{len(node.interfaces)}")
            except BaseException:
                lan.release(addr)
                raise
            self._refresh_faults_for_new_links()
            return iface

    def router(
        self,
        name: str,
        *,
        wan: Lan,
        lan: Lan,
        nat: NatMode | None = "eim",
        wan_ip: str | None = None,
    ) -> Router:
        """A router between `wan` and `lan`; it becomes `lan`'s gateway (at `lan.gateway_ip`).

        `nat`: "eim" (endpoint-independent mapping: one internal socket keeps one external ip:port whatever
        the destination), "symmetric" (a new external port for every destination) or None (plain routing:
        the LAN's subnet is announced to the WAN's nodes, and onwards through further non-NAT routers).
        NAT routers drop unsolicited inbound packets, like a home router.
        """
        with self._lock:
            self._check_open()
            if nat not in ("eim", "symmetric", None):
                raise NetlabError(f"router {name}: nat must be 'eim', 'symmetric' or None, not {nat!r}")
            if wan is lan:
                raise NetlabError(f"router {name}: WAN and LAN must be different LANs")
            if lan.gateway is not None:
                raise NetlabError(f"router {name}: LAN {lan.name} already has router {lan.gateway.name}")
            self._check_name(name, self._nodes, "node")
            wan_addr = wan.allocate(wan_ip)
            try:
                lan_addr = lan.allocate(None, for_gateway=True)
            except NetlabError:
                wan.release(wan_addr)
                raise
            router = Router(self, name, f"{self.prefix}-{name}", nat)
            router.wan, router.lan = wan, lan
            with self._undo_on_error(router, [(wan, wan_addr), (lan, lan_addr)]):
                with namespace.entered(router.netns):
                    namespace.write_sysctl("net.ipv4.ip_forward", "1")
                self._attach(router, wan, wan_addr, "wan0")
                self._attach(router, lan, lan_addr, "lan0")
                if nat is not None:
                    # Before the LAN's hosts route through it: no packet leaves un-NATed.
                    nft.apply(router.netns, nft.render_nat("wan0", nat))
                lan.gateway = router
                for iface in lan.interfaces:
                    if iface.node is not router and not iface.node.has_default_route:
                        self._add_default_route(iface.node, lan.gateway_ip)
                if nat is None:
                    for subnet in [lan.subnet, *(route.subnet for route in lan.routes)]:
                        self._announce(wan, subnet, router.wan_ip, router, depth=0)
                self._refresh_faults_for_new_links()
            log.info(
                "event=netlab_router_created lab=%s router=%s wan=%s wan_ip=%s lan=%s lan_ip=%s nat=%s",
                self.id,
                name,
                wan.name,
                router.wan_ip,
                lan.name,
                router.lan_ip,
                nat or "none",
            )
            return router

    @contextlib.contextmanager
    def _undo_on_error(self, node: Node, addresses: Sequence[tuple[Lan, str]] = ()) -> Iterator[None]:
        """Create `node`'s namespace and register it; if the block fails, remove every trace of it."""
        try:
            namespace.create(node.netns)
            self._nodes[node.name] = node
            yield
        except BaseException:
            self._nodes.pop(node.name, None)
            for iface in node.interfaces:
                iface.lan.interfaces.remove(iface)
            for lan, addr in addresses or [(iface.lan, iface.ip) for iface in node.interfaces]:
                lan.release(addr)
            for lan in self._lans.values():
                lan.routes = [route for route in lan.routes if route.owner is not node]
                if lan.gateway is node:
                    lan.gateway = None
            # Deleting the namespace also deletes its veths, and with them their ports on the switch.
            with contextlib.suppress(NetlabError):
                namespace.delete([node.netns])
            raise

    def _attach(self, node: Node, lan: Lan, addr: str, ifname: str) -> Interface:
        """Wire `node` to `lan` as `ifname` with address `addr` (already allocated on `lan`)."""
        self._port_seq += 1
        port = _short(f"p{self._port_seq}-{node.name}")
        mtu = lan.mtu
        try:
            ip_batch(
                self.switch_netns,
                [
                    f"link add {port} mtu {mtu} type veth peer name {ifname} netns {node.netns} mtu {mtu}",
                    f"link set {port} master {lan.bridge}",
                    f"link set {port} up",
                ],
            )
            ip_batch(
                node.netns, [f"addr add {addr}/{lan.subnet.prefixlen} dev {ifname}", f"link set {ifname} up"]
            )
        except NetlabError:
            run_tool(["ip", "-n", self.switch_netns, "link", "delete", port], check=False)
            raise
        iface = Interface(node=node, lan=lan, ifname=ifname, port=port, ip=addr)
        node.interfaces.append(iface)
        lan.interfaces.append(iface)
        if lan.gateway is not None and lan.gateway is not node and not node.has_default_route:
            self._add_default_route(node, lan.gateway_ip)
        for route in lan.routes:
            if route.owner is not node:
                run_tool(["ip", "-n", node.netns, "route", "replace", str(route.subnet), "via", route.via])
        log.debug(
            "event=netlab_interface_added lab=%s node=%s ifname=%s port=%s ip=%s lan=%s",
            self.id,
            node.name,
            ifname,
            port,
            addr,
            lan.name,
        )
        return iface

    def _add_default_route(self, node: Node, via: str) -> None:
        run_tool(["ip", "-n", node.netns, "route", "add", "default", "via", via])
        node.has_default_route = True

    def _announce(self, lan: Lan, subnet: ipaddress.IPv4Network, via: str, owner: Router, depth: int) -> None:
        """Make `subnet` reachable via `via` for the nodes of `lan`, and onwards past non-NAT routers."""
        if depth > len(self._lans):  # a loop of routers; every LAN has been visited
            return
        lan.routes.append(Route(subnet=subnet, via=via, owner=owner))
        for iface in lan.interfaces:
            if iface.node is not owner:
                run_tool(["ip", "-n", iface.node.netns, "route", "replace", str(subnet), "via", via])
        upstream = lan.gateway
        if (
            upstream is not None
            and upstream is not owner
            and upstream.nat is None
            and upstream.wan is not None
        ):
            self._announce(upstream.wan, subnet, upstream.wan_ip, upstream, depth + 1)

    # -- faults -----------------------------------------------------------------------------------------

    def set_loss(
        self, node: Node, percent: float, direction: LossDirection = "both", *, lan: Lan | None = None
    ) -> None:
        """Drop `percent` % of the IP packets on `node`'s links (only its link to `lan` if given), in the
        given direction: "egress" (sent by the node), "ingress" (to the node) or "both" (independently).

        Takes effect at once; `percent=0` removes the loss. Each direction is an independent random drop,
        so a packet crossing two lossy links is dropped with the combined probability. ARP is never dropped.
        """
        if not 0 <= percent <= 100:
            raise NetlabError(f"loss for {node.name} must be between 0 and 100 %, not {percent}")
        if direction not in ("egress", "ingress", "both"):
            raise NetlabError(f"loss direction must be 'egress', 'ingress' or 'both', not {direction!r}")
        directions: list[nft.Direction] = ["egress", "ingress"] if direction == "both" else [direction]
        with self._lock:
            self._check_open()
            ifaces = [node.interface_on(lan)] if lan is not None else node.interfaces
            for iface in ifaces:
                for d in directions:
                    if percent == 0:
                        self._loss.pop((iface.port, d), None)
                    else:
                        self._loss[(iface.port, d)] = (
                            percent,
                            f"loss {percent:g}% {d} {node.name}/{iface.ifname}",
                        )
            self._apply_faults()
        log.info(
            "event=netlab_loss_set lab=%s node=%s percent=%g direction=%s lan=%s",
            self.id,
            node.name,
            percent,
            direction,
            lan.name if lan else "all",
        )

    def partition(self, side_a: Iterable[Node], side_b: Iterable[Node] | None = None) -> Partition:
        """Cut all IP traffic, both ways, between `side_a` and `side_b` (default: every other node).

        Returns a handle: `heal()` it, or use it as a context manager. See `Partition` for how NAT is handled.
        """
        group_a = list(side_a)
        group_b = None if side_b is None else list(side_b)
        if not group_a or (group_b is not None and not group_b):
            raise NetlabError("a partition needs at least one node on each side")
        if group_b is not None and {id(n) for n in group_a} & {id(n) for n in group_b}:
            raise NetlabError("a node cannot be on both sides of a partition")
        for node in [*group_a, *(group_b or [])]:
            self._check_member(node)
        return self._add_fault(Partition(self, group_a, group_b))

    def block_udp(self, target: Node | Lan) -> UdpBlock:
        """A firewall dropping all UDP to and from `target`: a host, or a router / a LAN with a router (then
        only at the router's WAN link: UDP inside the LAN still works). TCP and ICMP pass.

        Returns a handle: `remove()` it, or use it as a context manager.
        """
        if isinstance(target, Node):
            self._check_member(target)
        return self._add_fault(UdpBlock(self, target))

    def clear_faults(self) -> None:
        """End every partition and UDP block and remove all loss: the network as built."""
        with self._lock:
            self._check_open()
            for fault in self._faults:
                fault.active = False
            self._faults.clear()
            self._loss.clear()
            self._apply_faults()
        log.info("event=netlab_faults_cleared lab=%s", self.id)

    @property
    def faults(self) -> list[Fault]:
        """Partitions and UDP blocks in force."""
        return list(self._faults)

    def _check_member(self, node: Node) -> None:
        if self._nodes.get(node.name) is not node:
            raise NetlabError(f"{node.kind} {node.name} does not belong to lab {self.id}")

    def _add_fault(self, fault: _F) -> _F:
        with self._lock:
            self._check_open()
            fault.rules()  # validates the target before anything changes
            self._faults.append(fault)
            try:
                self._apply_faults()
            except NetlabError:
                self._faults.remove(fault)
                raise
        log.info(
            "event=netlab_fault_added lab=%s fault=%s detail=%r",
            self.id,
            type(fault).__name__.lower(),
            fault.description,
        )
        return fault

    def _remove_fault(self, fault: Fault) -> None:
        with self._lock:
            if not fault.active:
                return
            fault.active = False
            if fault in self._faults:
                self._faults.remove(fault)
            if not self._closed:
                self._apply_faults()
        log.info(
            "event=netlab_fault_removed lab=%s fault=%s detail=%r",
            self.id,
            type(fault).__name__.lower(),
            fault.description,
        )

    def _refresh_faults_for_new_links(self) -> None:
        # Faults are computed from the topology: a partition against "everyone else", or a UDP block on a
        # LAN, must also cover nodes and links added after it started.
        if self._faults:
            self._apply_faults()

    def _apply_faults(self) -> None:
        # Partitions and blocks first, loss last: the loss rate applies to traffic that is allowed at all.
        rules = [rule for fault in self._faults for rule in fault.rules()]
        rules += [
            nft.random_loss(port, direction, percent, comment)
            for (port, direction), (percent, comment) in sorted(self._loss.items())
        ]
        nft.apply(self.switch_netns, nft.render_faults(rules))

    # -- processes --------------------------------------------------------------------------------------

    def _spawn(
        self,
        node: Node,
        argv: Argv,
        *,
        name: str | None,
        env: Mapping[str, str] | None,
        cwd: str | Path | None,
    ) -> Process:
        with self._lock:
            self._check_open()
            if name is None:
                name = Path(normalize_argv(argv)[0]).name
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            log_path = self.log_dir / f"{node.name}-{safe}.log"
            n = 1
            while log_path.exists():
                n += 1
                log_path = self.log_dir / f"{node.name}-{safe}.{n}.log"
            proc = Process.start(
                node.netns, argv, name=name, where=node.name, log_path=log_path, env=env, cwd=cwd
            )
            self._processes.append(proc)
            return proc

    @property
    def processes(self) -> list[Process]:
        return list(self._processes)

    # -- teardown ---------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise NetlabError(f"lab {self.id} is closed")

    def _check_name(self, name: str, taken: Mapping[str, object], what: str) -> None:
        if not _NAME.match(name):
            raise NetlabError(
                f"{what} name {name!r} is invalid: use 1-24 characters, lowercase letters, digits and '-', "
                "starting with a letter"
            )
        if name in taken:
            raise NetlabError(f"lab {self.id} already has a {what} named {name!r}")

    def close(self, *, keep_logs: bool = False) -> None:
        """Stop all processes and delete every namespace of the lab. Idempotent.

        The temporary log directory is removed unless `keep_logs` (a `log_dir` you passed is never removed).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._close_at_exit)
        if os.getpid() != self._owner_pid:
            # A forked child inherited this object: the lab belongs to the parent.
            return
        started = time.monotonic()
        errors: list[str] = []
        try:
            _stop_all(self._processes)
        except NetlabError as exc:
            errors.append(str(exc))
        try:
            # By name, not by what this object remembers: also catches a namespace whose creation failed late.
            namespace.delete(cleanup.lab_namespaces(self.id))
        except NetlabError as exc:
            errors.append(str(exc))
        if self._owns_log_dir and not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        elif self._owns_log_dir:
            log.warning("event=netlab_logs_kept lab=%s log_dir=%s", self.id, self.log_dir)
        if not errors:
            cleanup.release_lab(self.id)
        log.info(
            "event=netlab_lab_closed lab=%s seconds=%.2f errors=%d",
            self.id,
            time.monotonic() - started,
            len(errors),
        )
        if errors:
            raise NetlabError(
                f"lab {self.id} was not fully removed (run `tunnelmesh netlab clean`): {'; '.join(errors)}"
            )

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except NetlabError as exc:
            log.error("event=netlab_close_at_exit_failed lab=%s error=%s", self.id, exc)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(keep_logs=exc_type is not None)


def _stop_all(processes: Sequence[Process]) -> None:
    """SIGTERM everything at once, give the lot `_STOP_GRACE` s in total, then SIGKILL what is left."""
    running = [p for p in processes if p.running]
    for proc in running:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE
    for proc in running:
        with contextlib.suppress(NetlabError):  # still running: killed below
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in running:
        proc.kill()


def _short(name: str) -> str:
    """Cut an interface name to what the kernel accepts; callers make the start unique."""
    return name[:_IFNAMSIZ]
