"""Coordinator discovery with real multicast: mDNS between network namespaces on a netlab LAN bridge.

Each coordinator is a ``Discovery`` with its own zeroconf, on its own event loop, in a thread born inside a
lab node's namespace, so every socket it opens (UDP 5353 and the senders) lives in the lab: nothing is
multicast on the machine's real networks, and ``test_sockets_live_in_the_lab`` checks it socket by socket.
The whole file takes about 30 s on two cores.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tunnelmesh.coord.discovery import Candidate, Discovery, DiscoveryError, PeerEvent
from tunnelmesh.netlab import Lab, Node

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(60),
]

RAFT_PORT = 7400
API_PORT = 7443
SO_NETNS_COOKIE = 71  # Linux >= 5.14; not exported by Python's socket module
T = TypeVar("T")


class Coordinator:
    """A ``Discovery`` on its own event loop, in a thread born inside ``node``'s network namespace."""

    def __init__(
        self, node: Node, *, cluster: str | None, member: str | None, name: str = "", **kwargs: Any
    ) -> None:
        self.node = node
        self.events: list[PeerEvent] = []
        self.loop = asyncio.new_event_loop()
        self.discovery = Discovery(
            name=name or f"coord-{node.name}",
            port=RAFT_PORT,
            cluster_id=cluster,
            member_id=member,
            api=f"{node.ip}:{API_PORT}",
            on_change=self.events.append,
            **kwargs,
        )
        with node.enter():
            self.thread = threading.Thread(target=self._main, name=f"discovery-{node.name}", daemon=True)
            self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())

    def find(self, timeout: float = 5.0) -> list[Candidate]:
        return self.call(self.discovery.find_members(timeout), timeout + 5)

    def peer_members(self) -> set[str | None]:
        return {p.member_id for p in self.on_loop(self.discovery.peers)}

    def close(self) -> None:
        if self.thread.is_alive():
            self.call(self.discovery.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def start_all(coordinators: list[Coordinator]) -> None:
    """Start every coordinator at once (each one probes its name for ~2 s)."""
    futures = [asyncio.run_coroutine_threadsafe(c.discovery.start(), c.loop) for c in coordinators]
    for f in futures:
        f.result(20)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def forgot(c: Coordinator, member: str) -> bool:
    return member not in c.peer_members()


def expected(c: Coordinator, cluster: str | None, member: str) -> Candidate:
    return Candidate(
        address=f"{c.node.ip}:{RAFT_PORT}",
        cluster_id=cluster,
        member_id=member,
        source="mdns",
        api=f"{c.node.ip}:{API_PORT}",
        origin=f"coord-{c.node.name}-{member}",
    )


@pytest.fixture
def lab(tmp_path: Any) -> Iterator[Lab]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab


@pytest.fixture
def coordinators() -> Iterator[list[Coordinator]]:
    made: list[Coordinator] = []
    yield made
    for c in made:
        c.close()


def test_three_coordinators_find_each_other_and_a_stopped_one_says_goodbye(
    lab: Lab, coordinators: list[Coordinator]
) -> None:
    office = lab.lan("office", "10.30.1.0/24")
    nodes = [lab.host(n, office) for n in ("a", "b", "c")]
    coordinators += [Coordinator(n, cluster="c1", member=f"m-{n.name}") for n in nodes]
    a, b, c = coordinators
    start_all(coordinators)

    for me in coordinators:
        t0 = time.monotonic()
        found = me.find(timeout=5.0)
        others = [o for o in coordinators if o is not me]
        assert sorted(found, key=lambda x: x.address) == sorted(
            (expected(o, "c1", f"m-{o.node.name}") for o in others), key=lambda x: x.address
        )
        assert time.monotonic() - t0 < 3.0, "find_members returns once the table is quiet, not at its timeout"
        assert me.discovery.addresses == [me.node.ip], "only the lab address is announced (not loopback)"

    c.close()  # goodbye packets
    for me in (a, b):
        seconds = wait_until(functools.partial(forgot, me, "m-c"), 3.0, f"{me.node.name} forgets c")
        assert seconds < 2.0
        removed = [e for e in me.events if e.kind == "removed"]
        assert [(e.peer.member_id, e.reason) for e in removed] == [("m-c", "goodbye")]
        assert [x.member_id for x in me.find(timeout=2.0)] == ["m-b" if me is a else "m-a"]


def test_another_cluster_on_the_lan_is_listed_separately_never_returned(
    lab: Lab, coordinators: list[Coordinator]
) -> None:
    office = lab.lan("office", "10.30.2.0/24")
    a, b, x, n = (lab.host(name, office) for name in ("a", "b", "x", "n"))
    coordinators += [
        Coordinator(a, cluster="c1", member="m-a"),
        Coordinator(b, cluster="c1", member="m-b"),
        Coordinator(x, cluster="c2", member="m-x"),  # another cluster on the same LAN
        Coordinator(n, cluster=None, member=None),  # a new coordinator, not in a cluster yet
    ]
    ca, cb, cx, cn = coordinators
    start_all(coordinators)
    wait_until(lambda: len(ca.on_loop(ca.discovery.peers)) == 3, 5.0, "a sees b, x and n")

    assert ca.find() == [expected(cb, "c1", "m-b")]
    assert cx.find(timeout=1.5) == [], "c2 has no other member here; c1's are not mixed in"
    seen = {p.member_id: p.cluster_id for p in ca.on_loop(ca.discovery.peers)}
    assert seen == {"m-b": "c1", "m-x": "c2", None: None}, "the table lists every cluster, each tagged"
    # A coordinator without a cluster sees the members of every cluster, tagged: it must choose explicitly.
    assert sorted((c.cluster_id, c.member_id) for c in cn.find()) == [
        ("c1", "m-a"),
        ("c1", "m-b"),
        ("c2", "m-x"),
    ]

    # n joins c1: it says goodbye under its provisional name and announces itself as member m-n.
    cn.call(cn.discovery.update_announcement(cluster_id="c1", member_id="m-n"))
    wait_until(lambda: "m-n" in {c.member_id for c in ca.find(timeout=1.0)}, 5.0, "a finds n in c1")
    assert sorted(str(c.member_id) for c in ca.find()) == ["m-b", "m-n"]
    assert cn.discovery.instance == "coord-n-m-n"
    # x changes only its TXT (joins c1 under the same member id): an update, not a new instance.
    cx.call(cx.discovery.update_announcement(cluster_id="c1"))
    wait_until(lambda: "m-x" in {c.member_id for c in ca.find(timeout=1.0)}, 5.0, "a finds x in c1")
    assert any(e.kind == "updated" and e.peer.member_id == "m-x" for e in ca.events)


def test_seeds_resolve_and_merge_with_mdns_results(lab: Lab, coordinators: list[Coordinator]) -> None:
    office = lab.lan("office", "10.30.3.0/24")
    remote = lab.lan("remote", "10.30.4.0/24")  # another region: routed, multicast does not cross
    a, b = lab.host("a", office), lab.host("b", office)
    lab.router("r", wan=office, lan=remote, nat=None)
    d = lab.host("d", remote)

    async def dns(host: str, port: int) -> list[str]:
        assert host == "coord-d.example.test"
        return [d.ip, "10.30.4.200"]  # every address is a candidate; the second one is a dead one

    coordinators += [
        Coordinator(
            a,
            cluster="c1",
            member="m-a",
            seeds=[f"coord-d.example.test:{API_PORT}", f"{b.ip}:{API_PORT}"],
            resolver=dns,
        ),
        Coordinator(b, cluster="c1", member="m-b"),
        Coordinator(d, cluster="c1", member="m-d"),
    ]
    ca, cb, cd = coordinators
    start_all(coordinators)
    a.run(["ping", "-c1", "-W2", d.ip])  # the seed is reachable by unicast

    found = ca.find()
    seed = f"coord-d.example.test:{API_PORT}"  # seeds name API addresses, as `tunnelmesh coord --seed`
    assert found == [
        expected(cb, "c1", "m-b"),  # by mDNS; b's seed (its API address) is merged into it, not listed twice
        Candidate(f"{d.ip}:{API_PORT}", None, None, "seed", api=f"{d.ip}:{API_PORT}", origin=seed),
        Candidate(f"10.30.4.200:{API_PORT}", None, None, "seed", api=f"10.30.4.200:{API_PORT}", origin=seed),
    ]
    assert "m-d" not in ca.peer_members(), "mDNS stays on its LAN"
    assert cd.find(timeout=1.0) == []


def test_a_silent_peer_expires_with_its_ttl_and_returns_when_heard_again(
    lab: Lab, coordinators: list[Coordinator]
) -> None:
    office = lab.lan("office", "10.30.5.0/24")
    a, b = lab.host("a", office), lab.host("b", office)
    coordinators += [
        Coordinator(a, cluster="c1", member="m-a", ttl=2),
        Coordinator(b, cluster="c1", member="m-b", ttl=2),
    ]
    ca, _ = coordinators
    start_all(coordinators)
    assert [c.member_id for c in ca.find()] == ["m-b"]
    time.sleep(3.0)
    assert "m-b" in ca.peer_members(), "refresh queries at 80-95 % of the TTL keep a live peer"

    lab.set_loss(b, 100)  # b vanishes without a goodbye (a crash, a cut cable)
    wait_until(lambda: "m-b" not in ca.peer_members(), 4.0, "a expires b")
    assert [(e.kind, e.reason) for e in ca.events if e.kind == "removed"] == [("removed", "expired")]

    lab.set_loss(b, 0)
    wait_until(lambda: "m-b" in ca.peer_members(), 6.0, "a finds b again")


def test_bound_interfaces_only(lab: Lab, coordinators: list[Coordinator]) -> None:
    lan1 = lab.lan("one", "10.30.6.0/24")
    lan2 = lab.lan("two", "10.30.7.0/24")
    a = lab.host("a", lan1)
    lab.attach(a, lan2)  # a is on both LANs but announces on the first only
    p1, p2 = lab.host("p1", lan1), lab.host("p2", lan2)
    coordinators += [
        Coordinator(a, cluster="c1", member="m-a", interfaces=["eth0"]),
        Coordinator(p1, cluster="c1", member="m-p1"),
        Coordinator(p2, cluster="c1", member="m-p2"),
    ]
    ca, c1, c2 = coordinators
    start_all(coordinators)
    assert ca.discovery.addresses == [a.ip_on(lan1)]
    assert [c.member_id for c in c1.find()] == ["m-a"]
    assert [c.address for c in c1.find()] == [f"{a.ip_on(lan1)}:{RAFT_PORT}"]
    assert c2.find(timeout=1.5) == [], "a does not listen or announce on lan two"
    assert [c.member_id for c in ca.find()] == ["m-p1"]


def test_two_coordinators_with_one_identity_are_refused(lab: Lab, coordinators: list[Coordinator]) -> None:
    office = lab.lan("office", "10.30.9.0/24")
    a, b = lab.host("a", office), lab.host("b", office)
    coordinators += [
        Coordinator(a, cluster="c1", member="m-1", name="coord"),
        Coordinator(b, cluster="c1", member="m-1", name="coord"),  # e.g. a copied data directory
    ]
    ca, cb = coordinators
    ca.call(ca.discovery.start())
    with pytest.raises(
        DiscoveryError, match=re.escape("already announces 'coord-m-1._tunnelmesh-coord._tcp.local.'")
    ):
        cb.call(cb.discovery.start())
    assert ca.discovery.instance == "coord-m-1"


def test_sockets_live_in_the_lab(lab: Lab, coordinators: list[Coordinator]) -> None:
    office = lab.lan("office", "10.30.8.0/24")
    nodes = [lab.host(n, office) for n in ("a", "b")]
    coordinators += [Coordinator(n, cluster="c1", member=f"m-{n.name}") for n in nodes]
    start_all(coordinators)

    def cookie(sock: socket.socket) -> bytes:
        return sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)

    with socket.socket() as probe:
        root = cookie(probe)
    for c in coordinators:
        with c.node.socket() as probe:
            node_cookie = cookie(probe)
        assert node_cookie != root
        engine = c.discovery._azc.zeroconf.engine  # type: ignore[union-attr]
        sockets = [t.sock for t in [*engine.readers, *engine.senders]]
        assert sockets
        assert {cookie(s) for s in sockets} == {node_cookie}
