#!/usr/bin/env python3
"""Control-plane scale benchmark: N simulated nodes registered and watching their config on 3 coordinators.

Three real ``tunnelmesh coord`` processes on loopback (c1 bootstraps, c2 and c3 join, as in bench/raft.py).
The nodes are lightweight asyncio clients in a few worker processes: no TUN, no data plane, only the node API
a real agent uses (``NodeService.Register`` with a join token, then a ``WatchConfig`` stream with the node
token), over TLS with the cluster CA. The phases:

1. register N nodes (nobody watches yet, so this measures registration alone: Raft writes through the leader);
2. open N WatchConfig streams, spread round-robin over the three coordinators; each reads its snapshot
   (every other node is a peer in it);
3. idle for a few seconds: coordinator CPU and memory with N watchers attached;
4. probes: the benchmark registers P more nodes one at a time, and every watcher notes (CLOCK_MONOTONIC,
   shared by every process on the machine) when a delta first names each one. Propagation latency = that
   moment minus the moment the probe's registration was sent (its GetServerInfo, then Register with the key
   proof, as an agent does). Per probe, "all watchers" is the slowest
   watcher: the time until *every* node knows the new one.

Target (issue 5 item 9): p99 of the per-probe all-watchers time under 1 s at 1,000 nodes. The run prints
PASS/FAIL and never fails because of it. Everything shares the machine's cores (coordinators and clients),
so the client processes' own work is part of the measured latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import raft as rb
from output_paths import file_problem

ROOT = rb.ROOT
sys.path.insert(0, str(ROOT))  # the tree being measured, installed or not
CLK_TCK = rb.CLK_TCK
PAGE = os.sysconf("SC_PAGE_SIZE")
RPC_TIMEOUT = 20.0  # per Register / stream open; generous, the machine is shared
REGISTER_DEADLINE = 120.0  # a node's registration, retries included (UNAVAILABLE during an election)
STREAMS_PER_CHANNEL = 100  # WatchConfig streams multiplexed on one HTTP/2 connection
TARGET_P99_S = 1.0
CHANNEL_OPTIONS = [*rb.CHANNEL_OPTIONS, ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
log = rb.log
BenchError = rb.BenchError


@dataclass(frozen=True, slots=True)
class Config:
    nodes: int
    workers: int
    probes: int
    probe_gap: float
    idle: float
    register_concurrency: int
    keep: bool


# ----------------------------------------------------------------------------------------------------------
# Worker side (``--worker``): registers and watches its share of the nodes; JSON lines on stdout, commands
# ("watch", "stop") on stdin.
# ----------------------------------------------------------------------------------------------------------


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair (private, public): Register needs a proof of the private key."""
    import nacl.public

    key = nacl.public.PrivateKey.generate()
    return bytes(key), bytes(key.public_key)


