import asyncio
import threading
import time

import pytest

from service.batching import MicroBatcher


def run(coroutine):
    return asyncio.run(coroutine)


def in_thread(fn):
    """A blocking batch function as the coroutine the batcher awaits."""

    async def batch(items):
        return await asyncio.get_running_loop().run_in_executor(None, fn, items)

    return batch


def test_each_request_gets_its_own_result_from_a_shared_batch():
    sizes = []

    def double(items):
        time.sleep(0.01)  # long enough for the others to queue behind the first batch
        return [2 * x for x in items]

    async def main():
        batcher = MicroBatcher(in_thread(double), max_batch=8, on_batch=sizes.append)
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
        batcher = MicroBatcher(in_thread(picky), max_batch=16, max_wait_ms=20)
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
        batcher = MicroBatcher(in_thread(lambda items: items), max_batch=32, max_wait_ms=0)
        await batcher.submit(0)  # start the worker
        started = time.perf_counter()
        await batcher.submit(1)
        took = time.perf_counter() - started
        await batcher.close()
        return took

    assert run(main()) < 0.05


def test_a_lone_request_is_run_by_its_caller_and_company_still_forms_batches():
    ran_in: list = []
    sizes: list[int] = []

    async def batch(items):
        ran_in.append(asyncio.current_task())
        await asyncio.sleep(0.05)  # long enough for the others to queue
        return [2 * x for x in items]

    async def main():
        batcher = MicroBatcher(batch, max_batch=32, max_wait_ms=0, on_batch=sizes.append)
        caller = asyncio.current_task()
        alone = await batcher.submit(1)
        first = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)  # the lone batch is running: these queue behind it
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in (3, 4, 5)]
        answers = [alone, await first, *await asyncio.gather(*rest)]
        await batcher.close()
        return caller, answers

    caller, answers = run(main())
    assert answers == [2, 4, 6, 8, 10]
    assert ran_in[0] is caller  # no queue, no worker task, no batch task
    assert sizes == [1, 1, 3]  # the second lone request ran alone too; the rest together


def test_the_wait_bound_holds():
    calls = []

    def record(items):
        calls.append((time.perf_counter(), len(items)))
        return items

    async def main():
        batcher = MicroBatcher(in_thread(record), max_batch=64, max_wait_ms=30)
        started = time.perf_counter()
        result = await batcher.submit("only")
        await batcher.close()
        return started, result

    started, result = run(main())
    assert result == "only"
    waited = calls[0][0] - started
    assert 0.02 <= waited < 0.5  # waited for company, but not (much) longer than the bound


def test_an_async_batch_function_is_awaited_on_the_loop():
    async def doubled(items):
        await asyncio.sleep(0)
        return [2 * x for x in items]

    async def main():
        batcher = MicroBatcher(doubled, max_batch=4)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.close()
        return results

    assert run(main()) == [2 * i for i in range(10)]


def test_a_request_that_gave_up_does_not_break_the_batch():
    release = threading.Event()

    def slow(items):
        release.wait(5)
        return [x + 1 for x in items]

    async def main():
        batcher = MicroBatcher(in_thread(slow), max_batch=8)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch is running; these two queue behind it
        impatient = asyncio.ensure_future(batcher.submit(1))
        patient = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)
        impatient.cancel()
        release.set()
        results = await asyncio.gather(first, patient)
        await batcher.close()
        return results, impatient.cancelled()

    assert run(main()) == ([1, 3], True)


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch=0)


def test_with_two_in_flight_the_next_batch_starts_while_one_is_running():
    started = []
    gate: list[asyncio.Event] = []

    async def slow(items):
        started.append(list(items))
        if len(started) == 1:
            await gate[0].wait()  # the first batch holds on until the second has started
        return items

    async def main(in_flight):
        started.clear()
        gate[:] = [asyncio.Event()]
        batcher = MicroBatcher(slow, max_batch=2, in_flight=in_flight)
        first = asyncio.ensure_future(batcher.submit(0))  # alone: it holds on
        await asyncio.sleep(0.01)
        rest = asyncio.gather(*(batcher.submit(i) for i in (1, 2)))
        await asyncio.sleep(0.05)
        before_release = [list(batch) for batch in started]
        gate[0].set()
        results = await asyncio.gather(first, rest)
        await batcher.close()
        return before_release, results

    before_release, results = run(main(2))
    assert before_release == [[0], [1, 2]] and results == [0, [1, 2]]
    before_release, results = run(main(1))
    assert before_release == [[0]] and results == [0, [1, 2]]


def test_in_flight_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(in_thread(lambda items: items), in_flight=0)
