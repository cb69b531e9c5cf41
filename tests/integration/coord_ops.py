"""Client operations against a coordinator cluster, run as a process inside a netlab host.

gRPC opens its sockets from its own threads, so a test cannot simply enter a namespace and use the Python
client; it runs this script there instead (``coordlab.CoordLab.ops``). Usage::

    python coord_ops.py ENDPOINTS OPS_JSON          -> prints one JSON list of results
    python coord_ops.py ENDPOINTS writer SECONDS OUT -> writes keys w<i> until SECONDS pass; OUT gets the acks

An op is ``["put", key, value]``, ``["get", key]``, ``["sget", key]`` (stale), ``["cas", key, expected|null,
new]`` or ``["status"]``; an op may end with ``{"deadline": s, "via": "host:port", "token": t}`` (send only
to that coordinator; use API token ``t`` instead, null: none). A failed op yields ``{"error": CODE,
"detail": message}``. The CA and API token come from the environment (``TUNNELMESH_CA``,
``TUNNELMESH_API_TOKEN``; ``CoordLab.client_env``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script: import this checkout's tunnelmesh, whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tunnelmesh.client import Client, ClientError, resolve_profile


def _client(endpoints: list[str], token: Any = False, **kwargs: Any) -> Client:
    profile = resolve_profile(coordinators=",".join(endpoints))
    if token is not False:
        profile = dataclasses.replace(profile, token=token)
    return profile.client(**kwargs)


async def one(endpoints: list[str], op: list[Any]) -> Any:
    opts = op[-1] if op and isinstance(op[-1], dict) else {}
    if opts:
        op = op[:-1]
    deadline = float(opts.get("deadline", 10.0))
    if "via" in opts:
        endpoints = [opts["via"]]
    token = opts.get("token", False)
    async with _client(endpoints, token, deadline=deadline, attempt_timeout=min(5.0, deadline)) as c:
        try:
            kind = op[0]
            if kind == "put":
                r = await c.put(op[1].encode(), op[2].encode())
                return {"revision": r.revision}
            if kind in ("get", "sget"):
                g = await c.get(op[1].encode(), stale=kind == "sget")
                return {"found": g.found, "value": g.value.decode(), "revision": g.revision}
            if kind == "cas":
                exp = op[2].encode() if op[2] is not None else None
                r2 = await c.compare_and_set(op[1].encode(), exp, op[3].encode())
                return {"succeeded": r2.succeeded}
            if kind == "status":
                s = await c.cluster_status()
                return {
                    "cluster": s.cluster_id,
                    "member": s.member_id,
                    "leader": s.leader_id,
                    "term": s.term,
                    "commit": s.commit_index,
                    "voters": [m.member_id for m in s.members if m.role == 1],
                    "learners": [m.member_id for m in s.members if m.role == 2],
                    "api": {m.member_id: m.info.api_address for m in s.members},
                }
            raise SystemExit(f"unknown op {op!r}")
        except ClientError as exc:
            return {"error": exc.code.name, "detail": str(exc)}


async def writer(endpoints: list[str], seconds: float, out: str) -> None:
    """Sequential writes w0, w1, ... (each retried until acknowledged or 5 s); records acks with times."""
    acks: list[tuple[str, float]] = []
    failed: list[str] = []
    i = 0
    end = time.monotonic() + seconds
    async with _client(endpoints, deadline=5.0, attempt_timeout=1.0) as c:
        while time.monotonic() < end:
            key = f"w{i}"
            try:
                await c.put(key.encode(), b"x", request_id=f"writer-{key}")
                acks.append((key, time.time()))
                if len(acks) == 1:
                    print("writer: first write acknowledged", flush=True)
            except ClientError:
                failed.append(key)
            i += 1
    await asyncio.to_thread(Path(out).write_text, json.dumps({"acks": acks, "failed": failed}))


def main() -> None:
    endpoints = sys.argv[1].split(",")
    if sys.argv[2] == "writer":
        asyncio.run(writer(endpoints, float(sys.argv[3]), sys.argv[4]))
        return
    ops = json.loads(sys.argv[2])

    async def run_all() -> list[Any]:
        return [await one(endpoints, op) for op in ops]

    print(json.dumps(asyncio.run(run_all())))


if __name__ == "__main__":
    main()
