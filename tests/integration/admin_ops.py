"""A scenario of admin API calls in one client process inside a netlab host (test_admin_api.py).

One process for many calls, because starting Python with gRPC costs seconds on a loaded machine. Usage::

    python admin_ops.py ENDPOINTS OPS_JSON   -> prints one JSON list of results

An op is ``[method, kwargs]`` or ``[method, kwargs, {"token": T, "via": "host:port"}]``: ``method`` is a
``tunnelmesh.client.Client`` method (``create_join_token``, ``revoke_api_token``, ...), ``T`` an API token
(default: ``TUNNELMESH_API_TOKEN``); option ``"until_error": CODE`` repeats the call for up to 3 s until it
fails with CODE. A string ``"$3.token.tokenId"`` in kwargs or options stands for that
field of result 3, so one op can use what an earlier one created. A result is the response in the proto3
JSON mapping (as the CLI's ``--json`` prints it), or ``{"error": CODE, "detail": message}``.

Two ops are not Client methods: ``["register", {"join_token": T, "name": N, "tags": [...]}, {"via": ...}]``
registers a node with a fresh key pair (GetServerInfo, then NodeService.Register with a key proof, as an
agent does), and
``["metric", {"name": M, "url": "http://host:port/metrics"}]`` sums the samples of metric M.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

# Run as a script: import this checkout's tunnelmesh, whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc
import nacl.public
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from tunnelmesh import keyproof
from tunnelmesh.api.v1 import node_pb2, node_pb2_grpc
from tunnelmesh.client import ClientError, Profile, open_channel, resolve_profile


def _ref(value: Any, results: list[Any]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        index, *path = value[1:].split(".")
        out = results[int(index)]
        for key in path:
            out = out[key]
        return out
    if isinstance(value, list):
        return [_ref(v, results) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Message):
        return MessageToDict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


async def register(profile: Profile, join_token: str, name: str, tags: list[str] | None = None) -> Any:
    key = nacl.public.PrivateKey.generate()
    req = node_pb2.RegisterRequest(
        join_token=join_token, public_key=bytes(key.public_key), name=name, hostname=name, tags=tags or []
    )
    async with open_channel(profile.coordinators[0], ca_pem=profile.ca_pem) as ch:
        try:
            return await keyproof.register(node_pb2_grpc.NodeServiceStub(ch), req, bytes(key), timeout=15.0)
        except grpc.aio.AioRpcError as exc:
            return {"error": exc.code().name, "detail": exc.details()}


def metric(name: str, url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def main(endpoints: str, ops: list[list[Any]]) -> list[Any]:
    results: list[Any] = []
    for op in ops:
        method, kwargs = op[0], {k: _ref(v, results) for k, v in op[1].items()}
        opts = {k: _ref(v, results) for k, v in (op[2] if len(op) > 2 else {}).items()}
        profile = resolve_profile(coordinators=opts.get("via", endpoints), token=opts.get("token"))
        if method == "register":
            results.append(_jsonable(await register(profile, **kwargs)))
            continue
        if method == "metric":
            results.append(await asyncio.to_thread(metric, **kwargs))
            continue
        results.append(await _call(profile, method, kwargs, opts.get("until_error")))
    return results


async def _call(profile: Profile, method: str, kwargs: dict[str, Any], until_error: str | None) -> Any:
    """One client call; with ``until_error`` repeated (for at most 3 s) until it fails with that code, for
    effects that reach the other coordinators as they apply the log."""
    deadline = asyncio.get_running_loop().time() + 3.0
    while True:
        async with profile.client(deadline=15.0) as c:
            try:
                result = _jsonable(await getattr(c, method)(**kwargs))
            except ClientError as exc:
                result = {"error": exc.code.name, "detail": str(exc)}
        done = isinstance(result, dict) and result.get("error") == until_error
        if until_error is None or done or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))))
