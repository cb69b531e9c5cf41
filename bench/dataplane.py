#!/usr/bin/env python3
"""Data plane benchmark: TunnelMesh vs Debian's wireguard-go vs the raw veth, side by side in one run.

Two netlab namespaces on one LAN. For each path - (a) ``veth``: iperf3 straight over the link, (b)
``wireguard-go``: two Debian ``wireguard-go`` peers configured with ``wg``, (c) ``tunnelmesh``: two
``tunnelmesh dataplane up`` processes - it measures iperf3 TCP with 1 and 4 streams, ping RTT (one first
ping, which on a fresh tunnel carries the handshake and is reported apart as ``first_ping_ms``, then 100
pings at 10 ms intervals: their mean is ``ping_ms``) and the CPU each tunnel process used per side, then the
single stream again with 1 % random
loss on the link (netlab ``set_loss``, both directions). Ratios TunnelMesh / wireguard-go and TunnelMesh /
veth are what to read; absolute numbers depend on what else the machine runs.

Fairness: Debian's wireguard-go keeps the system's default UDP buffers, so it is started with
``net.core.rmem_default``/``wmem_default`` raised to 4 MiB (restored afterwards, also on failure). TunnelMesh
raises its own buffers (``SO_*BUFFORCE``).

    sudo python bench/dataplane.py [--duration 5] [--repeat 1] [--loss 1.0] [--json FILE]
    sudo python bench/dataplane.py --ping-only --repeat 5   # latency rounds only, same setup

``ping_cpu`` is the CPU % each tunnel process used during the ping run (what idle-time latency costs), and
``quiet_cpu`` the same over the second right after it, with no traffic (TunnelMesh's warm wake-ups). With
``--repeat`` it also prints (and writes as ``round_ratios``) TunnelMesh / wireguard-go of each round: the
rounds interleave the paths, so their spread shows how much of a median ratio is the machine's noise.

Needs root, iperf3, wireguard-go and wg.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from output_paths import file_problem  # noqa: E402 - bench/, this script's directory

from tunnelmesh.netlab import Lab  # noqa: E402 - needs the repo root on sys.path first
from tunnelmesh.netlab.topology import Host  # noqa: E402

TUN_A, TUN_B = "10.203.0.1", "10.203.0.2"
PORT = 51820
MTU = 1420
SYSCTLS = ("net.core.rmem_default", "net.core.wmem_default")
FAIR_BUFFER = 4 << 20
QUIET_WINDOW = 1.0  # seconds of CPU measured right after the ping run


def genkey() -> tuple[str, str]:
    key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    pub = subprocess.run(
        ["wg", "pubkey"], input=key, capture_output=True, text=True, check=True
    ).stdout.strip()
    return key, pub


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads, to the nanosecond (schedstat; ``stat`` counts in 10 ms ticks,
    too coarse for a second of pinging)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def iperf3(client: Host, server: Host, dst: str, seconds: float, streams: int) -> float:
    srv = server.spawn(["iperf3", "-s", "-1", "-p", "5301"], name=f"iperf-{time.monotonic_ns()}")
    try:
        server.wait_listening(5301, timeout=10)
        out = client.run(
            ["iperf3", "-c", dst, "-p", "5301", "-t", str(seconds), "-P", str(streams), "-J"],
            timeout=seconds + 40,
            check=False,
        ).stdout
        report = json.loads(out)
        if "error" in report:
            raise RuntimeError(f"iperf3 to {dst}: {report['error']}")
        return float(report["end"]["sum_received"]["bits_per_second"])
    finally:
        srv.stop()


def first_ping_ms(client: Host, dst: str) -> float:
    """One ping; on a tunnel nobody used yet it waits for the handshake (both systems start one on demand)."""
    out = client.run(["ping", "-c", "1", "-W", "5", dst], timeout=30).stdout
    m = re.search(r"time=([\d.]+) ms", out)
    if not m:
        raise RuntimeError(f"ping {dst}: no reply in {out!r}")
    return float(m.group(1))


def ping_ms(client: Host, dst: str, count: int = 100) -> float:
    out = client.run(["ping", "-q", "-c", str(count), "-i", "0.01", "-W", "2", dst], timeout=60).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    if not m:
        raise RuntimeError(f"ping {dst}: no summary in {out!r}")
    return float(m.group(1))


@contextmanager
def fair_sysctls() -> Iterator[None]:
    saved = {
        k: subprocess.run(["sysctl", "-n", k], capture_output=True, text=True, check=True).stdout.strip()
        for k in SYSCTLS
    }
    try:
        for k in SYSCTLS:
            subprocess.run(["sysctl", "-q", "-w", f"{k}={FAIR_BUFFER}"], check=True)
        yield
    finally:
        for k, v in saved.items():
            subprocess.run(["sysctl", "-q", "-w", f"{k}={v}"], check=False)


class Path_:
    """A path under test: start/stop and the pids whose CPU counts."""

    name = ""
    dst = ""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pids(self) -> list[int]:
        return []


class Veth(Path_):
    name = "veth"

    def __init__(self, a: Host, b: Host) -> None:
        self.dst = b.ip


class WireguardGo(Path_):
    name = "wireguard-go"
    dst = TUN_B

    def __init__(self, lab: Lab, a: Host, b: Host, workdir: Path) -> None:
        self.lab, self.a, self.b, self.workdir = lab, a, b, workdir
        self.procs: list[Any] = []
        self.sysctl = fair_sysctls()

    def start(self) -> None:
        self.sysctl.__enter__()
        (ka, pa), (kb, pb) = genkey(), genkey()
        for host, key, ip, peer_pub, peer_ip, peer_tun in (
            (self.a, ka, TUN_A, pb, self.b.ip, TUN_B),
            (self.b, kb, TUN_B, pa, self.a.ip, TUN_A),
        ):
            for k in SYSCTLS:  # in case this kernel keeps them per namespace
                host.run(["sysctl", "-q", "-w", f"{k}={FAIR_BUFFER}"], check=False)
            iface = f"wg{self.lab.id}{host.name}"
            keyfile = self.workdir / f"{iface}.key"
            keyfile.write_text(key + "\n")
            keyfile.chmod(0o600)
            proc = host.spawn(
                ["wireguard-go", "-f", iface], name=f"wggo-{time.monotonic_ns()}", env={"LOG_LEVEL": "error"}
            )
            deadline = time.monotonic() + 10
            while host.run(["ip", "link", "show", iface], check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"wireguard-go did not create {iface}: {proc.log_text()[-500:]}")
                time.sleep(0.05)
            host.run(["wg", "set", iface, "private-key", str(keyfile), "listen-port", str(PORT)])
            host.run(
                [
                    "wg",
                    "set",
                    iface,
                    "peer",
                    peer_pub,
                    "endpoint",
                    f"{peer_ip}:{PORT}",
                    "allowed-ips",
                    f"{peer_tun}/32",
                ]
            )
            host.run(["ip", "addr", "add", f"{ip}/24", "dev", iface])
            host.run(["ip", "link", "set", iface, "mtu", str(MTU), "up"])
            self.procs.append(proc)

    def stop(self) -> None:
        try:
            for p in self.procs:
                p.stop()
        finally:
            self.sysctl.__exit__(None, None, None)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


class TunnelMesh(Path_):
    name = "tunnelmesh"
    dst = TUN_B

    def __init__(self, lab: Lab, a: Host, b: Host, workdir: Path) -> None:
        self.lab, self.a, self.b, self.workdir = lab, a, b, workdir
        self.procs: list[Any] = []

    def start(self) -> None:
        (ka, pa), (kb, pb) = genkey(), genkey()
        env = {"TUNNELMESH_RUN_DIR": str(self.workdir / "run"), "PYTHONPATH": str(ROOT)}
        for host, key, ip, peer_pub, peer_ip, peer_tun in (
            (self.a, ka, TUN_A, pb, self.b.ip, TUN_B),
            (self.b, kb, TUN_B, pa, self.a.ip, TUN_A),
        ):
            iface = f"tm{self.lab.id}{host.name}"
            conf = self.workdir / f"{iface}.conf"
            conf.write_text(
                f"[Interface]\nPrivateKey = {key}\nListenPort = {PORT}\nAddress = {ip}/24\nMTU = {MTU}\n\n"
                f"[Peer]\nPublicKey = {peer_pub}\nEndpoint = {peer_ip}:{PORT}\nAllowedIPs = {peer_tun}/32\n"
            )
            conf.chmod(0o600)
            proc = host.spawn(
                [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf)],
                name=f"tm-{time.monotonic_ns()}",
                env=env,
            )
            proc.wait_for_log(r"interface \S+ up", timeout=20)
            self.procs.append(proc)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def measure(path: Path_, a: Host, b: Host, seconds: float, ping_only: bool = False) -> dict[str, Any]:
    res: dict[str, Any] = {}
    pids = path.pids()
    before = [cpu_seconds(p) for p in pids]
    res["first_ping_ms"] = first_ping_ms(a, path.dst)
    t0 = time.monotonic()
    res["ping_ms"] = ping_ms(a, path.dst)
    if pids:  # what idle-time latency costs (e.g. busy polling): CPU % per side during the ping run
        elapsed = time.monotonic() - t0
        res["ping_cpu"] = [
            round(100 * (cpu_seconds(p) - x) / elapsed, 1) for p, x in zip(pids, before, strict=True)
        ]
        # ... and in the quiet second after it (TunnelMesh's warm wake-ups: docs/dataplane.md, Latency)
        before, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
        time.sleep(QUIET_WINDOW)
        elapsed = time.monotonic() - t0
        res["quiet_cpu"] = [
            round(100 * (cpu_seconds(p) - x) / elapsed, 1) for p, x in zip(pids, before, strict=True)
        ]
    for streams in () if ping_only else (1, 4):
        pids = path.pids()
        before = [cpu_seconds(p) for p in pids]
        t0 = time.monotonic()
        bps = iperf3(a, b, path.dst, seconds, streams)
        elapsed = time.monotonic() - t0
        after = [cpu_seconds(p) for p in pids]
        res[f"tcp{streams}_gbps"] = bps / 1e9
        if pids:
            res[f"tcp{streams}_cpu"] = [
                round(100 * (y - x) / elapsed, 1) for x, y in zip(before, after, strict=True)
            ]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all paths; the median is reported")
    ap.add_argument("--loss", type=float, default=1.0, help="percent loss for the lossy run (0: skip it)")
    ap.add_argument("--paths", default="veth,wireguard-go,tunnelmesh")
    ap.add_argument(
        "--ping-only",
        action="store_true",
        help="same setup and ping, no iperf3 (quick latency rounds; combine with --repeat)",
    )
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.json_path and (problem := file_problem(Path(args.json_path))):
        ap.error(f"--json: {problem}")
    if os.geteuid() != 0:
        print("needs root (network namespaces, TUN devices, sysctl)", file=sys.stderr)
        return 2
    names = [n for n in args.paths.split(",") if n]
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp, Lab(log_dir=Path(tmp) / "logs") as lab:
        work = Path(tmp)
        lan = lab.lan("l", "10.202.0.0/24")
        a, b = lab.host("a", lan), lab.host("b", lan)
        makers: dict[str, Callable[[], Path_]] = {
            "veth": lambda: Veth(a, b),
            "wireguard-go": lambda: WireguardGo(lab, a, b, work),
            "tunnelmesh": lambda: TunnelMesh(lab, a, b, work),
        }
        for r in range(args.repeat):
            for n in names:  # interleaved, so background load hits every path alike
                path = makers[n]()
                path.start()
                try:
                    time.sleep(0.5)
                    res = measure(path, a, b, args.duration, args.ping_only)
                    if args.loss > 0 and not args.ping_only:
                        lab.set_loss(a, args.loss)
                        try:
                            res["loss_tcp1_gbps"] = iperf3(a, b, path.dst, args.duration, 1) / 1e9
                        finally:
                            lab.set_loss(a, 0)
                finally:
                    path.stop()
                rounds[n].append(res)
                print(f"round {r + 1} {n}: {json.dumps(res)}", flush=True)
    summary = {n: _median(v) for n, v in rounds.items()}
    ratios = _ratios(summary)
    per_round = _round_ratios(rounds)
    _print(summary, ratios, args, per_round)
    if args.json_path:
        Path(args.json_path).write_text(
            json.dumps(
                {
                    "duration": args.duration,
                    "loss_percent": args.loss,
                    "rounds": rounds,
                    "median": summary,
                    "ratios": ratios,
                    "round_ratios": per_round,
                },
                indent=2,
            )
        )
    return 0


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in results[0]:
        vals = [r[key] for r in results if key in r]
        if isinstance(vals[0], list):  # CPU per side: the round whose single-stream figure is the median
            out[key] = vals[len(vals) // 2]
        else:
            out[key] = statistics.median(vals)
    return out


FIGURES = ("tcp1_gbps", "tcp4_gbps", "ping_ms", "first_ping_ms", "loss_tcp1_gbps")


def _ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    tm = summary.get("tunnelmesh")
    out: dict[str, dict[str, float]] = {}
    if not tm:
        return out
    for other in ("wireguard-go", "veth"):
        if other in summary:
            out[f"tunnelmesh/{other}"] = {
                k: round(tm[k] / summary[other][k], 3) for k in FIGURES if k in tm and summary[other].get(k)
            }
    return out


def _round_ratios(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """TunnelMesh / wireguard-go of each figure in each round (the rounds interleave the paths, so round r
    of both ran under the same background): how much of a median ratio is noise."""
    tm, wg = rounds.get("tunnelmesh"), rounds.get("wireguard-go")
    if not tm or not wg:
        return {}
    out = {
        k: [round(a[k] / b[k], 2) for a, b in zip(tm, wg, strict=False) if k in a and b.get(k)]
        for k in FIGURES
    }
    return {k: v for k, v in out.items() if v}


def _print(
    summary: dict[str, dict[str, Any]],
    ratios: dict[str, dict[str, float]],
    args: argparse.Namespace,
    per_round: dict[str, list[float]],
) -> None:
    print()
    print(
        f"{'path':<14}{'1 stream':>10}{'4 streams':>11}{'ping ms':>9}{'1st ping':>10}"
        f"{f'{args.loss:g}% loss':>10}"
        f"   CPU % per side (1 stream | 4 streams | ping | quiet 1 s after)"
    )
    for n, r in summary.items():
        cpu = ""
        if "tcp1_cpu" in r:
            cpu = f"   {'/'.join(map(str, r['tcp1_cpu']))} | {'/'.join(map(str, r['tcp4_cpu']))}"
        if "ping_cpu" in r:
            cpu += f"{'   ' if not cpu else ' | '}ping {'/'.join(map(str, r['ping_cpu']))}"
        if "quiet_cpu" in r:
            cpu += f" | quiet {'/'.join(map(str, r['quiet_cpu']))}"
        loss = f"{r['loss_tcp1_gbps']:10.3f}" if "loss_tcp1_gbps" in r else f"{'-':>10}"
        tcp = "".join(
            f"{r[k]:{w}.3f}" if k in r else f"{'-':>{w}}" for k, w in (("tcp1_gbps", 10), ("tcp4_gbps", 11))
        )
        print(f"{n:<14}{tcp}{r['ping_ms']:9.3f}{r['first_ping_ms']:10.3f}{loss}{cpu}")
    print("(throughput in Gbit/s; ping: mean of 100 after the 1st, which carries a fresh tunnel's handshake)")
    for name, vals in ratios.items():
        print(f"{name:<26}" + "  ".join(f"{k}={v:.2f}" for k, v in vals.items()))
    if len(next(iter(per_round.values()), [])) > 1:
        print(
            "tunnelmesh/wireguard-go per round: "
            + "  ".join(f"{k}={'/'.join(map(str, v))}" for k, v in per_round.items())
        )


if __name__ == "__main__":
    sys.exit(main())
