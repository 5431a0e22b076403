"""Dynamic micro-batching: concurrent requests share one ONNX call and one faiss search.

``MicroBatcher.submit(item)`` queues an item and awaits its own result. A single worker
task takes whatever is queued (at most ``max_batch`` items), waits at most ``max_wait_ms``
for more, and runs the batch function once in a thread. With ``max_wait_ms=0`` it never
waits: a lone request goes straight through (no added latency at concurrency 1), while
requests that arrive during a running batch form the next one, so batches grow with load.

If the batch function raises, each item is retried alone, so one bad request fails only
itself and never its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

LOG = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        fn: Callable[[list[Item]], list[Result]],
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its result (or its own exception)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        # The worker exits once the queue is empty (no idle task holds a swapped-out bundle
        # alive); the check and its exit run without an await in between, so nothing queued
        # is ever left without a worker.
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        return await future

    async def _collect(self, first) -> list:
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]

    async def _serve(self) -> None:
        while not self._queue.empty():
            batch = await self._collect(self._queue.get_nowait())
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            items = [item for item, _ in batch]
            try:
                results = await run_in_threadpool(self.fn, items)
            except Exception as exc:
                if len(batch) == 1:
                    batch[0][1].set_exception(exc)
                else:
                    LOG.warning("batch of %d failed; retrying its items one by one", len(batch))
                    await self._one_by_one(batch)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _one_by_one(self, batch: list) -> None:
        for item, future in batch:
            try:
                (result,) = await run_in_threadpool(self.fn, [item])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        """Stop the worker; queued requests that never ran are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            future.cancel()
