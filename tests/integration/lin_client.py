"""Concurrent KV clients for the linearizability test, run as one process inside a netlab host.

    python lin_client.py ENDPOINTS SECONDS OUT [--clients N] [--keys K] [--seed S]   (SIGTERM: stop early)
    python lin_client.py ENDPOINTS --read-back KEYS_JSON   -> {"missing": [...], "errors": {...}}

Each of N asyncio clients repeats, until SECONDS pass: pick a random key of K, a random operation (put, get,
cas) and send it to a random coordinator with a short deadline. Even-numbered clients send unary calls;
odd-numbered ones send their operations on ``KvService.Session`` streams (one per coordinator, shared by
them, as the client library does), so one history checks both paths. A failed attempt is retried on another
coordinator with the *same* request id (a retry applies at most once), so a logical operation is recorded
once: from its first call to its last answer. Every operation goes to a ``Recorder``:

* an answer -> ``complete_response``;
* INVALID_ARGUMENT (the request itself was wrong) -> ``fail_definite``;
* anything else after the last attempt (DEADLINE_EXCEEDED, UNAVAILABLE, ...) -> ``fail_unknown``: it may have
  been applied, maybe later.

Values are unique (``<client>.<seq>``), so the checker can tell every write apart. cas expects the value the
client last saw for the key (sometimes absence), so that some succeed and some fail. The history is written to
OUT as JSON (``History.save``); one summary line goes to stdout.

``--read-back`` reads every key of a JSON list with linearizable gets over one channel per coordinator (the
"no acknowledged write lost" checks of thousands of keys); a key that cannot be read after a few attempts on
different coordinators is reported under ``errors``, never silently as missing or present.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import random
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.linearizability import Recorder
from tunnelmesh.api.v1 import kv_pb2, kv_pb2_grpc
from tunnelmesh.client import ClientError, KvSession, open_channel, resolve_profile

ATTEMPT_DEADLINE = 1.0  # seconds per gRPC attempt
ATTEMPTS = 3  # attempts of one logical operation (on different coordinators) before giving up: unknown
RETRY_PAUSE = 0.05

if TYPE_CHECKING:
    KvStub = kv_pb2_grpc.KvServiceAsyncStub
else:
    KvStub = kv_pb2_grpc.KvServiceStub


class _SessionStub:
    """The unary stub's methods used here, sent as operations of a shared ``KvSession``."""

    def __init__(self, session: KvSession) -> None:
        self._s = session

    async def Put(self, req: kv_pb2.KvPutRequest, timeout: float) -> Any:  # noqa: ASYNC109 - the op's budget
        return await self._s.run("put", req, timeout)

    async def Get(self, req: kv_pb2.KvGetRequest, timeout: float) -> Any:  # noqa: ASYNC109 - the op's budget
        return await self._s.run("get", req, timeout)

    async def CompareAndSet(
        self,
        req: kv_pb2.KvCompareAndSetRequest,
        timeout: float,  # noqa: ASYNC109 - the op's budget
    ) -> Any:
        return await self._s.run("compare_and_set", req, timeout)


def _code(exc: grpc.aio.AioRpcError | ClientError) -> grpc.StatusCode:
    return exc.code if isinstance(exc, ClientError) else exc.code()


async def _put(req: kv_pb2.KvPutRequest, stub: KvStub) -> kv_pb2.KvPutResponse:
    return await stub.Put(req, timeout=ATTEMPT_DEADLINE)


async def _get(req: kv_pb2.KvGetRequest, stub: KvStub) -> kv_pb2.KvGetResponse:
    return await stub.Get(req, timeout=ATTEMPT_DEADLINE)


async def _cas(req: kv_pb2.KvCompareAndSetRequest, stub: KvStub) -> kv_pb2.KvCompareAndSetResponse:
    return await stub.CompareAndSet(req, timeout=ATTEMPT_DEADLINE)


