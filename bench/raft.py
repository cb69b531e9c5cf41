#!/usr/bin/env python3
"""Raft benchmark: a 3-coordinator TunnelMesh cluster vs a 3-member etcd cluster, side by side in one run.

Both clusters run on loopback (127.0.0.1, unique ports, data dirs in one temporary directory on the same
filesystem) and stay up for the whole run; the measurements are interleaved (each workload on etcd, then
straight after on TunnelMesh) so that load from anything else on the machine hits both alike. Per system:

* sequential write latency p50/p99: one client, N puts one after the other;
* write throughput with 1, 16 and 128 concurrent clients (each client has one request in flight), over a
  fixed window after a warm-up; latency p50/p99 under that load too;
* linearizable read latency p50/p99: one client, N reads of keys written before (etcd: ``Range`` with
  ``serializable=false``, its default; TunnelMesh: ``KvService.Get`` without ``stale``, a ReadIndex round);
* server CPU time per operation (utime+stime of the three server processes over the window).

Plus the fsync baseline of the filesystem the data dirs are on: a 4 KiB overwrite + ``fdatasync`` of a
preallocated file (what etcd's WAL does per Raft batch) and a one-row SQLite transaction in WAL mode with
``synchronous=FULL`` (what TunnelMesh's Raft store does per batch). Neither system can acknowledge a write
before one such sync on its leader and one on a follower (at best in parallel).

Read the ratios TunnelMesh / etcd, not the absolute numbers: latency ratios above 1 and throughput ratios
below 1 mean TunnelMesh is slower. Targets (issue 4 item 7): sequential write p50 within 1.5x etcd's and
throughput at 128 clients at least 0.5x etcd's; the run prints PASS/FAIL for each and never fails because
of them.

Fairness: both systems are driven by the same client stack, Python ``grpc.aio`` with protobuf stubs (for
etcd, stubs generated at start from ``bench/etcd_kv.proto`` into the temporary directory: no third-party
etcd library), and the clients run in separate processes (one per 64 clients) so the client's GIL does not
starve a server. Both are served over TLS (etcd with a certificate from a throwaway CA made at start, as a
production etcd would be), and the members of both replicate over mutual TLS. One difference remains,
against TunnelMesh: it checks a bearer token per operation, while etcd runs without auth. Each system is
driven through its own client API: etcd with one unary ``KV`` call per operation (it has no other), TunnelMesh
the way its client library sends KV operations, as messages on one ``KvService.Session`` stream per
connection (``--kv-api unary``: one unary call per operation instead, as etcd). Clients send to the
leader of each cluster (``--target follower`` or ``all``: to the followers, or to every member; followers
forward), over one TCP connection per 16 clients. The servers, the clients and everything else on the
machine share its CPUs: on a 2-core machine the Python coordinators
and etcd compete with the Python clients for the same cores, equally for both systems, and a saturated
client stack caps both (see the client CPU figures).

    python bench/raft.py [--quick] [--json FILE] [--repeat N] [--target leader|follower|all]
                         [--kv-api session|unary] [--profile DIR]

``--repeat N`` measures N rounds with the same clusters and reports the median of each figure (and each
round's ratios).

Needs ``/usr/bin/etcd`` (Debian ``etcd-server`` 3.4) and ``grpcio-tools``. ``--profile DIR`` adds one more
window at the highest concurrency, after the measured ones and not part of the figures (py-spy perturbs what
it samples), during which py-spy records every coordinator; it prints where their time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from output_paths import dir_problem, file_problem  # bench/, this script's directory

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path(__file__).resolve().with_name("etcd_kv.proto")
ETCD_BIN = "/usr/bin/etcd"
SYSTEMS = ("etcd", "tunnelmesh")
LABEL = {"etcd": "etcd", "tunnelmesh": "TunnelMesh"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
RPC_TIMEOUT = 10.0  # per request, both systems
CLIENTS_PER_PROC = 64
CLIENTS_PER_CONN = 16
READ_KEYS = 100
# Distinct channels must not share one TCP connection (gRPC's global subchannel pool would).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
WHAT = {"seq_put": "sequential writes", "seq_get": "linearizable reads"}
TARGET_SEQ_P50 = 1.5
TARGET_TPUT_128 = 0.5


class BenchError(Exception):
    """The benchmark cannot go on: the message says what failed and where its logs are."""


@dataclass(frozen=True, slots=True)
class Config:
    seq_writes: int
    reads: int
    warmup_ops: int
    duration: float
    warmup_s: float
    clients: tuple[int, ...]
    value_size: int
    target: str
    kv_api: str
    systems: tuple[str, ...]
    fsync_ops: int
    repeat: int
    profile: Path | None
    profile_native: bool
    keep: bool


def n_clients(n: int) -> str:
    return f"{n} client" if n == 1 else f"{n} clients"


def log(msg: str) -> None:
    print(msg, flush=True)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile of ``xs`` (q in 0..100); NaN for an empty list."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def lat_summary(seconds: list[float]) -> dict[str, float | int]:
    ms = [x * 1000 for x in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3) if ms else math.nan,
    }


# ----------------------------------------------------------------------------------------------------------
# Client side: one worker process drives one system (``--worker SPEC``); it talks JSON lines on stdout.
# ----------------------------------------------------------------------------------------------------------


class Ops:
    """``put``/``get`` on one channel of one system, with ``grpc.aio`` (the same stack for both): etcd's
    unary ``KV`` calls; TunnelMesh's ``KvService.Session`` (its client library's ``KvSession``) or, with
    ``--kv-api unary``, its unary calls."""

    def __init__(self, system: str, channel: Any, kv_api: str = "session") -> None:
        self.system = system
        self._session: Any = None
        if system == "etcd":
            import etcd_kv_pb2  # generated at bench start into the temp dir (on sys.path)
            import etcd_kv_pb2_grpc

            self._pb: Any = etcd_kv_pb2
            self._stub: Any = etcd_kv_pb2_grpc.KVStub(channel)
        else:
            from tunnelmesh.api.v1 import kv_pb2, kv_pb2_grpc

            self._pb = kv_pb2
            self._stub = kv_pb2_grpc.KvServiceStub(channel)
            if kv_api == "session":
                from tunnelmesh.client import KvSession

                self._session = KvSession(channel)

    async def put(self, key: bytes, value: bytes) -> None:
        async with _op_errors():
            if self.system == "etcd":
                await self._stub.Put(self._pb.PutRequest(key=key, value=value), timeout=RPC_TIMEOUT)
            elif self._session is not None:
                await self._session.put(key, value, request_id=key.decode(), timeout=RPC_TIMEOUT)
            else:
                req = self._pb.KvPutRequest(request_id=key.decode(), key=key, value=value)
                await self._stub.Put(req, timeout=RPC_TIMEOUT)

    async def get(self, key: bytes) -> bool:
        """Linearizable read; returns whether the key was found."""
        async with _op_errors():
            if self.system == "etcd":
                r = await self._stub.Range(self._pb.RangeRequest(key=key), timeout=RPC_TIMEOUT)
                return len(r.kvs) == 1
            if self._session is not None:
                return bool((await self._session.get(key, timeout=RPC_TIMEOUT)).found)
            r = await self._stub.Get(self._pb.KvGetRequest(key=key), timeout=RPC_TIMEOUT)
            return bool(r.found)


class OpFailed(Exception):
    """An operation failed with gRPC status ``code`` (a name), whichever API sent it."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@contextlib.asynccontextmanager
