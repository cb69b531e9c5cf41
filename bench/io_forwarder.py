"""The data plane's I/O ceiling before crypto: a plain TUN <-> UDP forwarder with and without offloads.

Builds two network namespaces joined by veth (the integration test's topology), runs the test's forwarder
(TUN read -> segment -> UDP GSO send -> UDP GRO receive -> coalesce -> TUN write, no crypto) with each tunnel
end in its own process, as two nodes would be (``--one-process`` puts both under one GIL, like the test), and
measures one iperf3 TCP stream through it, side by side in one run with:

* ``raw``               iperf3 straight over the veth pair (the kernel's ceiling),
* ``plain``             no virtio_net_hdr, no GSO/GRO: one syscall per packet each way,
* ``offload``           TSO reads, full checksums computed in Python, UDP GSO/GRO, coalesced TUN writes,
* ``offload-skip-csum`` the same with payload checksums skipped (negotiated TunnelMesh peers only),
* ``kernel-seg``        no TUN TSO: the kernel segments and checksums, we batch plain reads into GSO sends;
                        receive side as ``offload`` (the candidate toward stock WireGuard peers).

Ratios are what to read: absolute numbers depend on whatever else the machine is running. Needs root.
``--micro`` instead prints the CPU cost per packet of the offload helpers (no root needed), to compare with
~1.3 us per ChaCha20-Poly1305 call.

    python bench/io_forwarder.py [--seconds 5] [--modes raw,plain,offload,...] [--repeat 1]
    python bench/io_forwarder.py --micro
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.test_tun_offload import (  # noqa: E402 - needs the repo root on sys.path first
    TUN_B,
    VETH_B,
    Forwarder,
    Stats,
    Topology,
    close_topology,
    make_topology,
    netns_pair,
)

MODES = ("raw", "plain", "offload", "offload-skip-csum", "kernel-seg")


def iperf3(ns_a: str, ns_b: str, dst: str, seconds: float) -> float:
    """One TCP stream from ns A to ``dst`` in ns B for ``seconds``; returns received bits per second."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, "iperf3", "-s", "-1", "-p", "5299"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while (
            "5299"
            not in subprocess.run(
                ["ip", "netns", "exec", ns_b, "ss", "-ltnH"], capture_output=True, text=True
            ).stdout
        ):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        client = subprocess.run(
            ["ip", "netns", "exec", ns_a, "iperf3", "-c", dst, "-p", "5299", "-t", str(seconds), "-J"],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        report = json.loads(client.stdout)
        if "error" in report or "sum_received" not in report.get("end", {}):
            raise RuntimeError(f"iperf3 to {dst}: {report.get('error', 'no result')}")
        return float(report["end"]["sum_received"]["bits_per_second"])
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)


def run_mode(mode: str, seconds: float, *, one_process: bool = False) -> tuple[float, Stats | None]:
    with netns_pair() as (ns_a, ns_b):
        if mode == "raw":
            return iperf3(ns_a, ns_b, VETH_B, seconds), None
        offload = mode != "plain"
        skip = mode == "offload-skip-csum"
        topo = make_topology(ns_a, ns_b, offload=offload, tso=mode != "kernel-seg")
        try:
            if one_process:
                with Forwarder(topo.a, topo.b, offload=offload, skip_csum=skip) as fwd:
                    bps = iperf3(ns_a, ns_b, TUN_B, seconds)
                stats = fwd.stats
            else:
                bps, stats = _split(topo, offload, skip, lambda: iperf3(ns_a, ns_b, TUN_B, seconds))
            if stats.errors:
                raise RuntimeError(f"forwarder errors in {mode}: {stats.errors[:3]}")
            return bps, stats
        finally:
            close_topology(topo)


