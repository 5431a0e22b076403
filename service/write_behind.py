"""Writes queued on the answer's path and sent to Redis behind it, coalesced.

An answer's path only queues (``WriteBehind.put``); one task per queue takes what has
queued and hands it to the write function in batches. When a batch is small, the task
lingers up to ``linger_seconds`` for company before writing: under light, closed-loop
traffic (one caller waiting for each answer before it asks again) every write otherwise
costs a Redis round trip of its own, whose CPU lands on the worker just as the next
request arrives, so that request waits for it (docs/BENCHMARKS.md, "A lone request").
Lingering turns those into one round trip per batch. Under load the queue fills
meanwhile and batches leave full, without waiting.

The write function owns its errors: whatever it raises is logged and the batch is given
up, so one bad batch never stops the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

LOG = logging.getLogger(__name__)

Item = TypeVar("Item")


class WriteBehind(Generic[Item]):
    """A bounded queue of items and the task that writes them in batches.

    The task is started by the first item queued and ends once nothing is queued (as the
    micro-batcher's worker does), so no idle task outlives the event loop it runs on.
    """

    def __init__(
        self,
        write: Callable[[list[Item]], Awaitable[None]],
        *,
        capacity: int,
        max_batch: int,
        linger_seconds: float,
    ):
        if capacity < 1 or max_batch < 1 or linger_seconds < 0:
            raise ValueError("capacity and max_batch must be at least 1, linger at least 0")
        self.write = write
        self.capacity = capacity
        self.max_batch = max_batch
        self.linger = linger_seconds
        self._items: deque[Item] = deque()
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Future | None = None  # what a lingering task waits on
        self._hurry = 0  # flushes waiting: write without lingering

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item) -> bool:
        """Queue ``item``; False (nothing queued) when the queue is full."""
        if len(self._items) >= self.capacity:
            return False
        self._items.append(item)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return True

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        # The emptiness check and the return run without an await in between, so an item
        # queued after it always finds this task done and starts another.
        while self._items:
            if len(self._items) < self.max_batch and self.linger > 0 and not self._hurry:
                # Company for a small batch; under load the queue is full enough already.
                self._wakeup = loop.create_future()
                timer = loop.call_later(self.linger, _wake, self._wakeup)
                try:
                    await self._wakeup
                finally:
                    timer.cancel()
                    self._wakeup = None
            batch = [self._items.popleft() for _ in range(min(self.max_batch, len(self._items)))]
            try:
                await self.write(batch)
            except Exception:  # the write function owns its errors; this is a bug's net
                LOG.exception("gave up a batch of %d queued writes", len(batch))

    async def flush(self, timeout: float) -> bool:
        """Write what is queued without lingering and wait until it is written; False if
        ``timeout`` passed first."""
        if self._task is None or self._task.done():
            return True
        self._hurry += 1
        if self._wakeup is not None:
            _wake(self._wakeup)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._hurry -= 1

    async def close(self, timeout: float) -> int:
        """Flush (at most ``timeout``), then stop; how many queued items were never
        written (a batch cut short in Redis's hands is not counted: it may have landed)."""
        await self.flush(timeout)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        left = len(self._items)
        self._items.clear()
        return left


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