async def _op_errors() -> AsyncIterator[None]:
    import grpc

    from tunnelmesh.client import ClientError

    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise OpFailed(exc.code().name) from None
    except ClientError as exc:
        raise OpFailed(exc.code.name) from None


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _read_go(limit_s: float) -> float:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with asyncio.timeout(limit_s):
        line = (await reader.readline()).decode().split()
    if len(line) != 2 or line[0] != "go":
        raise BenchError(f"worker: expected 'go <t>' on stdin, got {line!r}")
    return float(line[1])


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


def _channel(spec: dict[str, Any], addr: str) -> Any:
    """Both over TLS: etcd with a certificate from a throwaway CA (``etcd_ca``), TunnelMesh with its cluster
    CA and c1's admin token (its public API has no plaintext port)."""
    import grpc

    if not spec.get("data_dir"):
        creds = grpc.ssl_channel_credentials(root_certificates=Path(spec["etcd_ca"]).read_bytes())
        return grpc.aio.secure_channel(addr, creds, options=CHANNEL_OPTIONS)
    from tunnelmesh.client import open_channel, resolve_profile

    profile = resolve_profile(coordinators=addr, data_dir=Path(spec["data_dir"]), env={})
    return open_channel(addr, ca_pem=profile.ca_pem, token=profile.token, options=CHANNEL_OPTIONS)


async def _worker(spec: dict[str, Any]) -> None:
    system, mode = spec["system"], spec["mode"]
    value = b"v" * spec["value_size"]
    prefix = spec["prefix"]
    channels = [_channel(spec, spec["endpoints"][i % len(spec["endpoints"])]) for i in range(spec["conns"])]
    try:
        async with asyncio.timeout(30):
            for ch in channels:
                await ch.channel_ready()
        ops = [Ops(system, ch, spec["kv_api"]) for ch in channels]
        read_keys = [f"{prefix}r{i}".encode() for i in range(READ_KEYS)]
        if mode == "seq_get":
            for k in read_keys:
                await ops[0].put(k, value)
        # Warm-up: every channel (connection) carries a few requests of the measured kind first.
        for i in range(spec["warmup_ops"]):
            op = ops[i % len(ops)]
            if mode == "seq_get":
                await op.get(read_keys[i % READ_KEYS])
            else:
                await op.put(f"{prefix}w{i}".encode(), value)
        emit(event="ready")
        t_go = await _read_go(120.0)
        await _sleep_until(t_go)
        if mode in ("seq_put", "seq_get"):
            await _sequential(spec, ops[0], read_keys, value)
        else:
            await _load(spec, ops, t_go, value)
    finally:
        for ch in channels:
            await ch.close()


async def _sequential(spec: dict[str, Any], op: Ops, read_keys: list[bytes], value: bytes) -> None:

    n, prefix = spec["count"], spec["prefix"]
    lat: list[float] = []
    errors: Counter[str] = Counter()
    missing = 0
    every = max(1, n // 5)
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        try:
            if spec["mode"] == "seq_get":
                missing += not await op.get(read_keys[i % READ_KEYS])
            else:
                await op.put(f"{prefix}s{i}".encode(), value)
        except OpFailed as exc:
            errors[exc.code] += 1
            await asyncio.sleep(0.05)
            continue
        lat.append(time.perf_counter() - t0)
        if (i + 1) % every == 0:
            emit(event="progress", done=i + 1, total=n)
    emit(
        event="result",
        lat=[round(x, 7) for x in lat],
        errors=dict(errors),
        missing=missing,
        client_cpu_s=time.process_time() - cpu0,
    )


async def _load(spec: dict[str, Any], ops: list[Ops], t_go: float, value: bytes) -> None:

    prefix = spec["prefix"]
    ms = t_go + spec["warmup_s"]
    me = ms + spec["duration"]
    lat: list[float] = []
    errors: Counter[str] = Counter()
    done = 0
    cpu: list[float] = []

    async def client(cid: int) -> None:
        nonlocal done
        op = ops[cid % len(ops)]
        i = 0
        while True:
            t0 = time.monotonic()
            if t0 >= me:
                return
            i += 1
            try:
                await op.put(f"{prefix}c{cid}-{i}".encode(), value)
            except OpFailed as exc:
                errors[exc.code] += 1
                await asyncio.sleep(0.05)
                continue
            t1 = time.monotonic()
            if ms <= t1 <= me:
                done += 1
                if t0 >= ms:
                    lat.append(t1 - t0)

    async def sample_cpu() -> None:
        await _sleep_until(ms)
        cpu.append(time.process_time())
        while time.monotonic() < me:
            await asyncio.sleep(min(1.0, max(0.0, me - time.monotonic())))
            emit(event="progress", done=done, elapsed=round(max(0.0, time.monotonic() - ms), 1))
        cpu.append(time.process_time())

    async with asyncio.timeout(me - time.monotonic() + RPC_TIMEOUT + 5), asyncio.TaskGroup() as tg:
        tg.create_task(sample_cpu())
        for cid in range(spec["clients"]):
            tg.create_task(client(cid))
    emit(
        event="result",
        count=done,
        lat=[round(x, 7) for x in lat],
        errors=dict(errors),
        client_cpu_s=cpu[1] - cpu[0],
    )


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    sys.path[:0] = [spec["gen_dir"], str(ROOT)]
    try:
        asyncio.run(_worker(spec))
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]  # a TaskGroup's error: report the first cause
        emit(event="error", error=f"{type(leaf).__name__}: {leaf}")
        raise SystemExit(1) from exc


