"""Mesh DNS as a user sees it: `dig` (BIND's client, nobody here wrote it) against MeshResolver in a netlab.

The resolver runs on port 53 of a lab host `srv`, in an event loop thread born in srv's network namespace, so
its sockets are real kernel sockets there; `dig` runs on another host `cli` and queries over the lab LAN
(UDP, and TCP with `+tcp` or after a truncated answer). Malformed datagrams and TCP messages are sent with
plain sockets; the resolver must count them and keep answering. Needs root; about 10 s.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tunnelmesh.api.v1 import node_pb2
from tunnelmesh.netlab import Lab
from tunnelmesh.netlab.topology import Host
from tunnelmesh.node import dns_wire as w
from tunnelmesh.node.dns import MeshResolver

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(120),
]

T = TypeVar("T")
CALL_DEADLINE = 15.0  # seconds for anything run on the resolver's loop (generous: the machine is shared)
DIG_TIME = 5  # seconds dig waits for each answer
A, AAAA, CNAME = node_pb2.DNS_RECORD_TYPE_A, node_pb2.DNS_RECORD_TYPE_AAAA, node_pb2.DNS_RECORD_TYPE_CNAME


def dns_config(names: dict[str, str], *, ttl: int = 5) -> node_pb2.DnsConfig:
    """One A and one AAAA record per node, as the coordinator sends them, plus a CNAME and a big RRset."""
    cfg = node_pb2.DnsConfig(settings=node_pb2.DnsSettings(mesh_domain="mesh.internal"))
    cfg.settings.ttl.seconds = ttl
    for i, (name, ip) in enumerate(names.items(), start=1):
        cfg.records.add(name=f"{name}.mesh.internal", type=A, values=[ip])
        cfg.records.add(name=f"{name}.mesh.internal", type=AAAA, values=[f"fd7a:115c:a1e0::{i}"])
    cfg.records.add(name="www.mesh.internal", type=CNAME, values=["alpha.mesh.internal"])
    cfg.records.add(name="big.mesh.internal", type=A, values=[f"100.64.1.{i}" for i in range(1, 60)])
    return cfg


class LoopThread:
    """An asyncio loop in a thread started inside a lab host, so every socket it opens lives there."""

    def __init__(self, host: Host) -> None:
        self.loop = asyncio.new_event_loop()
        with host.enter():
            self.thread = threading.Thread(target=self.loop.run_forever, name=f"dns-{host.name}", daemon=True)
            self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=CALL_DEADLINE)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=CALL_DEADLINE)
        self.loop.close()


@dataclass
class World:
    lab: Lab
    srv: Host
    cli: Host
    loop: LoopThread
    resolver: MeshResolver
    registry: CollectorRegistry


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("dns")
    with Lab(log_dir=tmp / "netlab") as lab:
        lan = lab.lan("l", "10.80.0.0/24")
        srv, cli = lab.host("srv", lan), lab.host("cli", lan)
        loop = LoopThread(srv)
        registry = CollectorRegistry()
        resolver = MeshResolver([(srv.ip, 53)], registry=registry)
        resolver.update(dns_config({"alpha": "100.64.0.1", "beta": "100.64.0.2"}))
        loop.run(resolver.start())
        try:
            yield World(lab, srv, cli, loop, resolver, registry)
        finally:
            loop.run(resolver.stop())
            loop.close()


@dataclass
class Dig:
    status: str
    flags: set[str]
    answer: list[tuple[str, int, str, str]]  # name, ttl, type, data
    authority: list[tuple[str, int, str, str]]
    stdout: str


def dig(host: Host, server: str, *args: str) -> Dig:
    out = host.run(["dig", f"@{server}", f"+time={DIG_TIME}", "+tries=1", *args], timeout=4 * DIG_TIME).stdout
    status = re.search(r"status: (\w+)", out)
    flags = re.search(r";; flags: ([a-z ]+);", out)
    assert status and flags, f"dig printed no answer header:\n{out}"

    def section(title: str) -> list[tuple[str, int, str, str]]:
        m = re.search(rf";; {title} SECTION:\n(.*?)(?:\n\n|\Z)", out, re.S)
        rows = []
        for line in m.group(1).splitlines() if m else []:
            name, ttl, _cls, rtype, data = line.split(None, 4)
            rows.append((name, int(ttl), rtype, data))
        return rows

    return Dig(status.group(1), set(flags.group(1).split()), section("ANSWER"), section("AUTHORITY"), out)


def metric(world: World, name: str, **labels: str) -> float:
    value = world.registry.get_sample_value(name, labels)
    return value or 0.0


# -- answers ------------------------------------------------------------------------------------------------


def test_a_and_aaaa_answers_with_ttl(world: World) -> None:
    r = dig(world.cli, world.srv.ip, "alpha.mesh.internal", "A")
    assert r.status == "NOERROR" and "aa" in r.flags
    assert r.answer == [("alpha.mesh.internal.", 5, "A", "100.64.0.1")]
    r = dig(world.cli, world.srv.ip, "beta.mesh.internal", "AAAA")
    assert r.answer == [("beta.mesh.internal.", 5, "AAAA", "fd7a:115c:a1e0::2")]


def test_unknown_name_is_nxdomain_with_soa(world: World) -> None:
    r = dig(world.cli, world.srv.ip, "nobody.mesh.internal")
    assert r.status == "NXDOMAIN" and "aa" in r.flags and not r.answer
    assert [(n, t) for n, _, t, _ in r.authority] == [("mesh.internal.", "SOA")]


def test_known_name_other_type_is_nodata(world: World) -> None:
    r = dig(world.cli, world.srv.ip, "alpha.mesh.internal", "TXT")
    assert r.status == "NOERROR" and not r.answer
    assert [t for _, _, t, _ in r.authority] == ["SOA"]


def test_names_are_case_insensitive(world: World) -> None:
    r = dig(world.cli, world.srv.ip, "AlPhA.MESH.internal")
    assert r.status == "NOERROR"
    assert r.answer == [("AlPhA.MESH.internal.", 5, "A", "100.64.0.1")]


def test_cname_is_followed(world: World) -> None:
    r = dig(world.cli, world.srv.ip, "www.mesh.internal")
    assert [(t, d) for _, _, t, d in r.answer] == [("CNAME", "alpha.mesh.internal."), ("A", "100.64.0.1")]


def test_names_outside_the_domain_are_refused(world: World) -> None:
    before = metric(world, "tunnelmesh_dns_queries_total", result="refused")
    r = dig(world.cli, world.srv.ip, "example.com")
    assert r.status == "REFUSED" and "aa" not in r.flags and not r.answer
    assert metric(world, "tunnelmesh_dns_queries_total", result="refused") == before + 1


def test_large_answer_sets_tc_over_udp_and_comes_whole_over_tcp(world: World) -> None:
    before = metric(world, "tunnelmesh_dns_truncated_total")
    r = dig(world.cli, world.srv.ip, "big.mesh.internal", "+noedns", "+ignore")
    assert "tc" in r.flags and not r.answer
    r = dig(world.cli, world.srv.ip, "big.mesh.internal", "+noedns")  # dig retries over TCP by itself
    assert "Truncated, retrying in TCP mode" in r.stdout and len(r.answer) == 59
    r = dig(world.cli, world.srv.ip, "big.mesh.internal", "+tcp")
    assert len(r.answer) == 59 and "tc" not in r.flags
    assert metric(world, "tunnelmesh_dns_truncated_total") == before + 2


def test_update_replaces_every_record(world: World) -> None:
    """A renamed node resolves under its new name at once; the old name is NXDOMAIN."""
    try:
        world.loop.call(
            lambda: world.resolver.update(dns_config({"gamma": "100.64.0.1", "beta": "100.64.0.2"}))
        )
        r = dig(world.cli, world.srv.ip, "gamma.mesh.internal")
        assert r.answer == [("gamma.mesh.internal.", 5, "A", "100.64.0.1")]
        assert dig(world.cli, world.srv.ip, "alpha.mesh.internal").status == "NXDOMAIN"
        assert dig(world.cli, world.srv.ip, "beta.mesh.internal").status == "NOERROR"
        soa = dig(world.cli, world.srv.ip, "mesh.internal", "SOA").answer
        zone = world.resolver.zone
        assert soa and zone is not None and int(soa[0][3].split()[2]) == zone.serial
    finally:
        world.loop.call(
            lambda: world.resolver.update(dns_config({"alpha": "100.64.0.1", "beta": "100.64.0.2"}))
        )


# -- bad input ----------------------------------------------------------------------------------------------


def test_malformed_udp_packets_are_counted_and_the_server_keeps_answering(world: World) -> None:
    before = {r: metric(world, "tunnelmesh_dns_queries_total", result=r) for r in ("formerr", "dropped")}
    query = w.Message(w.Header(0x5151, rd=True), (w.Question(w.name_from_text("alpha.mesh.internal"), 1),))
    raw = query.to_bytes()
    with world.cli.socket() as s:
        s.settimeout(DIG_TIME)
        s.sendto(b"\x00\x01\x02", (world.srv.ip, 53))  # no header: dropped
        s.sendto(query.with_header(qr=True).to_bytes(), (world.srv.ip, 53))  # a response: dropped
        s.sendto(raw[:-2], (world.srv.ip, 53))  # header readable, question cut: FORMERR
        reply = w.parse(s.recv(4096))
        assert reply.header.id == 0x5151 and reply.header.rcode == w.RCODE_FORMERR and reply.header.qr
        s.sendto(raw + b"junk", (world.srv.ip, 53))  # trailing bytes: FORMERR
        assert w.parse(s.recv(4096)).header.rcode == w.RCODE_FORMERR
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the dropped ones got no reply
            s.recv(4096)
    assert metric(world, "tunnelmesh_dns_queries_total", result="dropped") == before["dropped"] + 2
    assert metric(world, "tunnelmesh_dns_queries_total", result="formerr") == before["formerr"] + 2
    assert dig(world.cli, world.srv.ip, "alpha.mesh.internal").answer[0][3] == "100.64.0.1"


def test_malformed_tcp_message_is_counted_and_the_server_keeps_answering(world: World) -> None:
    before = metric(world, "tunnelmesh_dns_queries_total", result="dropped")
    with world.cli.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(DIG_TIME)
        s.connect((world.srv.ip, 53))
        s.sendall(struct.pack(">H", 5) + b"\xff" * 5)  # shorter than a header: the server hangs up
        assert s.recv(4096) == b""
    assert metric(world, "tunnelmesh_dns_queries_total", result="dropped") == before + 1
    assert dig(world.cli, world.srv.ip, "alpha.mesh.internal", "+tcp").status == "NOERROR"


def test_metrics_are_exported(world: World) -> None:
    text = generate_latest(world.registry).decode()
    for line in (
        'tunnelmesh_dns_queries_total{result="noerror"}',
        'tunnelmesh_dns_queries_total{result="nxdomain"}',
        "tunnelmesh_dns_records ",
    ):
        assert line in text
    assert metric(world, "tunnelmesh_dns_records") == 2 * 2 + 1 + 59


def test_resolver_starts_before_its_address_exists(world: World) -> None:
    """The agent may start DNS before the mesh address is on the TUN device: IP_FREEBIND makes that work."""
    mesh_ip = "100.64.0.5"
    resolver = MeshResolver([(mesh_ip, 53)], config=dns_config({"alpha": "100.64.0.1"}))
    world.loop.run(resolver.start())
    try:
        world.srv.run(["ip", "addr", "add", f"{mesh_ip}/32", "dev", "lo"])
        r = dig(world.srv, mesh_ip, "alpha.mesh.internal")
        assert r.answer == [("alpha.mesh.internal.", 5, "A", "100.64.0.1")]
        assert dig(world.srv, mesh_ip, "alpha.mesh.internal", "+tcp").status == "NOERROR"
    finally:
        world.loop.run(resolver.stop())
        world.srv.run(["ip", "addr", "del", f"{mesh_ip}/32", "dev", "lo"], check=False)


def test_tcp_connections_are_bounded_idle_ones_closed_and_stop_closes_the_rest(world: World) -> None:
    resolver = MeshResolver(
        [(world.srv.ip, 5353)],
        config=dns_config({"alpha": "100.64.0.1"}),
        max_tcp_connections=1,
        tcp_idle_timeout=1.0,
    )
    world.loop.run(resolver.start())
    stopped = False
    try:
        with (
            world.cli.socket(socket.AF_INET, socket.SOCK_STREAM) as idle,
            world.cli.socket(socket.AF_INET, socket.SOCK_STREAM) as extra,
        ):
            for s in (idle, extra):
                s.settimeout(DIG_TIME)
            idle.connect((world.srv.ip, 5353))
            world.loop.run(asyncio.sleep(0.2))  # let the server accept it first
            extra.connect((world.srv.ip, 5353))
            assert extra.recv(4096) == b""  # over the limit: closed at once
            assert idle.recv(4096) == b""  # silent for longer than the idle timeout: closed
        assert resolver.tcp_refused == 1
        # the slot is free again
        assert dig(world.cli, world.srv.ip, "alpha.mesh.internal", "+tcp", "-p", "5353").status == "NOERROR"
        with world.cli.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
            held.settimeout(DIG_TIME)
            held.connect((world.srv.ip, 5353))
            resolver.tcp_idle_timeout = 60.0
            world.loop.run(asyncio.sleep(0.2))  # let the server accept it
            world.loop.run(resolver.stop())
            stopped = True
            assert held.recv(4096) == b""  # stop() closed it without waiting for the idle timeout
    finally:
        if not stopped:
            world.loop.run(resolver.stop())
