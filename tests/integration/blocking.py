"""For integration tests whose body blocks: an asyncio loop in a thread (servers run there meanwhile), and
polling a condition with a deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a thread. Created inside ``host.enter()``, the thread (and every socket and thread
    it creates) lives in that host's namespace."""

    def __init__(self, name: str, timeout: float = 30.0) -> None:
        self.timeout = timeout  # default deadline of one ``run`` call
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"loop-{name}", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Call ``fn`` on the loop (awaiting it if it returns a coroutine) and return its result."""

        async def call() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        fut: Future[Any] = asyncio.run_coroutine_threadsafe(call(), self.loop)
        return fut.result(self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def wait_for(cond: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll ``cond`` until it returns something truthy (returned), or fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
