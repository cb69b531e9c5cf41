"""``KvService.Session`` probes, run as a process inside a netlab host (see test_kv_session.py).

    python kv_session_probe.py API concurrent N        -> {"answered": ..., "wrong": [...], "seconds": ...}
    python kv_session_probe.py API raw REQUESTS_JSON   -> {"answers": [...], "code": "OK"|..., "details": ...}
    python kv_session_probe.py API raw-open REQUESTS_JSON  -> the same without half-closing
    python kv_session_probe.py API revoke TOKEN        -> {"before": ..., "after": ...}
    python kv_session_probe.py URL metrics             -> {"op/code": count} (tunnelmesh_kv_session_...)

``concurrent``: the client library's ``KvSession``: N puts at once on one stream, then N gets at once; every
get must return its own put's value. ``raw``: the generated stub, no client library: sends each request (JSON
of ``KvSessionRequest``) on one stream, half-closes, and reads answers until the stream ends. The CA and API
token come from ``TUNNELMESH_CA`` and ``TUNNELMESH_API_TOKEN``. ``revoke``: a session with API token TOKEN
puts once, then the environment's (admin) token revokes TOKEN, and the same session keeps putting until an
operation fails (at most 10 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tunnelmesh.api.v1 import kv_pb2, kv_pb2_grpc
from tunnelmesh.client import SESSION_READY_HEADER, Client, ClientError, KvSession, open_channel
from tunnelmesh.tokens import ApiToken


def _ca() -> bytes:
    return Path(os.environ["TUNNELMESH_CA"]).read_bytes()


def _channel(api: str) -> grpc.aio.Channel:
    return open_channel(api, ca_pem=_ca(), token=os.environ.get("TUNNELMESH_API_TOKEN") or None)


async def concurrent(api: str, n: int) -> dict[str, Any]:
    async with _channel(api) as ch:
        s = KvSession(ch)
        t0 = time.monotonic()
        keys = [f"c/{i}".encode() for i in range(n)]
        await asyncio.gather(*(s.put(k, b"v" + k) for k in keys))
        got = await asyncio.gather(*(s.get(k) for k in keys))
        wrong = [k.decode() for k, g in zip(keys, got, strict=True) if g.value != b"v" + k]
        await s.close()
        return {"answered": len(got), "wrong": wrong, "seconds": time.monotonic() - t0}


async def raw(api: str, requests: list[dict[str, Any]], half_close: bool = True) -> dict[str, Any]:
    async with _channel(api) as ch:
        token = os.environ.get("TUNNELMESH_API_TOKEN")
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        call = kv_pb2_grpc.KvServiceStub(ch).Session(metadata=metadata)
        # As docs/api.md says: wait for the coordinator to accept the stream before writing.
        if SESSION_READY_HEADER in tuple(await call.initial_metadata() or ()):
            try:
                for r in requests:
                    await call.write(json_format.ParseDict(r, kv_pb2.KvSessionRequest()))
                if half_close:
                    await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the coordinator ended the stream early (a broken protocol): its status is read below
        answers = []
        code, details = "OK", ""
        try:
            async with asyncio.timeout(20):
                while isinstance(resp := await call.read(), kv_pb2.KvSessionResponse):
                    answers.append(json_format.MessageToDict(resp))
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        return {"answers": answers, "code": code, "details": details}


async def revoke(api: str, token: str) -> dict[str, Any]:
    ca = _ca()
    async with open_channel(api, ca_pem=ca, token=token) as ch:
        s = KvSession(ch)
        before = (await s.put(b"revoke/0", b"x")).revision
        async with Client([api], ca_pem=ca, token=os.environ["TUNNELMESH_API_TOKEN"]) as admin:
            await admin.revoke_api_token(ApiToken.parse(token).token_id)
        after: dict[str, Any] = {}
        end = time.monotonic() + 10
        i = 0
        while not after and time.monotonic() < end:
            i += 1
            try:
                await s.put(f"revoke/{i}".encode(), b"x")
            except ClientError as exc:
                after = {"code": exc.code.name, "detail": str(exc), "puts_after_revoke": i - 1}
        await s.close()
        return {"before": before, "after": after}


_COUNTERS = ("tunnelmesh_kv_session_operations_total{", "tunnelmesh_kv_sessions_broken_total{")


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(
            ("tunnelmesh_kv_session_operations_total{", "tunnelmesh_kv_sessions_broken_total{")
        ):
            labels, _, value = line.rpartition(" ")
            pairs = dict(p.split("=", 1) for p in labels.split("{", 1)[1].rstrip("}").split(","))
            labels_ = {k: v.strip('"') for k, v in pairs.items()}
            key = f"{labels_['op']}/{labels_['code']}" if "op" in labels_ else labels_["reason"]
            out[key] = float(value)
        elif line.startswith("tunnelmesh_kv_sessions "):
            out["open"] = float(line.split()[1])
    return out


def main() -> None:
    target, mode, *args = sys.argv[1:]
    if mode == "concurrent":
        out: Any = asyncio.run(concurrent(target, int(args[0])))
    elif mode == "revoke":
        out = asyncio.run(revoke(target, args[0]))
    elif mode in ("raw", "raw-open"):
        out = asyncio.run(raw(target, json.loads(args[0]), half_close=mode == "raw"))
    else:
        out = metrics(target)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