def _split(topo: Topology, offload: bool, skip: bool, measure: Callable[[], float]) -> tuple[float, Stats]:
    """Run side B's forwarder in a forked process, as two nodes would: each end gets its own GIL."""
    ctx = multiprocessing.get_context("fork")  # the child inherits the TUN and socket descriptors
    stop = ctx.Event()
    parent_end, child_end = ctx.Pipe()

    def child() -> None:
        with Forwarder(topo.b, offload=offload, skip_csum=skip) as fwd:
            stop.wait()
        child_end.send(dataclasses.asdict(fwd.stats))

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    try:
        with Forwarder(topo.a, offload=offload, skip_csum=skip) as fwd:
            bps = measure()
    finally:
        stop.set()
    theirs = parent_end.recv() if parent_end.poll(15) else {}
    proc.join(10)
    merged = fwd.stats
    for key, value in theirs.items():
        mine = getattr(merged, key)
        if isinstance(value, int):
            setattr(merged, key, mine + value)
        elif isinstance(value, list):
            mine.extend(value)
        elif isinstance(value, dict):
            mine.update(value)
    return bps, merged


def micro() -> None:
    """CPU microseconds per 1388-byte segment (one 64 KB TCP super-packet), best of several rounds."""
    import random
    import struct

    from tunnelmesh.node import offload as o

    payload = random.Random(1).randbytes(64000 - 52)
    ip = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 52 + len(payload), 1, 0x4000, 64, 6, 0, b"\n\0\0\1", b"\n\0\0\2"
    )
    tcp = (
        struct.pack(">HHIIBBHHH", 1000, 2000, 1, 1, 8 << 4, o.TCP_ACK, 500, 0, 0)
        + bytes([1, 1, 8, 10])
        + bytes(8)
    )
    pkt = ip + tcp + payload
    hdr = o.VirtioNetHdr(o.VNET_HDR_F_NEEDS_CSUM, o.VNET_HDR_GSO_TCPV4, 52, 1388, 20, o.TCP_CSUM_OFFSET)
    segs = o.segment(hdr, pkt)
    cases = {
        "segment (full checksums)": lambda: o.segment(hdr, pkt),
        "segment (skip payload csum)": lambda: o.segment(hdr, pkt, payload_csum=False),
        "coalesce": lambda: o.coalesce(segs),
        "coalesce (verify_csum)": lambda: o.coalesce(segs, verify_csum=True),
        "ones_sum of one segment x N": lambda: [o.ones_sum(s) for s in segs],
    }
    for name, fn in cases.items():
        best = min(_cpu(fn, 20) for _ in range(7))
        print(f"{name:<30}{best / len(segs) * 1e6:7.2f} us per segment")


def _cpu(fn: object, rounds: int) -> float:
    assert callable(fn)
    t0 = time.thread_time()
    for _ in range(rounds):
        fn()
    return (time.thread_time() - t0) / rounds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the median is reported")
    ap.add_argument("--micro", action="store_true", help="per-packet CPU cost of the offload helpers only")
    ap.add_argument("--one-process", action="store_true", help="both tunnel ends in this process (one GIL)")
    args = ap.parse_args()
    if args.micro:
        micro()
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    results: dict[str, list[float]] = {m: [] for m in modes}
    stats: dict[str, Stats | None] = {}
    for _ in range(args.repeat):
        for m in modes:  # interleaved, so background load hits every mode alike
            bps, st = run_mode(m, args.seconds, one_process=args.one_process)
            results[m].append(bps)
            stats[m] = st
    med = {m: sorted(v)[len(v) // 2] for m, v in results.items()}
    base = med.get("plain")
    print(f"{'mode':<20}{'Gbit/s':>8}{'x plain':>9}{'x raw':>8}  segs/read  dgrams/TUN write")
    for m in modes:
        st = stats[m]
        detail = ""
        if st is not None and st.tun_reads and st.tun_writes:
            detail = f"  {st.segments / st.tun_reads:9.1f}  {st.datagrams / st.tun_writes:16.1f}"
        vs_plain = f"{med[m] / base:9.2f}" if base else f"{'-':>9}"
        vs_raw = f"{med[m] / med['raw']:8.3f}" if "raw" in med else f"{'-':>8}"
        print(f"{m:<20}{med[m] / 1e9:8.2f}{vs_plain}{vs_raw}{detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