async def _register(stub: Any, req: Any, private: bytes, retries: Counter[str] | None = None) -> Any:
    """Register as an agent does (GetServerInfo, then Register with a key proof), retrying what the server
    calls retryable (UNAVAILABLE: no leader; DEADLINE_EXCEEDED: not committed in time) until
    REGISTER_DEADLINE. Safe: the state keeps one node per public key."""
    import grpc

    from tunnelmesh import keyproof

    deadline = time.monotonic() + REGISTER_DEADLINE
    delay = 0.05
    while True:
        try:
            return await keyproof.register(stub, req, private, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            retryable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if exc.code() not in retryable or time.monotonic() + delay > deadline:
                raise
            if retries is not None:
                retries[exc.code().name] += 1
        await asyncio.sleep(delay)
        delay = min(1.0, delay * 2)


def _stubs(spec: dict[str, Any], count: int) -> list[Any]:
    """``count`` NodeService stubs, each on its own channel, round-robin over the coordinators."""
    from tunnelmesh.api.v1 import node_pb2_grpc
    from tunnelmesh.client import open_channel

    ca = Path(spec["ca"]).read_bytes()
    eps = spec["endpoints"]
    return [
        node_pb2_grpc.NodeServiceStub(open_channel(eps[i % len(eps)], ca_pem=ca, options=CHANNEL_OPTIONS))
        for i in range(count)
    ]


class Watcher:
    """One node's WatchConfig stream: reads the snapshot, then notes when a delta first names each peer."""

    def __init__(self, stub: Any, node_id: str, node_token: str) -> None:
        self.stub, self.node_id, self.token = stub, node_id, node_token
        self.snapshot_peers = -1
        self.seen: dict[str, float] = {}
        self.error = ""
        self.ready = asyncio.Event()

    async def run(self) -> None:
        import grpc

        from tunnelmesh.api.v1 import node_pb2

        md = (("authorization", f"Bearer {self.token}"),)
        call = self.stub.WatchConfig(node_pb2.WatchConfigRequest(node_id=self.node_id), metadata=md)
        try:
            async for msg in call:
                kind = msg.WhichOneof("update")
                if kind == "snapshot":
                    self.snapshot_peers = len(msg.snapshot.peers)
                    self.ready.set()
                elif kind == "delta":
                    now = time.monotonic()
                    for p in msg.delta.upserted_peers:
                        self.seen.setdefault(p.node_id, now)
            self.error = "stream ended"
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.ready.set()
            call.cancel()


async def _worker(spec: dict[str, Any]) -> None:
    from tunnelmesh.api.v1 import node_pb2

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def command(expected: str) -> None:
        line = (await stdin.readline()).decode().strip()
        if line != expected:
            raise BenchError(f"worker: expected {expected!r} on stdin, got {line!r}")

    first, count = spec["first"], spec["count"]
    reg_stubs = _stubs(spec, len(spec["endpoints"]))
    sem = asyncio.Semaphore(spec["register_concurrency"])
    nodes: list[tuple[str, str]] = []
    errors: Counter[str] = Counter()
    retries: Counter[str] = Counter()

    async def register(k: int) -> None:
        private, public = _keypair()
        req = node_pb2.RegisterRequest(
            join_token=spec["join_token"], public_key=public, name=f"sim{k}", hostname=f"sim{k}.bench"
        )
        async with sem:
            try:
                r = await _register(reg_stubs[k % len(reg_stubs)], req, private, retries)
            except Exception as exc:
                details = exc.details() if hasattr(exc, "details") else str(exc)
                errors[f"register: {type(exc).__name__}: {details}"] += 1
                return
        nodes.append((r.node_id, r.node_token))

    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for k in range(first, first + count):
            tg.create_task(register(k))
    emit(
        event="registered",
        n=len(nodes),
        seconds=time.monotonic() - t0,
        errors=dict(errors),
        retries=dict(retries),
    )

    await command("watch")
    stubs = _stubs(spec, max(len(spec["endpoints"]), math.ceil(len(nodes) / STREAMS_PER_CHANNEL)))
    watchers = [Watcher(stubs[i % len(stubs)], nid, tok) for i, (nid, tok) in enumerate(nodes)]
    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(w.run()) for w in watchers]
        opening = asyncio.gather(*(w.ready.wait() for w in watchers))
        try:
            async with asyncio.timeout(spec["watch_deadline"]):
                await opening
        except TimeoutError:
            pass
        ok = [w for w in watchers if w.snapshot_peers >= 0 and not w.error]
        emit(
            event="watching",
            n=len(ok),
            seconds=time.monotonic() - t0,
            snapshot_peers=sorted({w.snapshot_peers for w in ok}),
            errors=dict(Counter(w.error for w in watchers if w.error)),
        )
        await command("stop")
        for t in tasks:
            t.cancel()
    emit(
        event="seen",
        seen=[w.seen for w in watchers if w.snapshot_peers >= 0],
        errors=dict(Counter(w.error for w in watchers if w.error)),
    )


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        asyncio.run(_worker(spec))
    except Exception as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------
# Coordinator side: processes, resource figures.
# ----------------------------------------------------------------------------------------------------------


class Cluster(rb.TunnelMeshCluster):
    """bench/raft.py's 3-coordinator cluster, without the relay and HTTP ports (three on one host would clash,
    and nodes here never use them)."""

    def _spawn(self, name: str, extra: list[str], env: dict[str, str] | None = None) -> rb.Member:
        return super()._spawn(name, [*extra, "--relay-listen", "off", "--http-listen", "off"], env)


def cluster_term(cluster: Cluster) -> int:
    """The highest Raft term any coordinator has logged an election in (terms only grow)."""
    terms = [0]
    for m in cluster.members:
        text = m.log_path.read_text(errors="replace")
        terms += [int(t) for t in re.findall(r"event=leader_elected term=(\d+)", text)]
    return max(terms)


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


@dataclass
class Sample:
    at: float
    cpu: dict[int, float]
    rss: dict[int, int]

    @classmethod
    def take(cls, pids: list[int]) -> Sample:
        return cls(time.monotonic(), {p: proc_cpu(p) for p in pids}, {p: proc_rss(p) for p in pids})


