"""Dynamic micro-batching: concurrent requests share one Redis round trip, one ONNX call,
one faiss search and one CTR head call.

``MicroBatcher.submit(item)`` queues an item and awaits its own result. A single worker
task takes whatever is queued (at most ``max_batch`` items), waits at most ``max_wait_ms``
for more, and awaits the batch function once for all of them. With ``max_wait_ms=0`` it
never waits: a lone request (nothing queued, nothing running) is run by its caller as a
batch of one, without the queue and tasks a batch passes through, while requests that
arrive during a running batch form the next one, so batches grow with load. Up to
``in_flight`` batches run at once: the next batch is collected and starts (its cache
read, say) while the previous one still computes, so the event loop and the compute work
side by side instead of in turns (a compute process merges the batches that queue up for
it, so several in flight never means small computations). The batch function is a
coroutine (``service.compute`` runs the blocking work off the loop).

If the batch function raises, each item is retried alone, so one bad request fails only
itself and never its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

LOG = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

BatchFunction = Callable[[list[Item]], Awaitable[list[Result]]]


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        fn: BatchFunction,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
        in_flight: int = 1,
    ):
        if max_batch < 1 or in_flight < 1:
            raise ValueError("max_batch and in_flight must be at least 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.in_flight = in_flight
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._lone = 0  # lone batches their callers are running (see _alone)

    @property
    def busy(self) -> bool:
        """Requests are queued or a batch is running."""
        return (
            bool(self._running)
            or self._lone > 0
            or (self._queue is not None and not self._queue.empty())
        )

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its result (or its own exception)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._slots = asyncio.Semaphore(self.in_flight)
        if self.max_wait == 0 and not self.busy:
            return await self._alone(item)
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        # The worker exits once the queue is empty (no idle task holds a swapped-out bundle
        # alive); the check and its exit run without an await in between, so nothing queued
        # is ever left without a worker.
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        return await future

    async def _alone(self, item: Item) -> Result:
        """A batch of one, run by the caller itself: nothing is queued or running, so it
        would be a batch of one anyway, without the queue, the worker task and the batch
        task it would pass through. It holds a slot and counts as busy, so requests
        arriving meanwhile form the next batch as usual."""
        await self._slots.acquire()  # free: nothing runs
        self._lone += 1
        try:
            if self.on_batch is not None:
                self.on_batch(1)
            (result,) = await self.fn([item])
            return result
        finally:
            self._lone -= 1
            self._slots.release()

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
            # A free slot first, then the batch: it takes everything queued meanwhile.
            await self._slots.acquire()
            if self._queue.empty():
                self._slots.release()
                break
            batch = await self._collect(self._queue.get_nowait())
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _run(self, batch: list) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        items = [item for item, _ in batch]
        try:
            results = await self.fn(items)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exception=exc)
            else:
                LOG.warning("batch of %d failed; retrying its items one by one", len(batch))
                await self._one_by_one(batch)
            return
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result)

    async def _one_by_one(self, batch: list) -> None:
        for item, future in batch:
            try:
                (result,) = await self.fn([item])
            except Exception as exc:
                _settle(future, exception=exc)
                continue
            _settle(future, result)

    async def close(self) -> None:
        """Stop the worker and the running batches; queued requests that never ran are
        cancelled."""
        for task in [self._worker, *self._running]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._worker = None
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            future.cancel()


def _settle(future: asyncio.Future, result=None, exception: BaseException | None = None) -> None:
    """Deliver to a request that is still waiting (one that gave up is left alone)."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
