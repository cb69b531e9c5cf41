"""The coordinator's HTTP port (``--http-listen``): metrics, health, readiness and the WebSocket relay.

* ``GET /metrics``: Prometheus text format from a ``CollectorRegistry`` (the process default registry).
* ``GET /healthz``: 200 while the process serves HTTP at all (liveness).
* ``GET /readyz``: 200 when a Raft leader is known and this member's applied state is current, else 503 with
  the reason (readiness: a load balancer should not send nodes here yet).
* ``GET /relay``: WebSocket relay for networks that block UDP. Each binary message is exactly one relay frame
  of the UDP port (``coord/relay.py``): the first must be a valid ``RELAY_HELLO`` (the connection is then the
  node's binding), later ones hellos or ``RELAY_DATA``. Frames to a connection go through a bounded queue and
  one writer task with a send deadline, so a slow client loses its own frames (counted) and never blocks the
  hub or other nodes; a client that stays silent for a binding lifetime is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Final

from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import REGISTRY, CollectorRegistry

from tunnelmesh.coord.raft.driver import DriverStatus
from tunnelmesh.coord.relay import BINDING_TTL, RelayHub

log = logging.getLogger(__name__)

WS_QUEUE: Final = 256  # frames waiting for one WebSocket client; beyond that they are dropped
WS_SEND_TIMEOUT: Final = 5.0  # a client that takes longer to accept one frame is closed
WS_HELLO_TIMEOUT: Final = 10.0  # the first frame (a hello) must come within this
WS_MAX_MESSAGE: Final = 65536
WS_CLOSE_TIMEOUT: Final = 2.0
READY_LAG: Final = 64  # applied entries may trail the commit index by this much and still count as current

# (ready, reason) for /readyz.
Readiness = Callable[[], tuple[bool, str]]


class _WsSink:
    """One WebSocket connection as a relay binding target: frames are queued, never awaited by the hub."""

    transport = "ws"

    def __init__(self, ws: web.WebSocketResponse, hub: RelayHub, maxsize: int) -> None:
        self.ws = ws
        self._hub = hub
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize)

    def send(self, frame: bytes) -> bool:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self._hub.count_drop("ws_queue_full")
            return False
        return True

    async def write_loop(self, send_timeout: float) -> None:
        while True:
            frame = await self.queue.get()
            try:
                async with asyncio.timeout(send_timeout):
                    await self.ws.send_bytes(frame)
            except (TimeoutError, ConnectionError, RuntimeError) as exc:
                # Too slow or gone: close it; the client reconnects (or fails over) on its own.
                self._hub.count_drop("ws_send_failed")
                log.info("event=relay_ws_closed reason=send_failed error=%r", type(exc).__name__)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(WS_CLOSE_TIMEOUT):
                        await self.ws.close()
                return


class HttpServer:
    """The aiohttp app on ``listen`` ("host:port"); ``hub=None`` disables ``/relay``."""

    def __init__(
        self,
        listen: str,
        *,
        hub: RelayHub | None,
        ready: Readiness,
        registry: CollectorRegistry = REGISTRY,
        ws_queue: int = WS_QUEUE,
        ws_send_timeout: float = WS_SEND_TIMEOUT,
        ws_idle_timeout: float = BINDING_TTL,
    ) -> None:
        self.listen = listen
        self.hub = hub
        self._ready = ready
        self._registry = registry
        self._ws_queue = ws_queue
        self._ws_send_timeout = ws_send_timeout
        self._ws_idle_timeout = ws_idle_timeout
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/metrics", self._metrics),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/relay", self._relay),
            ]
        )

    @property
    def port(self) -> int:
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    async def start(self, *, sock: socket.socket | None = None) -> None:
        """Listen on ``listen`` (or on ``sock``, e.g. one made inside a netlab namespace)."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        if sock is not None:
            self._site = web.SockSite(self._runner, sock)
        else:
            host, _, port = self.listen.rpartition(":")
            self._site = web.TCPSite(self._runner, host.strip("[]") or "0.0.0.0", int(port))
        await self._site.start()
        log.info("event=http_listening addr=%s", self.listen if sock is None else f"sock:{self.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    # -- handlers ------------------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        # On the loop thread: collectors such as the relay hub's read state that only this thread changes.
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, reason = self._ready()
        return web.Response(text=f"{'ready' if ok else 'not ready'}: {reason}\n", status=200 if ok else 503)

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        hub = self.hub
        if hub is None:
            raise web.HTTPNotFound(text="the relay is disabled on this coordinator\n")
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, heartbeat=None)
        await ws.prepare(request)
        sink = _WsSink(ws, hub, self._ws_queue)
        peer = request.remote or "?"
        key: bytes | None = None
        async with asyncio.TaskGroup() as tg:
            writer = tg.create_task(sink.write_loop(self._ws_send_timeout), name="relay-ws-writer")
            try:
                key = await self._read_loop(ws, sink, hub, peer)
            finally:
                if key is not None:
                    hub.unbind(key, sink)
                writer.cancel()
                if not ws.closed:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(WS_CLOSE_TIMEOUT):
                            await ws.close()
        return ws

    async def _read_loop(
        self, ws: web.WebSocketResponse, sink: _WsSink, hub: RelayHub, peer: str
    ) -> bytes | None:
        key: bytes | None = None
        first = True
        while not ws.closed:
            timeout = WS_HELLO_TIMEOUT if first else self._ws_idle_timeout
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                hub.count_drop("ws_idle" if not first else "ws_no_hello")
                log.info("event=relay_ws_closed peer=%s reason=%s", peer, "idle" if not first else "no_hello")
                return key
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return key
            if msg.type != WSMsgType.BINARY:
                hub.count_drop("ws_not_binary")
                await ws.close(code=1003, message=b"binary relay frames only")
                return key
            key = hub.handle_ws(msg.data, sink, key)
            if first:
                first = False
                if key is None:
                    log.info("event=relay_ws_closed peer=%s reason=hello_refused", peer)
                    await ws.close(code=1008, message=b"the first frame must be an accepted relay hello")
                    return None
        return key


def driver_readiness(status: Callable[[], DriverStatus]) -> Readiness:
    """/readyz from a Raft ``Driver.status``: a leader is known and applied trails commit by <= READY_LAG."""

    def ready() -> tuple[bool, str]:
        st = status()
        leader, commit, applied = st.leader_id, st.commit, st.applied
        if leader == 0:
            return False, "no raft leader known"
        if commit - applied > READY_LAG:
            return False, f"applied index {applied} trails commit {commit}"
        return True, f"leader {leader:016x} applied {applied} commit {commit}"

    return ready
