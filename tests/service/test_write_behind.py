"""The write-behind queue: coalescing under light traffic, bounded, flushed on demand."""

import asyncio

import pytest

from service.write_behind import WriteBehind


class Recorder:
    """A write function that records its batches (and can be told to fail or stall)."""

    def __init__(self, fail: bool = False, stall: float = 0.0):
        self.batches: list[list[int]] = []
        self.fail = fail
        self.stall = stall

    async def __call__(self, batch: list[int]) -> None:
        if self.stall:
            await asyncio.sleep(self.stall)
        if self.fail:
            raise RuntimeError("redis said no")
        self.batches.append(list(batch))


def test_items_queued_one_by_one_within_the_linger_leave_in_one_batch():
    async def main():
        write = Recorder()
        queue = WriteBehind(write, capacity=100, max_batch=32, linger_seconds=0.2)
        for i in range(5):
            assert queue.put(i)
            await asyncio.sleep(0.005)  # one caller, answer after answer
        assert write.batches == []  # still lingering
        await asyncio.sleep(0.4)
        return write.batches

    assert asyncio.run(main()) == [[0, 1, 2, 3, 4]]


def test_without_linger_each_turn_of_the_loop_writes_what_queued():
    async def main():
        write = Recorder()
        queue = WriteBehind(write, capacity=100, max_batch=32, linger_seconds=0)
        queue.put(1)
        queue.put(2)
        await asyncio.sleep(0.01)
        queue.put(3)
        await asyncio.sleep(0.01)
        return write.batches

    assert asyncio.run(main()) == [[1, 2], [3]]


def test_a_full_batch_does_not_linger_and_batches_are_capped():
    async def main():
        write = Recorder()
        queue = WriteBehind(write, capacity=100, max_batch=4, linger_seconds=60)
        for i in range(10):
            queue.put(i)
        await asyncio.sleep(0.05)  # two full batches leave at once; the rest lingers
        full = list(write.batches)
        assert await queue.flush(timeout=1)
        return full, write.batches

    full, everything = asyncio.run(main())
    assert full == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert everything == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_flush_writes_at_once_and_waits_for_the_write():
    async def main():
        write = Recorder(stall=0.05)
        queue = WriteBehind(write, capacity=100, max_batch=32, linger_seconds=60)
        queue.put("a")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await queue.flush(timeout=5)
        return write.batches, loop.time() - started

    batches, took = asyncio.run(main())
    assert batches == [["a"]]
    assert took < 5  # not the 60 s linger


def test_flush_reports_a_write_that_outlasts_its_timeout():
    async def main():
        queue = WriteBehind(Recorder(stall=1.0), capacity=10, max_batch=10, linger_seconds=0)
        queue.put(1)
        flushed = await queue.flush(timeout=0.05)
        left = await queue.close(timeout=0)
        return flushed, left

    assert asyncio.run(main()) == (False, 0)


def test_a_full_queue_refuses_and_close_counts_what_was_never_written():
    async def main():
        write = Recorder()
        queue = WriteBehind(write, capacity=3, max_batch=2, linger_seconds=60)
        accepted = [queue.put(i) for i in range(5)]
        left = await queue.close(timeout=0)
        return accepted, left, write.batches

    accepted, left, batches = asyncio.run(main())
    assert accepted == [True, True, True, False, False]
    assert left + sum(len(b) for b in batches) == 3


def test_a_failing_write_does_not_stop_the_queue(caplog):
    async def main():
        write = Recorder(fail=True)
        queue = WriteBehind(write, capacity=10, max_batch=10, linger_seconds=0)
        queue.put(1)
        await queue.flush(timeout=1)
        write.fail = False
        queue.put(2)
        await queue.flush(timeout=1)
        return write.batches

    assert asyncio.run(main()) == [[2]]
    assert "gave up a batch of 1" in caplog.text


def test_the_queue_serves_one_event_loop_after_another():
    # No task or future outlives its loop: each asyncio.run starts its own writer.
    write = Recorder()
    queue = WriteBehind(write, capacity=10, max_batch=10, linger_seconds=0.01)

    async def one(value):
        queue.put(value)
        assert await queue.flush(timeout=1)

    asyncio.run(one("first"))
    asyncio.run(one("second"))
    assert write.batches == [["first"], ["second"]]


@pytest.mark.parametrize("capacity, batch, linger", [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_nonsense_limits_are_refused(capacity, batch, linger):
    with pytest.raises(ValueError):
        WriteBehind(Recorder(), capacity=capacity, max_batch=batch, linger_seconds=linger)