def cpu_cores(a: Sample, b: Sample) -> float:
    """Average cores the coordinators used between two samples (summed over the three)."""
    return sum(b.cpu[p] - a.cpu[p] for p in a.cpu) / max(1e-9, b.at - a.at)


def mib(n: float) -> float:
    return round(n / 2**20, 1)


class Workers:
    def __init__(self, procs: rb.Processes, tmp: Path) -> None:
        self.procs, self.tmp = procs, tmp
        self.handles: list[Any] = []

    def spawn(self, specs: list[dict[str, Any]]) -> None:
        import subprocess

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for i, spec in enumerate(specs):
            p = self.procs.spawn(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                self.tmp / f"worker{i}.log",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                cwd=ROOT,
            )
            self.handles.append(p)

    def send(self, line: str) -> None:
        for p in self.handles:
            p.stdin.write((line + "\n").encode())
            p.stdin.flush()

    async def collect(self, event: str, limit_s: float) -> list[dict[str, Any]]:
        """The next ``event`` line of every worker, reading their stdout in threads (deadline ``limit_s``)."""

        def read(i: int, p: Any) -> dict[str, Any]:
            line = p.stdout.readline()
            if not line:
                raise BenchError(f"worker {i} exited ({p.poll()}):\n{rb.tail(self.tmp / f'worker{i}.log')}")
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == "error":
                raise BenchError(f"worker {i}: {msg['error']}")
            if msg.get("event") != event:
                raise BenchError(f"worker {i}: expected {event!r}, got {msg.get('event')!r}")
            return msg

        async with asyncio.timeout(limit_s):
            return list(
                await asyncio.gather(*(asyncio.to_thread(read, i, p) for i, p in enumerate(self.handles)))
            )


