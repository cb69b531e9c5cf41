"""A test node for tests/integration/test_relay.py: a real ``DataPlane`` (TUN) whose one peer is reached only
through the coordinators' relay, via a ``RelayClient`` virtual endpoint. Runs inside a netlab host:

    python -m tests.integration.relay_node --spec SPEC.json --status STATUS.json

SPEC: {"private_key": b64, "iface": str, "address": "10.x/24", "peer_key": b64, "peer_ip": "10.x/32",
"transport": "udp"|"ws", "hello_interval": float, "coordinators": [{"id", "relay_udp_address",
"relay_ws_url", "relay_public_key": hex}]}. Prints "relay-node ready" once the peer is configured, writes
its status (relay client + data plane peers) to STATUS every 0.3 s, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from tunnelmesh.api.v1 import common_pb2
from tunnelmesh.node.dataplane import DataPlane, InterfaceConfig, PeerConfig
from tunnelmesh.node.relay_client import RelayClient

READY_DEADLINE = 30.0


async def run(spec: dict[str, Any], status_path: Path) -> None:
    key = base64.b64decode(spec["private_key"])
    peer_key = base64.b64decode(spec["peer_key"])
    transport = spec["transport"]
    plane = DataPlane(
        InterfaceConfig(
            private_key=key,
            name=spec["iface"],
            addresses=(spec["address"],),
            # Plain type-4 transport frames, so the test can tell what the relay carried.
            skip_checksums=False,
        )
    )
    # pyroute2's synchronous IPRoute runs its own event loop: keep it off ours (as the agent must).
    await asyncio.to_thread(plane.start)
    client = RelayClient(key, plane.listen_port, hello_interval=float(spec.get("hello_interval", 15.0)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await client.start()
        client.set_coordinators(
            [
                common_pb2.CoordinatorInfo(
                    id=c["id"],
                    relay_udp_address=c.get("relay_udp_address", ""),
                    relay_ws_url=c.get("relay_ws_url", ""),
                    relay_public_key=bytes.fromhex(c["relay_public_key"]),
                )
                for c in spec["coordinators"]
            ]
        )
        if not await client.wait_available(transport, READY_DEADLINE):
            raise SystemExit(
                f"no coordinator acknowledged a {transport} relay hello in {READY_DEADLINE:.0f}s"
            )
        endpoint = client.endpoint_for(peer_key, transport)
        peer = PeerConfig(peer_key, (spec["peer_ip"],), endpoint=endpoint, persistent_keepalive=5)
        await asyncio.to_thread(plane.add_peer, peer)
        print(f"relay-node ready endpoint={endpoint[0]}:{endpoint[1]}", flush=True)
        while not stop.is_set():
            status = {
                "relay": client.status(),
                "peers": [p.to_json() for p in plane.peers()],
                "listen_port": plane.listen_port,
            }
            tmp = status_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(status))
            os.replace(tmp, status_path)
            try:
                async with asyncio.timeout(0.3):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        await client.stop()
        await asyncio.to_thread(plane.stop)
    print("relay-node stopped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--status", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(json.loads(args.spec.read_text()), args.status))


if __name__ == "__main__":
    main()
