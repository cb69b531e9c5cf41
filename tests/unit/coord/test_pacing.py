"""node_api's _Pacer: streams woken together do their work a few per event-loop iteration."""

from __future__ import annotations

import asyncio
from collections import Counter

from tunnelmesh.coord.node_api import _Pacer


async def test_at_most_per_turn_callers_pass_per_loop_iteration_and_all_pass() -> None:
    iteration = 0
    running = True

    def tick() -> None:  # counts loop iterations: call_soon callbacks run once per iteration
        nonlocal iteration
        iteration += 1
        if running:
            asyncio.get_running_loop().call_soon(tick)

    pacer = _Pacer(8)
    passed: Counter[int] = Counter()

    async def stream() -> None:
        await pacer.turn()
        passed[iteration] += 1

    asyncio.get_running_loop().call_soon(tick)
    await asyncio.sleep(0)
    async with asyncio.timeout(10.0):
        await asyncio.gather(*(stream() for _ in range(100)))
    assert sum(passed.values()) == 100
    assert max(passed.values()) <= 8, passed
    assert len(passed) >= 100 // 8, "spread over iterations, the loop polling I/O in between"

    # A later wave starts with a full allowance again.
    passed.clear()
    await asyncio.sleep(0)
    await asyncio.gather(*(stream() for _ in range(8)))
    running = False
    assert sum(passed.values()) == 8 and len(passed) == 1, passed


async def test_a_cancelled_waiter_does_not_hold_up_the_queue() -> None:
    pacer = _Pacer(1)
    first = asyncio.create_task(pacer.turn())  # these four run in the same iteration: the allowance of one
    queued = asyncio.create_task(pacer.turn())  # goes to `first`, the next two queue
    behind = asyncio.create_task(pacer.turn())

    async def cancel_queued() -> None:
        queued.cancel()

    canceller = asyncio.create_task(cancel_queued())
    async with asyncio.timeout(10.0):
        await first
        await canceller
        await behind
    assert queued.cancelled()