async def client(
    name: str,
    stubs: list[KvStub],
    keys: list[bytes],
    rec: Recorder,
    stop: asyncio.Event,
    rng: random.Random,
    codes: collections.Counter[str],
) -> None:
    seen: dict[bytes, bytes | None] = {}
    seq = 0
    target = rng.randrange(len(stubs))
    while not stop.is_set():
        key = rng.choice(keys)
        kind = rng.choices(["put", "get", "cas"], weights=[3, 4, 3])[0]
        seq += 1
        value = f"{name}.{seq}".encode()
        rid = uuid.uuid4().hex
        send: Callable[[KvStub], Awaitable[Any]]
        if kind == "put":
            op = rec.invoke(name, "put", key, value=value)
            put = kv_pb2.KvPutRequest(request_id=rid, key=key, value=value)
            send = functools.partial(_put, put)
        elif kind == "get":
            op = rec.invoke(name, "get", key)
            send = functools.partial(_get, kv_pb2.KvGetRequest(key=key))
        else:
            expected = seen.get(key) if rng.random() < 0.9 else None
            op = rec.invoke(name, "cas", key, expected=expected, value=value)
            cas = kv_pb2.KvCompareAndSetRequest(request_id=rid, key=key, new_value=value)
            if expected is not None:
                cas.expected_value = expected
            send = functools.partial(_cas, cas)
        for attempt in range(ATTEMPTS):
            try:
                resp: Any = await send(stubs[target])
            except (grpc.aio.AioRpcError, ClientError) as exc:
                codes[_code(exc).name] += 1
                if _code(exc) is grpc.StatusCode.INVALID_ARGUMENT:
                    rec.fail_definite(op)
                    break
                target = (target + rng.randrange(1, len(stubs))) % len(stubs) if len(stubs) > 1 else 0
                if attempt == ATTEMPTS - 1 or stop.is_set():
                    rec.fail_unknown(op)
                    break
                await asyncio.sleep(RETRY_PAUSE)
                continue
            codes["OK"] += 1
            rec.complete_response(op, resp)
            if kind == "get":
                seen[key] = bytes(resp.value) if resp.found else None
            elif kind == "put" or resp.succeeded:
                seen[key] = value
            else:
                seen[key] = bytes(resp.previous_value) if resp.HasField("previous_value") else None
            break
        else:  # pragma: no cover - every path above breaks
            rec.fail_unknown(op)


def _channels(endpoints: list[str]) -> list[grpc.aio.Channel]:
    """TLS channels with the CA and API token of the environment (``CoordLab.client_env``)."""
    profile = resolve_profile(coordinators=",".join(endpoints))
    return [open_channel(e, ca_pem=profile.ca_pem, token=profile.token) for e in endpoints]


async def run(endpoints: list[str], seconds: float, out: Path, clients: int, nkeys: int, seed: int) -> None:
    rng = random.Random(seed)
    rec = Recorder()
    keys = [f"k{i}".encode() for i in range(nkeys)]
    codes: collections.Counter[str] = collections.Counter()
    channels = _channels(endpoints)
    sessions = [KvSession(ch) for ch in channels]
    try:
        # One stub list per client, in its own random order: clients spread over the coordinators.
        per_client = []
        for i in range(clients):
            if i % 2:
                order: list[KvStub] = [_SessionStub(s) for s in sessions]  # type: ignore[misc]  # duck-typed: the three methods used
            else:
                order = [kv_pb2_grpc.KvServiceStub(ch) for ch in channels]
            rng.shuffle(order)
            per_client.append(order)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        timer = loop.call_later(seconds, stop.set)
        print("lin_client: started", flush=True)
        async with asyncio.TaskGroup() as tg:
            for i in range(clients):
                crng = random.Random(rng.getrandbits(64))
                tg.create_task(client(f"c{i}", per_client[i], keys, rec, stop, crng, codes))
        timer.cancel()
    finally:
        for session in sessions:
            await session.close()
        for ch in channels:
            await ch.close()
    history = rec.history(seed=seed, endpoints=endpoints, clients=clients, seconds=seconds)
    history.save(out)
    known = sum(1 for op in history if not op.unknown)
    print(json.dumps({"ops": len(history), "known": known, "codes": dict(codes)}), flush=True)


async def read_back(endpoints: list[str], keys: list[str]) -> dict[str, object]:
    channels = _channels(endpoints)
    stubs: list[KvStub] = [kv_pb2_grpc.KvServiceStub(ch) for ch in channels]
    missing: list[str] = []
    errors: dict[str, str] = {}
    limit = asyncio.Semaphore(32)

    async def one(i: int, key: str) -> None:
        async with limit:
            for attempt in range(2 * len(stubs)):
                try:
                    r = await stubs[(i + attempt) % len(stubs)].Get(
                        kv_pb2.KvGetRequest(key=key.encode()), timeout=3.0
                    )
                except grpc.aio.AioRpcError as exc:
                    errors[key] = exc.code().name
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                errors.pop(key, None)
                if not r.found:
                    missing.append(key)
                return

    try:
        async with asyncio.TaskGroup() as tg:
            for i, k in enumerate(keys):
                tg.create_task(one(i, k))
    finally:
        for ch in channels:
            await ch.close()
    return {"missing": sorted(missing), "errors": errors, "read": len(keys)}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[2] == "--read-back":
        keys = json.loads(Path(sys.argv[3]).read_text())
        print(json.dumps(asyncio.run(read_back(sys.argv[1].split(","), keys))), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("endpoints")
    p.add_argument("seconds", type=float)
    p.add_argument("out", type=Path)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--keys", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    asyncio.run(run(a.endpoints.split(","), a.seconds, a.out, a.clients, a.keys, a.seed))


if __name__ == "__main__":
    main()