async def run(cfg: Config, tmp: Path, procs: rb.Processes) -> dict[str, Any]:
    from tunnelmesh.api.v1 import node_pb2
    from tunnelmesh.client import Client, resolve_profile

    load_at_start = os.getloadavg()
    cluster = Cluster(tmp, procs)
    log(f"starting 3 coordinators ({cluster.version()}) in {tmp}")
    await cluster.start()
    pids = cluster.pids()
    endpoints = [m.client_addr for m in cluster.members]
    c1 = cluster.dir / "c1"
    profile = resolve_profile(coordinators=",".join(endpoints), data_dir=c1, env={})
    ca_path = tmp / "ca.pem"
    ca_path.write_bytes(profile.ca_pem)
    async with Client(endpoints, ca_pem=profile.ca_pem, token=profile.token) as admin:
        token = (await admin.create_join_token(description="bench", reusable=True, ttl=3 * 3600)).secret
    s0 = Sample.take(pids)

    per = [cfg.nodes // cfg.workers + (1 if i < cfg.nodes % cfg.workers else 0) for i in range(cfg.workers)]
    specs, first = [], 0
    for n in per:
        specs.append(
            {
                "endpoints": endpoints,
                "ca": str(ca_path),
                "join_token": token,
                "first": first,
                "count": n,
                "register_concurrency": cfg.register_concurrency,
                "watch_deadline": 60 + cfg.nodes * 0.1,
            }
        )
        first += n
    workers = Workers(procs, tmp)
    log(f"registering {cfg.nodes} nodes from {cfg.workers} worker processes")
    workers.spawn(specs)
    reg = await workers.collect("registered", REGISTER_DEADLINE + cfg.nodes * 0.5)
    registered = sum(r["n"] for r in reg)
    reg_s = max(r["seconds"] for r in reg)
    reg_errors, reg_retries = Counter[str](), Counter[str]()
    for r in reg:
        reg_errors.update(r["errors"])
        reg_retries.update(r["retries"])
    s1 = Sample.take(pids)
    log(
        f"  {registered} registered in {reg_s:.1f}s ({registered / reg_s:.0f}/s)"
        f"  errors={dict(reg_errors)} retries={dict(reg_retries)}"
    )
    term_registered = cluster_term(cluster)

    log(f"opening {registered} WatchConfig streams over the 3 coordinators")
    workers.send("watch")
    watch = await workers.collect("watching", 120 + cfg.nodes * 0.2)
    watching = sum(w["n"] for w in watch)
    watch_s = max(w["seconds"] for w in watch)
    watch_errors = Counter[str]()
    for w in watch:
        watch_errors.update(w["errors"])
    snapshot_sizes = sorted({n for w in watch for n in w["snapshot_peers"]})
    s2 = Sample.take(pids)
    log(
        f"  {watching} watching after {watch_s:.1f}s; peers per snapshot {snapshot_sizes}"
        f"  errors={dict(watch_errors)}"
    )

    log(f"idle {cfg.idle:.0f}s with {watching} watchers")
    await asyncio.sleep(cfg.idle)
    s3 = Sample.take(pids)
    term_probes = cluster_term(cluster)

    log(f"{cfg.probes} probe registrations, {cfg.probe_gap:.1f}s apart")
    from tunnelmesh.api.v1 import node_pb2_grpc
    from tunnelmesh.client import open_channel

    probes: dict[str, float] = {}
    register_rpc: list[float] = []
    probe_wall: list[str] = []  # when each probe was sent, to find it in the coordinators' logs (--keep)
    probe_retries: Counter[str] = Counter()
    channels = [open_channel(e, ca_pem=profile.ca_pem, options=CHANNEL_OPTIONS) for e in endpoints]
    try:
        stubs = [node_pb2_grpc.NodeServiceStub(ch) for ch in channels]
        for i in range(cfg.probes):
            private, public = _keypair()
            req = node_pb2.RegisterRequest(
                join_token=token, public_key=public, name=f"probe{i}", hostname=f"probe{i}.bench"
            )
            t0 = time.monotonic()
            probe_wall.append(
                time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}"
            )
            r = await _register(stubs[i % len(stubs)], req, private, probe_retries)
            register_rpc.append(time.monotonic() - t0)
            probes[r.node_id] = t0
            await asyncio.sleep(cfg.probe_gap)
    finally:
        for ch in channels:
            await ch.close()
    await asyncio.sleep(max(2.0, cfg.probe_gap))  # stragglers
    s4 = Sample.take(pids)
    term_end = cluster_term(cluster)
    workers.send("stop")
    seen_msgs = await workers.collect("seen", 120)

    per_watcher: list[float] = []
    all_watchers: list[float] = []
    fan_out: list[float] = []  # all watchers minus the probe's Register call: commit to the slowest watcher
    missing = 0
    seen_maps = [m for msg in seen_msgs for m in msg["seen"]]
    for (node_id, t0), rpc in zip(probes.items(), register_rpc, strict=True):
        times = [m[node_id] - t0 for m in seen_maps if node_id in m]
        missing += len(seen_maps) - len(times)
        per_watcher.extend(times)
        if len(times) == len(seen_maps) and times:
            all_watchers.append(max(times))
            fan_out.append(max(times) - rpc)

    k = max(1, watching) / 1000
    report: dict[str, Any] = {
        "benchmark": "control",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tunnelmesh": cluster.version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
        "config": {
            "nodes": cfg.nodes,
            "workers": cfg.workers,
            "probes": cfg.probes,
            "probe_gap_s": cfg.probe_gap,
            "idle_s": cfg.idle,
        },
        "register": {
            "registered": registered,
            "seconds": round(reg_s, 2),
            "per_second": round(registered / reg_s, 1) if reg_s else None,
            "errors": dict(reg_errors),
            "retries": dict(reg_retries),
            "coordinator_cpu_s": round(sum(s1.cpu[p] - s0.cpu[p] for p in pids), 2),
        },
        "watch": {
            "watching": watching,
            "open_seconds": round(watch_s, 2),
            "snapshot_peers": snapshot_sizes,
            "errors": dict(watch_errors),
            "coordinator_cpu_s_to_open": round(sum(s2.cpu[p] - s1.cpu[p] for p in pids), 2),
        },
        "propagation": {
            "per_watcher": rb.lat_summary(per_watcher),
            "all_watchers": {**rb.lat_summary(all_watchers), "max_ms": round(max(all_watchers) * 1000, 1)}
            if all_watchers
            else {},
            "all_watchers_each_ms": [round(x * 1000, 1) for x in all_watchers],  # in probe order
            "register_rpc_each_ms": [round(x * 1000, 1) for x in register_rpc],
            "fan_out_each_ms": [round(x * 1000, 1) for x in fan_out],
            "probe_sent_utc": probe_wall,
            "missing": missing,
            "register_rpc": rb.lat_summary(register_rpc),
            "fan_out": rb.lat_summary(fan_out) if fan_out else {},
            "register_retries": dict(probe_retries),
        },
        "raft": {
            "term_after_register": term_registered,
            "elections_while_watchers_open": term_probes - term_registered,
            "elections_during_probes": term_end - term_probes,
        },
        "coordinators": {
            "rss_mib_before_watchers": [mib(s1.rss[p]) for p in pids],
            "rss_mib_with_watchers": [mib(s3.rss[p]) for p in pids],
            "rss_mib_per_1000_watchers": round(sum(mib(s3.rss[p] - s1.rss[p]) for p in pids) / k, 1),
            "idle_cpu_cores": round(cpu_cores(s2, s3), 3),
            "idle_cpu_cores_per_1000_watchers": round(cpu_cores(s2, s3) / k, 3),
            "probe_phase_cpu_cores": round(cpu_cores(s3, s4), 3),
            "cpu_s_per_probe": round(sum(s4.cpu[p] - s3.cpu[p] for p in pids) / max(1, cfg.probes), 3),
        },
    }
    p99 = report["propagation"]["all_watchers"].get("p99_ms", math.inf) / 1000
    report["target"] = {
        "all_watchers_p99_s_below": TARGET_P99_S,
        "pass": bool(missing == 0 and p99 < TARGET_P99_S and watching == cfg.nodes),
    }
    return report