# ----------------------------------------------------------------------------------------------------------
# Server side: processes, clusters, phases.
# ----------------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"    ({path} unreadable)"
    return "\n".join("    " + line for line in text)


class Processes:
    """Every process the benchmark starts; ``stop_all`` ends them by pid (TERM, then KILL after a grace)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self._files: list[IO[Any]] = []

    def spawn(self, argv: list[str], log_path: Path, **kw: Any) -> subprocess.Popen[Any]:
        out = log_path.open("ab")
        self._files.append(out)
        kw.setdefault("stdout", out)
        proc = subprocess.Popen(argv, stderr=out, start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen[Any]], grace: float = 5.0) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5.0)

    def stop_all(self) -> None:
        self.stop(self._procs)
        for f in self._files:
            f.close()


@dataclass
class Member:
    name: str
    client_addr: str
    proc: subprocess.Popen[Any]
    log_path: Path
    metrics_url: str = ""


def pick_endpoints(system: str, target: str, lead: str | None, members: list[Member]) -> list[str]:
    """Client connections go round-robin over the list returned: ``leader``: the leader only; ``follower``:
    the followers (writes and reads are forwarded); ``all``: followers first, then the leader, so a
    one-connection phase lands on a follower in both systems alike."""
    if lead is None:
        raise BenchError(f"{LABEL[system]}: no leader")
    followers = [m.client_addr for m in members if m.client_addr != lead]
    return {"leader": [lead], "follower": followers, "all": [*followers, lead]}[target]


class EtcdCluster:
    system = "etcd"

    def __init__(self, tmp: Path, procs: Processes) -> None:
        self.dir = tmp / "etcd"
        self.procs = procs
        self.members: list[Member] = []

    def version(self) -> str:
        if not Path(ETCD_BIN).exists():
            raise BenchError(f"{ETCD_BIN} not found: apt-get install etcd-server")
        out = subprocess.run([ETCD_BIN, "--version"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"etcd Version: (\S+)", out)
        return m.group(1) if m else "?"

    async def start(self, limit_s: float = 60.0) -> None:
        self.dir.mkdir(parents=True)
        cert, key = self._tls_files()
        ports = free_ports(9)
        names = [f"e{i + 1}" for i in range(3)]
        peer = {n: f"https://127.0.0.1:{ports[3 + i]}" for i, n in enumerate(names)}
        initial = ",".join(f"{n}={u}" for n, u in peer.items())
        token = f"bench-{os.getpid()}-{time.time_ns()}"
        for i, n in enumerate(names):
            client = f"https://127.0.0.1:{ports[i]}"
            metrics = f"http://127.0.0.1:{ports[6 + i]}"
            argv = [
                ETCD_BIN,
                f"--name={n}",
                f"--data-dir={self.dir / n}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--cert-file={cert}",
                f"--key-file={key}",
                f"--listen-metrics-urls={metrics}",
                f"--listen-peer-urls={peer[n]}",
                f"--initial-advertise-peer-urls={peer[n]}",
                f"--initial-cluster={initial}",
                f"--initial-cluster-token={token}",
                "--initial-cluster-state=new",
                # Members replicate over mutual TLS, as TunnelMesh's coordinators must (issue 4 item 3).
                f"--peer-cert-file={cert}",
                f"--peer-key-file={key}",
                f"--peer-trusted-ca-file={self.ca_file}",
                "--peer-client-cert-auth",
                "--logger=zap",
                "--log-level=warn",
            ]
            lp = self.dir / f"{n}.log"
            self.members.append(
                Member(n, f"127.0.0.1:{ports[i]}", self.procs.spawn(argv, lp), lp, f"{metrics}/metrics")
            )
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            self._check_alive()
            if await self.leader_addr() is not None:
                return
            await asyncio.sleep(0.2)
        raise BenchError(f"etcd: no leader within {limit_s:.0f}s; logs in {self.dir}")

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    def _tls_files(self) -> tuple[Path, Path]:
        """A throwaway CA and a certificate for 127.0.0.1 (server and client use): etcd is reached over TLS
        and its members authenticate each other with it, as TunnelMesh's coordinators do."""
        from tunnelmesh import pki

        ca = pki.create_ca("etcd-bench")
        ident = pki.issue_coordinator_identity(ca, "etcd-bench", "e", ip_addresses=["127.0.0.1"])
        self.ca_file.write_bytes(ca.certificate_pem)
        cert, key = self.dir / "server.crt", self.dir / "server.key"
        cert.write_bytes(ident.chain_pem)
        key.write_bytes(ident.private_key_pem())
        key.chmod(0o600)
        return cert, key

    def _check_alive(self) -> None:
        for m in self.members:
            if m.proc.poll() is not None:
                raise BenchError(f"etcd member {m.name} exited ({m.proc.returncode}):\n{tail(m.log_path)}")

    async def _metrics(self, m: Member) -> str:
        def get() -> str:
            with urllib.request.urlopen(m.metrics_url, timeout=2.0) as r:
                return str(r.read().decode())

        try:
            return await asyncio.to_thread(get)
        except OSError:
            return ""

    async def leader_addr(self) -> str | None:
        for m in self.members:
            if re.search(r"^etcd_server_is_leader 1$", await self._metrics(m), re.M):
                return m.client_addr
        return None

    async def endpoints(self, target: str) -> list[str]:
        return pick_endpoints(self.system, target, await self.leader_addr(), self.members)

    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.members]

    def pid_of(self, addr: str) -> int:
        return next(m.proc.pid for m in self.members if m.client_addr == addr)


