import asyncio
import threading
import time

import pytest

from service.batching import MicroBatcher


def run(coroutine):
    return asyncio.run(coroutine)


def test_each_request_gets_its_own_result_from_a_shared_batch():
    sizes = []

    def double(items):
        time.sleep(0.01)  # long enough for the others to queue behind the first batch
        return [2 * x for x in items]

    async def main():
        batcher = MicroBatcher(double, max_batch=8, on_batch=sizes.append)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        await batcher.close()
        return results

    assert run(main()) == [2 * i for i in range(20)]
    assert max(sizes) > 1 and max(sizes) <= 8 and sum(sizes) == 20


def test_a_failing_request_does_not_fail_its_neighbours():
    def picky(items):
        if any(x == 3 for x in items):
            raise ValueError("3 is bad")
        return [x + 100 for x in items]

    async def main():
        batcher = MicroBatcher(picky, max_batch=16, max_wait_ms=20)
        results = await asyncio.gather(
            *(batcher.submit(i) for i in range(6)), return_exceptions=True
        )
        await batcher.close()
        return results

    results = run(main())
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [100, 101, 102, 104, 105]


def test_a_lone_request_does_not_wait_when_max_wait_is_zero():
    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch=32, max_wait_ms=0)
        await batcher.submit(0)  # start the worker
        started = time.perf_counter()
        await batcher.submit(1)
        took = time.perf_counter() - started
        await batcher.close()
        return took

    assert run(main()) < 0.05


def test_the_wait_bound_holds():
    calls = []

    def record(items):
        calls.append((time.perf_counter(), len(items)))
        return items

    async def main():
        batcher = MicroBatcher(record, max_batch=64, max_wait_ms=30)
        started = time.perf_counter()
        result = await batcher.submit("only")
        await batcher.close()
        return started, result

    started, result = run(main())
    assert result == "only"
    waited = calls[0][0] - started
    assert 0.02 <= waited < 0.5  # waited for company, but not (much) longer than the bound


def test_batches_run_off_the_event_loop_thread():
    threads = []

    def where(items):
        threads.append(threading.get_ident())
        return items

    async def main():
        batcher = MicroBatcher(where)
        await batcher.submit(1)
        await batcher.close()
        return threading.get_ident()

    assert run(main()) not in threads


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch=0)