def print_report(r: dict[str, Any]) -> None:
    prop, co = r["propagation"], r["coordinators"]
    aw = prop["all_watchers"]
    log("")
    log(f"control-plane benchmark: {r['watch']['watching']} watchers, {r['config']['probes']} probes")
    log(f"  registration          {r['register']['per_second']}/s ({r['register']['seconds']}s for all)")
    log(
        f"  streams open          {r['watch']['open_seconds']}s"
        f" (snapshots of {r['watch']['snapshot_peers']} peers)"
    )
    pw = prop["per_watcher"]
    log(
        f"  propagation, each     p50 {pw['p50_ms']} ms  p99 {pw['p99_ms']} ms"
        f"  (n={pw['n']}, missing {prop['missing']})"
    )
    if aw:
        log(f"  propagation, all      p50 {aw['p50_ms']} ms  p99 {aw['p99_ms']} ms  max {aw['max_ms']} ms")
    log(
        f"  Register RPC          p50 {prop['register_rpc']['p50_ms']} ms"
        f"  p99 {prop['register_rpc']['p99_ms']} ms"
    )
    if prop["fan_out"]:
        log(
            f"  fan-out (all - RPC)   p50 {prop['fan_out']['p50_ms']} ms  p99 {prop['fan_out']['p99_ms']} ms"
            "  (from the Register answer to the slowest watcher)"
        )
    log(f"  coordinator RSS       {co['rss_mib_before_watchers']} -> {co['rss_mib_with_watchers']} MiB")
    log(f"  memory per 1000 watchers  {co['rss_mib_per_1000_watchers']} MiB (three coordinators together)")
    log(
        f"  idle CPU per 1000 watchers  {co['idle_cpu_cores_per_1000_watchers']} cores;"
        f" CPU per probe {co['cpu_s_per_probe']} s"
    )
    rf = r["raft"]
    log(
        f"  Raft elections        {rf['elections_while_watchers_open']} while watchers opened/idled,"
        f" {rf['elections_during_probes']} during probes; probe Register retries {prop['register_retries']}"
    )
    verdict = "PASS" if r["target"]["pass"] else "FAIL"
    log(f"  target: every watcher sees a new node within {TARGET_P99_S:.0f} s at p99: {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    p.add_argument("--workers", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--probes", type=int, default=30, help="probe registrations measured (default 30)")
    p.add_argument("--probe-gap", type=float, default=1.0, help="seconds between probes (default 1)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement (default 10)")
    p.add_argument("--register-concurrency", type=int, default=8, help="Register calls in flight per worker")
    p.add_argument("--quick", action="store_true", help="200 nodes, 10 probes, 3 s idle (about a minute)")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.json and (problem := file_problem(args.json)):
        p.error(f"--json: {problem}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.quick:
        args.nodes, args.probes, args.idle = 200, 10, 3.0
    cfg = Config(
        args.nodes,
        max(1, args.workers),
        args.probes,
        args.probe_gap,
        args.idle,
        args.register_concurrency,
        args.keep,
    )
    tmp = Path(tempfile.mkdtemp(prefix="tm-bench-control-"))
    procs = rb.Processes()
    rc = 1
    try:
        report = asyncio.run(run(cfg, tmp, procs))
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            log(f"wrote {args.json}")
        rc = 0
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        rc = 130
    except (BenchError, TimeoutError) as exc:
        log(f"error: {exc!r}")
    finally:
        procs.stop_all()
        if cfg.keep or rc not in (0, 130):
            log(f"kept {tmp} (data dirs and logs)")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    return rc


if __name__ == "__main__":
    sys.exit(main())