class TunnelMeshCluster:
    """Three ``tunnelmesh coord`` processes: c1 bootstraps, c2 and c3 join through c1 (as coordlab does)."""

    system = "tunnelmesh"

    def __init__(self, tmp: Path, procs: Processes) -> None:
        self.dir = tmp / "tunnelmesh"
        self.procs = procs
        self.members: list[Member] = []

    def version(self) -> str:
        """Package version and the tree's git commit (``+dirty`` with uncommitted changes)."""
        sys.path.insert(0, str(ROOT))
        import tunnelmesh

        git = ["git", "-C", str(ROOT)]
        try:
            rev = subprocess.run(
                [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            )
            dirty = subprocess.run(
                [*git, "status", "--porcelain"], capture_output=True, text=True, timeout=10
            )
            commit = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.TimeoutExpired):
            commit = "?"
        return f"{getattr(tunnelmesh, '__version__', '?')} ({commit})"

    def _spawn(self, name: str, extra: list[str], env: dict[str, str] | None = None) -> Member:
        api, raft = free_ports(2)
        argv = [
            sys.executable,
            "-c",
            "from tunnelmesh.cli.main import main; main()",
            "--log-level",
            "warning",
            "coord",
            "--data-dir",
            str(self.dir / name),
            "--listen",
            f"127.0.0.1:{api}",
            "--raft-listen",
            f"127.0.0.1:{raft}",
            "--name",
            name,
            # Three coordinators share this host: no relay/HTTP ports (their defaults would collide).
            "--relay-listen",
            "off",
            "--http-listen",
            "off",
            *extra,
        ]
        lp = self.dir / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        m = Member(name, f"127.0.0.1:{api}", self.procs.spawn(argv, lp, cwd=ROOT, env=full_env), lp)
        self.members.append(m)
        return m

    @staticmethod
    def _check_alive(m: Member) -> None:
        if m.proc.poll() is not None:
            raise BenchError(f"coordinator {m.name} exited ({m.proc.returncode}):\n{tail(m.log_path)}")

    async def _wait_serving(self, m: Member, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive(m)
            if re.search(r"coordinator [0-9a-f]+ of cluster", m.log_path.read_text(errors="replace")):
                return
            await asyncio.sleep(0.1)
        raise BenchError(f"coordinator {m.name} not serving in time:\n{tail(m.log_path)}")

    async def start(self, limit_s: float = 90.0) -> None:
        self.dir.mkdir(parents=True)
        deadline = time.monotonic() + limit_s
        first = self._spawn("c1", ["--bootstrap"])
        await self._wait_serving(first, deadline)
        secret = (self.dir / "c1" / "join-secret").read_text().strip()
        # The join secret goes through the environment (TUNNELMESH_JOIN_SECRET), not argv.
        joiners = [
            self._spawn(n, ["--seed", first.client_addr], {"TUNNELMESH_JOIN_SECRET": secret})
            for n in ("c2", "c3")
        ]
        for m in joiners:
            await self._wait_serving(m, deadline)
        last = "no status"
        while time.monotonic() < deadline:
            for m in self.members:
                self._check_alive(m)
            try:
                st = await self._status()
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                voters = [x for x in st.members if x.role == 1]
                last = f"leader={st.leader_id!r} voters={len(voters)} members={len(st.members)}"
                if st.leader_id and len(voters) == 3:
                    return
            await asyncio.sleep(0.3)
        raise BenchError(f"TunnelMesh: 3 voters and a leader not reached in {limit_s:.0f}s ({last})")

    async def _status(self) -> Any:
        import grpc

        from tunnelmesh.api.v1 import admin_pb2, admin_pb2_grpc

        err: Exception | None = None
        for m in self.members:
            if m.proc.poll() is not None:
                continue
            async with _channel({"data_dir": str(self.dir / "c1")}, m.client_addr) as ch:
                try:
                    return await admin_pb2_grpc.AdminServiceStub(ch).GetClusterStatus(
                        admin_pb2.GetClusterStatusRequest(), timeout=3.0
                    )
                except grpc.aio.AioRpcError as exc:
                    err = exc
        raise BenchError(f"TunnelMesh: no coordinator answered GetClusterStatus ({err})")

    async def leader_addr(self) -> str | None:
        st = await self._status()
        lead = next((x for x in st.members if x.is_leader), None)
        return str(lead.info.api_address) if lead is not None else None

    async def endpoints(self, target: str) -> list[str]:
        return pick_endpoints(self.system, target, await self.leader_addr(), self.members)

    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.members]

    def pid_of(self, addr: str) -> int:
        return next(m.proc.pid for m in self.members if m.client_addr == addr)


Cluster = EtcdCluster | TunnelMeshCluster


def generate_etcd_stubs(tmp: Path) -> Path:
    gen = tmp / "gen"
    gen.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO.parent}",
        f"--python_out={gen}",
        f"--grpc_python_out={gen}",
        str(PROTO),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise BenchError(f"protoc failed on {PROTO}:\n{r.stderr}")
    return gen


def fsync_baseline(directory: Path, n: int) -> dict[str, Any]:
    """Cost of one durable batch on this filesystem, as each store does it (after ``n // 2`` untimed)."""
    d = directory / "fsync"
    d.mkdir()
    block = os.urandom(4096)

    def timed(fn: Callable[[int], None]) -> dict[str, float | int]:
        for i in range(n // 2):
            fn(i)
        lat = []
        for i in range(n // 2, n // 2 + n):
            t0 = time.perf_counter()
            fn(i)
            lat.append(time.perf_counter() - t0)
        return lat_summary(lat)

    out: dict[str, Any] = {}
    # etcd's WAL: a preallocated 64 MB segment; each batch is written and fdatasync'ed.
    fd = os.open(d / "wal.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, (2 * n + 1) * len(block))
        os.fsync(fd)

        def wal(i: int) -> None:
            os.pwrite(fd, block, i * len(block))
            os.fdatasync(fd)

        out["fdatasync_4k_prealloc"] = timed(wal)
    finally:
        os.close(fd)
    # The same into a growing file (each sync also commits the new size: an ext4 journal commit).
    fd = os.open(d / "append.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:

        def append(i: int) -> None:
            os.write(fd, block)
            os.fdatasync(fd)

        out["fdatasync_4k_append"] = timed(append)
    finally:
        os.close(fd)
    # TunnelMesh's Raft store: SQLite, WAL mode, synchronous=FULL, one transaction per batch.
    db = sqlite3.connect(d / "raft.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE entries (idx INTEGER PRIMARY KEY, term INTEGER, data BLOB)")

        def commit(i: int) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO entries VALUES (?, 1, ?)", (i + 1, block[:256]))
            db.execute("COMMIT")

        out["sqlite_wal_full_commit"] = timed(commit)
    finally:
        db.close()
    return out


@dataclass
class Worker:
    proc: subprocess.Popen[Any]
    stderr_path: Path
    reader: threading.Thread | None = None


class PhaseRunner:
    """Runs one workload on one system: spawns the client workers, starts them together, samples CPU over the
    measured window, collects and summarizes their results."""

    def __init__(
        self, cfg: Config, tmp: Path, gen: Path, procs: Processes, clusters: dict[str, Cluster]
    ) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.gen = gen
        self.procs = procs
        self.clusters = clusters
        self.seq = 0
        self.run_id = f"{time.time_ns():x}"  # keys and request ids never repeat (a repeated id is a no-op)

    def _spawn_worker(self, spec: dict[str, Any]) -> Worker:
        self.seq += 1
        err = self.tmp / f"worker-{self.seq}.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        proc = self.procs.spawn(argv, err, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        return Worker(proc, err)

    @staticmethod
    def _start_reader(
        w: Worker, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[tuple[int, Any]], i: int
    ) -> None:
        def run() -> None:
            assert w.proc.stdout is not None
            try:
                for raw in w.proc.stdout:
                    try:
                        ev = json.loads(raw)
                    except ValueError:
                        continue
                    loop.call_soon_threadsafe(q.put_nowait, (i, ev))
                loop.call_soon_threadsafe(q.put_nowait, (i, {"event": "eof"}))
            except RuntimeError:
                pass  # the event loop is gone (the run was interrupted): nobody is listening

        w.reader = threading.Thread(target=run, name=f"worker-reader-{i}", daemon=True)
        w.reader.start()

    async def run(
        self, system: str, mode: str, clients: int, *, duration: float | None = None, profile: bool = False
    ) -> dict[str, Any]:
        """One phase (``duration`` overrides the window: a warm-up; ``profile``: py-spy the servers)."""
        cfg = self.cfg if duration is None else dataclasses.replace(self.cfg, duration=duration)
        cluster = self.clusters[system]
        tag = f"[{system}]"
        endpoints = await cluster.endpoints(cfg.target)
        seq_mode = mode in ("seq_put", "seq_get")
        count = cfg.reads if mode == "seq_get" else cfg.seq_writes
        nprocs = 1 if seq_mode else max(1, math.ceil(clients / CLIENTS_PER_PROC))
        shares = [clients // nprocs + (1 if i < clients % nprocs else 0) for i in range(nprocs)]
        workers: list[Worker] = []
        for i, share in enumerate(shares):
            spec = {
                "system": system,
                "mode": mode,
                "endpoints": endpoints,
                "gen_dir": str(self.gen),
                "clients": share,
                "conns": max(1, math.ceil(share / CLIENTS_PER_CONN)),
                "count": count,
                "warmup_ops": cfg.warmup_ops,
                "warmup_s": cfg.warmup_s,
                "duration": cfg.duration,
                "value_size": cfg.value_size,
                "kv_api": cfg.kv_api,
                "prefix": f"bench/{self.run_id}/{mode}/{clients}/{self.seq}/{i}/",
                "data_dir": str(cluster.dir / "c1") if isinstance(cluster, TunnelMeshCluster) else "",
                "etcd_ca": str(cluster.ca_file) if isinstance(cluster, EtcdCluster) else "",
            }
            workers.append(self._spawn_worker(spec))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        for i, w in enumerate(workers):
            self._start_reader(w, loop, q, i)
        # Every phase has a deadline: generous, but a hung cluster ends the run with its logs kept.
        budget = 120.0 + (count * 0.5 if seq_mode else cfg.warmup_s + cfg.duration + RPC_TIMEOUT)
        what = WHAT.get(mode, n_clients(clients))
        try:
            async with asyncio.timeout(budget):
                return await self._drive(cfg, system, mode, clients, workers, q, tag, what, profile)
        except TimeoutError:
            raise BenchError(f"{tag} {what}: no result within {budget:.0f}s") from None
        finally:
            self.procs.stop([w.proc for w in workers], grace=2.0)
            for w in workers:
                if w.reader is not None:
                    w.reader.join(5.0)

    async def _next(
        self, q: asyncio.Queue[tuple[int, Any]], workers: list[Worker], finished: Collection[int] = ()
    ) -> tuple[int, Any]:
        """The next event of any worker; a worker that ends without its result is an error."""
        while True:
            i, ev = await q.get()
            if not (ev["event"] == "eof" and i in finished):
                break
        if ev["event"] in ("eof", "error"):
            w = workers[i]
            detail = ev.get("error") or f"exited ({w.proc.poll()})"
            raise BenchError(f"client worker {i} failed: {detail}\n{tail(w.stderr_path)}")
        return i, ev

    async def _drive(
        self,
        cfg: Config,
        system: str,
        mode: str,
        clients: int,
        workers: list[Worker],
        q: asyncio.Queue[tuple[int, Any]],
        tag: str,
        what: str,
        profile: bool,
    ) -> dict[str, Any]:
        ready = 0
        while ready < len(workers):
            _, ev = await self._next(q, workers)
            ready += ev["event"] == "ready"
        other = [s for s in self.clusters if s != system]
        cluster = self.clusters[system]
        lead = await cluster.leader_addr()
        names = [m.name + (" (leader)" if m.client_addr == lead else "") for m in cluster.members]
        server_pids = cluster.pids()
        idle_pids = [p for s in other for p in self.clusters[s].pids()]
        t_go = time.monotonic() + 0.2
        for w in workers:
            assert w.proc.stdin is not None
            w.proc.stdin.write(f"go {t_go!r}\n".encode())
            w.proc.stdin.flush()
        seq_mode = mode in ("seq_put", "seq_get")
        win_start = t_go if seq_mode else t_go + cfg.warmup_s
        cpu: dict[str, float] = {}
        cpu_each: dict[str, list[float]] = {}

        async def sample(at: float | None, key: str) -> None:
            if at is not None:
                await _sleep_until(at)
            cpu[key + "_t"] = time.monotonic()
            cpu_each[key] = [cpu_seconds(p) for p in server_pids]
            cpu[key + "_srv"] = sum(cpu_each[key])
            cpu[key + "_idle"] = sum(cpu_seconds(p) for p in idle_pids)

        results: dict[int, Any] = {}
        profile_files: asyncio.Task[list[str]] | None = None
        # The samplers and the profiler are owned by this group: an error in the phase cancels them.
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(sample(win_start, "start"))
                if not seq_mode:
                    tg.create_task(sample(win_start + cfg.duration, "end"))
                if profile and cfg.profile is not None:
                    profile_files = tg.create_task(self._profile(cfg, system, win_start, clients))
                progress: dict[int, int] = {}
                while len(results) < len(workers):
                    i, ev = await self._next(q, workers, results)
                    if ev["event"] == "result":
                        results[i] = ev
                    elif ev["event"] == "progress":
                        if seq_mode:
                            log(f"{tag} {what} {ev['done']}/{ev['total']}")
                        else:
                            progress[i] = ev["done"]
                            if i == 0:
                                done = sum(progress.values())
                                log(f"{tag} {what}: {ev['elapsed']:.0f}/{cfg.duration:.0f} s, {done} ops")
                if seq_mode:
                    await sample(None, "end")
        except* BenchError as eg:
            raise eg.exceptions[0] from None  # one plain error for the caller (the group cancelled the rest)
        lat = [x for r in results.values() for x in r["lat"]]
        errors: Counter[str] = Counter()
        for r in results.values():
            errors.update(r["errors"])
        window = cpu["end_t"] - cpu["start_t"]
        srv = cpu["end_srv"] - cpu["start_srv"]
        out: dict[str, Any] = {**lat_summary(lat), "errors": dict(errors)}
        if seq_mode:
            ops = len(lat)
            out["ops_per_s"] = round(ops / sum(lat), 1) if lat else 0.0
        else:
            ops = sum(r["count"] for r in results.values())
            out["ops_per_s"] = round(ops / cfg.duration, 1)
            out["clients"] = clients
            out["client_procs"] = len(workers)
        if mode == "seq_get":
            out["not_found"] = sum(r["missing"] for r in results.values())
        out["server_cpu_cores"] = round(srv / window, 2) if window > 0 else math.nan
        out["server_cpu_ms_per_op"] = round(srv * 1000 / ops, 3) if ops else math.nan
        out["client_cpu_cores"] = round(sum(r["client_cpu_s"] for r in results.values()) / window, 2)
        out["idle_cluster_cpu_cores"] = round((cpu["end_idle"] - cpu["start_idle"]) / window, 2)
        out["server_cpu_cores_each"] = {
            name: round((b - a) / window, 2)
            for name, a, b in zip(names, cpu_each["start"], cpu_each["end"], strict=True)
        }
        if profile_files is not None and profile_files.result():
            out["profiles"] = profile_files.result()
        return out

    async def _profile(self, cfg: Config, system: str, at: float, clients: int) -> list[str]:
        """py-spy every member over the measured window (only samples holding the GIL: where Python burns
        CPU); returns the raw (collapsed stacks) files, the leader's first."""
        assert cfg.profile is not None
        exe = shutil.which("py-spy")
        if exe is None:
            log("[profile] py-spy not found (pip install py-spy); skipping")
            return []
        cluster = self.clusters[system]
        lead = await cluster.leader_addr()
        cfg.profile.mkdir(parents=True, exist_ok=True)
        members = sorted(cluster.members, key=lambda m: m.client_addr != lead)
        await _sleep_until(at)
        runs = []
        for m in members:
            role = "leader" if m.client_addr == lead else "follower"
            out = cfg.profile / f"{system}-{m.name}-{role}-{clients}c.txt"
            argv = [exe, "record", "--pid", str(m.proc.pid), "--duration", str(max(1, int(cfg.duration)))]
            argv += ["--rate", "100", "--gil", "--format", "raw", "--output", str(out)]
            # --native must pause the process for each sample; otherwise sample without stopping it.
            argv.append("--native" if cfg.profile_native else "--nonblocking")
            runs.append((self.procs.spawn(argv, self.tmp / "py-spy.log"), out))
        for p, _ in runs:
            try:
                await asyncio.to_thread(p.wait, cfg.duration + 30)
            except subprocess.TimeoutExpired:
                self.procs.stop([p])
        return [str(out) for _, out in runs if out.exists()]


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """From py-spy's collapsed stacks: the self time per line (where the GIL is held, including gRPC's C
    core, which shows up as ``Handle._run`` / ``UnaryUnaryCall._invoke``) and the inclusive time per
    TunnelMesh function (which of our code paths are expensive)."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [re.sub(r" \(/.*?/(?:site-packages|main)/", " (", f) for f in stack.split(";")]
        total += int(n)
        self_c[frames[-1]] += int(n)
        funcs = {re.sub(r":\d+\)$", ")", f) for f in frames}
        for f in funcs:
            if "tunnelmesh/" in f and "tunnelmesh/cli/" not in f and not f.startswith("run_coordinator "):
                incl[f] += int(n)
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; self time:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    lines.append("inclusive time in TunnelMesh functions:")
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return lines


# ----------------------------------------------------------------------------------------------------------
# Orchestration and report.
# ----------------------------------------------------------------------------------------------------------

ROWS: list[tuple[str, str, Callable[[dict[str, Any]], float | None]]] = [
    ("sequential write p50 (ms)", "seq_write_p50", lambda r: r.get("seq_put", {}).get("p50_ms")),
    ("sequential write p99 (ms)", "seq_write_p99", lambda r: r.get("seq_put", {}).get("p99_ms")),
    ("linearizable read p50 (ms)", "read_p50", lambda r: r.get("seq_get", {}).get("p50_ms")),
    ("linearizable read p99 (ms)", "read_p99", lambda r: r.get("seq_get", {}).get("p99_ms")),
]


def _load_field(clients: int, key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(r: dict[str, Any]) -> float | None:
        v = r.get("throughput", {}).get(str(clients), {}).get(key)
        return None if v is None else float(v)

    return get


def table_rows(cfg: Config) -> list[tuple[str, str, Callable[[dict[str, Any]], float | None]]]:
    rows = list(ROWS)
    for c in cfg.clients:
        n = n_clients(c)
        rows.append((f"write throughput, {n} (ops/s)", f"tput_{c}", _load_field(c, "ops_per_s")))
        rows.append((f"  write p99 under load, {n} (ms)", f"load_p99_{c}", _load_field(c, "p99_ms")))
        rows.append(
            (
                f"  server CPU per write, {n} (ms)",
                f"cpu_per_op_{c}",
                _load_field(c, "server_cpu_ms_per_op"),
            )
        )
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


async def bench(cfg: Config, tmp: Path, procs: Processes) -> dict[str, Any]:
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
            "data_dir_fs": _fs_type(tmp),
        },
        "config": {
            "seq_writes": cfg.seq_writes,
            "reads": cfg.reads,
            "warmup_ops": cfg.warmup_ops,
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup_s,
            "clients": list(cfg.clients),
            "value_size": cfg.value_size,
            "target": cfg.target,
            "kv_api": cfg.kv_api,
            "repeat": cfg.repeat,
            "clients_per_process": CLIENTS_PER_PROC,
            "clients_per_connection": CLIENTS_PER_CONN,
        },
        "note": (
            "servers and client processes share the same CPUs, equally for both systems; clients use "
            "grpc.aio for both (etcd: unary KV calls; TunnelMesh: see config.kv_api); ratios are "
            "TunnelMesh / etcd"
        ),
        "results": {},
        "errors": {},
    }
    m = report["machine"]
    log(
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), load {m['loadavg_start'][0]:.2f}, "
        f"data dirs on {m['data_dir_fs']} in {tmp}"
    )
    log(
        "note: both clusters, and the Python clients driving them, share these CPUs equally; clients run in "
        f"separate processes ({CLIENTS_PER_PROC} clients each), both systems via grpc.aio"
    )
    api = "KvService.Session streams" if cfg.kv_api == "session" else "unary KvService calls"
    log(f"API: etcd unary KV calls (its only KV API); TunnelMesh {api} (--kv-api {cfg.kv_api})")
    gen = generate_etcd_stubs(tmp)
    log(f"[fsync] baseline, {cfg.fsync_ops} syncs each ...")
    report["fsync"] = await asyncio.to_thread(fsync_baseline, tmp, cfg.fsync_ops)
    for line in fsync_lines(report["fsync"]):
        log(f"[fsync] {line}")
    clusters: dict[str, Cluster] = {}
    for system in cfg.systems:
        cl: Cluster = EtcdCluster(tmp, procs) if system == "etcd" else TunnelMeshCluster(tmp, procs)
        log(f"[{system}] starting 3 members ...")
        t0 = time.monotonic()
        try:
            report.setdefault("versions", {})[system] = cl.version()
            await cl.start()
        except (BenchError, ImportError) as exc:
            report["errors"][system] = f"start: {exc}"
            log(f"[{system}] FAILED to start: {exc}")
            procs.stop([m.proc for m in cl.members])  # members that did start would only steal CPU
            continue
        clusters[system] = cl
        log(f"[{system}] up in {time.monotonic() - t0:.1f}s, leader {await cl.leader_addr()}")
    runner = PhaseRunner(cfg, tmp, gen, procs, clusters)
    live = dict(clusters)
    rounds: list[dict[str, dict[str, Any]]] = []  # per round: system -> figures
    report["rounds"] = rounds

    async def each(step: str, fn: Callable[[str], Awaitable[None]]) -> None:
        for s in list(live):
            try:
                await fn(s)
            except BenchError as exc:
                report["errors"][s] = f"{step}: {exc}"
                log(f"[{s}] FAILED in {step}: {exc}")
                procs.stop([m.proc for m in live.pop(s).members])  # the other system goes on alone

    async def warm(s: str) -> None:
        log(f"[{s}] warm-up: 16 clients for {cfg.warmup_s + 1:.0f} s")
        await runner.run(s, "load_put", 16, duration=1.0)

    async def seq_put(s: str) -> None:
        r = rounds[-1][s]["seq_put"] = await runner.run(s, "seq_put", 1)
        log(f"[{s}] sequential write p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, errors {r['errors']}")

    async def seq_get(s: str) -> None:
        r = rounds[-1][s]["seq_get"] = await runner.run(s, "seq_get", 1)
        log(
            f"[{s}] linearizable read p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, errors {r['errors']}"
        )

    await each("warm-up", warm)
    for n in range(cfg.repeat):
        if cfg.repeat > 1:
            log(f"--- round {n + 1}/{cfg.repeat}")
        rounds.append({s: {} for s in live})
        await each("sequential writes", seq_put)
        await each("linearizable reads", seq_get)
        for c in cfg.clients:

            async def load(s: str, c: int = c) -> None:
                r = rounds[-1][s].setdefault("throughput", {})[str(c)] = await runner.run(s, "load_put", c)
                log(
                    f"[{s}] {n_clients(c)}: {r['ops_per_s']:,.0f} writes/s, p50 {r['p50_ms']:.2f} ms, p99 "
                    f"{r['p99_ms']:.2f} ms, server CPU {r['server_cpu_cores']:.2f} cores "
                    f"{r['server_cpu_cores_each']}, client CPU "
                    f"{r['client_cpu_cores']:.2f} cores, errors {r['errors']}"
                )

            await each(n_clients(c), load)
    # The figures are the medians over the rounds (each round's own figures stay in "rounds").
    res = report["results"] = {s: median_merge([r.get(s) for r in rounds]) or {} for s in clusters}
    if cfg.profile is not None and "tunnelmesh" in live:
        c = max(cfg.clients)

        async def profiled(s: str) -> None:
            if s == "tunnelmesh":
                log(f"[{s}] profiling window (not in the figures): {c} clients, py-spy on every coordinator")
                res[s]["profiled_window"] = await runner.run(s, "load_put", c, profile=True)

        await each("profiling", profiled)
    report["machine"]["loadavg_end"] = os.getloadavg()
    _ratios_and_targets(cfg, report)
    return report


def median_merge(items: list[Any]) -> Any:
    """The median of each number over several rounds' result dicts (recursively); other values: the first."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    if all(isinstance(x, dict) for x in items):
        keys = dict.fromkeys(k for x in items for k in x)
        return {k: median_merge([x.get(k) for x in items]) for k in keys}
    nums = [x for x in items if isinstance(x, int | float) and not isinstance(x, bool)]
    if len(nums) == len(items):
        finite = [x for x in nums if not math.isnan(x)]
        return statistics.median(finite) if finite else math.nan
    return items[0]


def _ratios_and_targets(cfg: Config, report: dict[str, Any]) -> None:
    res = report["results"]
    e, t = res.get("etcd", {}), res.get("tunnelmesh", {})
    rows = table_rows(cfg)
    report["ratios"] = {key: ratio(fn(t), fn(e)) for _, key, fn in rows}
    report["round_ratios"] = [
        {key: ratio(fn(r.get("tunnelmesh", {})), fn(r.get("etcd", {}))) for _, key, fn in rows}
        for r in report["rounds"]
    ]
    r = report["ratios"]
    seq = r.get("seq_write_p50")
    tput = r.get("tput_128")
    report["targets"] = [
        {
            "target": f"sequential write p50 within {TARGET_SEQ_P50}x etcd's",
            "ratio": seq,
            "pass": None if seq is None else seq <= TARGET_SEQ_P50,
        },
        {
            "target": f"throughput at 128 clients at least {TARGET_TPUT_128}x etcd's",
            "ratio": tput,
            "pass": None if tput is None else tput >= TARGET_TPUT_128,
        },
    ]


def print_report(cfg: Config, report: dict[str, Any]) -> None:
    res = report["results"]
    e, t = res.get("etcd", {}), res.get("tunnelmesh", {})
    v = report.get("versions", {})
    head = f"etcd {v.get('etcd', '')}".strip()
    many = len(report["rounds"]) > 1
    log("")
    if many:
        log(f"medians over {len(report['rounds'])} rounds; the last column: TM/etcd of each round")
    log(f"{'':44} {head:>12} {'TunnelMesh':>12} {'TM/etcd':>9}" + ("  per round" if many else ""))
    for name, key, fn in table_rows(cfg):
        rt = report["ratios"].get(key)
        line = f"{name:44} {fmt(fn(e)):>12} {fmt(fn(t)):>12} {(f'{rt:.2f}x' if rt is not None else '-'):>9}"
        if many:
            each = [rr.get(key) for rr in report["round_ratios"]]
            line += "  " + " ".join(f"{x:.2f}" if x is not None else "-" for x in each)
        log(line)
    log("fsync baseline, the data dirs' filesystem (one durable batch; a write needs one on the leader and")
    log("one on a follower, in parallel):")
    for line in fsync_lines(report["fsync"]):
        log(f"  {line}")
    log("latency ratio > 1 / throughput ratio < 1: TunnelMesh slower. Server CPU = the measured cluster's")
    log("3 processes; both clusters and all clients share the machine's CPUs equally.")
    if many:
        log("targets are judged on the medians")
    for tg in report["targets"]:
        verdict = "n/a" if tg["pass"] is None else ("PASS" if tg["pass"] else "FAIL")
        rt = f"{tg['ratio']:.2f}x" if tg["ratio"] is not None else "-"
        log(f"target: {tg['target']}: {rt} -> {verdict}")
    for s, err in report["errors"].items():
        lines = err.splitlines()
        log(f"error [{s}]: " + "\n  ".join(lines[:1] + lines[-3:] if len(lines) > 4 else lines))
    for s in res:
        for prof in res[s].get("profiled_window", {}).get("profiles", []):
            log(f"\npy-spy --gil, {LABEL[s]} {Path(prof).stem}:")
            for line in summarize_profile(Path(prof)):
                log("  " + line)


FSYNC_NAMES = {
    "fdatasync_4k_prealloc": "4 KiB write + fdatasync, preallocated (etcd WAL)",
    "fdatasync_4k_append": "4 KiB append + fdatasync, growing file",
    "sqlite_wal_full_commit": "SQLite WAL synchronous=FULL commit (TunnelMesh)",
}


def fsync_lines(f: dict[str, Any]) -> list[str]:
    return [f"{FSYNC_NAMES[k]:50} p50 {v['p50_ms']:6.2f} ms  p99 {v['p99_ms']:6.2f} ms" for k, v in f.items()]


def _json_safe(x: Any) -> Any:
    """NaN (a figure with no samples) becomes null: strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _fs_type(path: Path) -> str:
    best, fs = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{parts[2]} ({parts[0]})"
    return fs


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run like Ctrl-C does: through the finally blocks that stop every process."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure and ratio as JSON")
    p.add_argument("--quick", action="store_true", help="fewer operations and shorter windows (~1 min)")
    p.add_argument(
        "--seq-writes", type=int, metavar="N", help="sequential writes measured (default 1000, quick 200)"
    )
    p.add_argument(
        "--reads", type=int, metavar="N", help="linearizable reads measured (default 1000, quick 200)"
    )
    p.add_argument(
        "--duration", type=float, metavar="S", help="throughput window in seconds (default 5, quick 2)"
    )
    p.add_argument(
        "--clients", default="1,16,128", metavar="LIST", help="concurrency levels (default 1,16,128)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="measurement rounds; figures are medians (default 1)",
    )
    p.add_argument("--value-size", type=int, default=128, metavar="BYTES", help="value bytes (default 128)")
    p.add_argument(
        "--target",
        choices=("leader", "follower", "all"),
        default="leader",
        help="where clients connect: the leader (default), the followers, or every member",
    )
    p.add_argument(
        "--kv-api",
        choices=("session", "unary"),
        default="session",
        help="how TunnelMesh's clients send operations: on a KvService.Session stream, as its client library "
        "does (default), or one unary call each, as etcd's",
    )
    p.add_argument(
        "--systems", default="etcd,tunnelmesh", metavar="LIST", help="which systems (default both)"
    )
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the coordinators in an extra window")
    p.add_argument("--profile-native", action="store_true", help="with --profile: C frames too (slower)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, logs)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag, problem in (
        ("--json", args.json and file_problem(args.json)),
        ("--profile", args.profile and dir_problem(args.profile)),
    ):
        if problem:
            p.error(f"{flag}: {problem}")
    try:
        args.clients = tuple(int(c) for c in args.clients.split(","))
    except ValueError:
        args.clients = ()
    if not args.clients or min(args.clients) < 1:
        p.error("--clients: a comma-separated list of client counts, e.g. 1,16,128")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    if any(s not in SYSTEMS for s in systems):
        raise SystemExit(f"--systems: choose from {','.join(SYSTEMS)}")
    q = args.quick
    cfg = Config(
        seq_writes=args.seq_writes or (200 if q else 1000),
        reads=args.reads or (200 if q else 1000),
        warmup_ops=50 if q else 100,
        duration=args.duration or (2.0 if q else 5.0),
        warmup_s=0.5 if q else 1.0,
        clients=args.clients,
        value_size=args.value_size,
        target=args.target,
        kv_api=args.kv_api,
        systems=systems,
        fsync_ops=100 if q else 300,
        repeat=max(1, args.repeat),
        profile=args.profile.resolve() if args.profile else None,
        profile_native=args.profile_native,
        keep=args.keep,
    )
    tmp = Path(tempfile.mkdtemp(prefix="tm-bench-raft-"))
    procs = Processes()
    rc = 0
    try:
        with _terminate_on_sigterm():
            report = asyncio.run(bench(cfg, tmp, procs))
        print_report(cfg, report)
        if args.json:
            args.json.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
            log(f"wrote {args.json}")
        rc = 1 if report["errors"] else 0
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        rc = 130
    except BenchError as exc:
        log(f"error: {exc}")
        rc = 1
    finally:
        procs.stop_all()
        if cfg.keep or rc not in (0, 130):
            log(f"kept {tmp} (data dirs and logs)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
