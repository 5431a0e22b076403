"""Where batches are computed: a child process answers exactly as a thread does."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.bundle import load_bundle, placement
from service.compute import ComputeConfig, LoneInWorker, ProcessCompute, ThreadCompute
from service.errors import BundleError, ComputeError, ComputeUnavailable
from service.main import create_app
from service.pipeline import RankingRequest, prepare_queries, similar_query
from service.recommender import Recommender
from tests.service.test_recommender import user_events

pytestmark = pytest.mark.slow


def answers(recommender: Recommender, histories, **options):
    async def scenario():
        await recommender.start()
        try:
            results = await asyncio.gather(
                *(
                    recommender.recommend(
                        events,
                        k=8,
                        encoder=None,
                        exclude_seen=True,
                        candidates=25,
                        rerank=True,
                        cache=None,
                        history_cap=1000,
                        **options,
                    )  # fmt: skip
                    for events in histories
                )
            )
            similar = await recommender.similar("3", 5, None)
        finally:
            await recommender.close()
        return results, similar

    return asyncio.run(scenario())


def test_a_compute_process_answers_exactly_as_a_thread(head_models, tiny_data, monkeypatch):
    # One request time for both runs: the head's time features follow it, and the process
    # run starts seconds after the thread run (a clean-clone CI run once differed there).
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    bundle = load_bundle(head_models, device="cpu")
    histories = [user_events(tiny_data, user) for user in range(12)] + [[("nope", 1)]]
    in_thread, similar_in_thread = answers(Recommender(bundle, max_batch=4), histories)
    light = load_bundle(head_models, device="cpu", models=False)
    assert light.retrievers["sasrec"].index is None  # the worker keeps no models
    compute = ProcessCompute(
        ComputeConfig(models_dir=head_models, bundle=bundle.name, device="cpu")
    )
    in_process, similar_in_process = answers(
        Recommender(light, max_batch=4, compute=compute), histories
    )
    assert [r.items for r in in_process] == [r.items for r in in_thread]
    assert all(r.reranked for r in in_process[:-1]) and in_process[-1].fallback == "popularity"
    assert similar_in_process == similar_in_thread
    assert not compute.running  # closed with its recommender
    # The child says where it ran each stage: where this process ran them.
    assert compute.placement == placement(bundle) != {}


def test_a_bundle_the_compute_process_cannot_load_is_refused_with_its_reason(head_models, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(head_models, models)
    onnx = models / "with-head" / "retrievers" / "sasrec" / "ctr_head.onnx"
    onnx.write_bytes(b"not an onnx graph")

    async def scenario():
        compute = ProcessCompute(ComputeConfig(models_dir=models, bundle="with-head", device="cpu"))
        with pytest.raises(BundleError, match="ctr_head.onnx: cannot be loaded"):
            await compute.start()
        assert not compute.running

    asyncio.run(scenario())


def similar_queries(models) -> list:
    """One /items/{id}/similar query: a batch that needs no encoder (nor a worker)."""
    bundle = load_bundle(models, models=False)
    return [similar_query(bundle.catalogue, 3, 5)]


def test_a_compute_process_that_dies_is_replaced_and_its_calls_retried_once(head_models):
    queries = similar_queries(head_models)

    async def scenario():
        compute = ProcessCompute(
            ComputeConfig(models_dir=head_models, bundle="with-head", device="cpu")
        )
        await compute.start()
        try:
            (before,) = await compute.batch("sasrec", queries)
            first_pid = compute._process.pid
            os.kill(first_pid, signal.SIGSTOP)  # a call is sure to be pending when it dies
            pending = asyncio.ensure_future(compute.batch("sasrec", queries))
            await asyncio.sleep(0.2)
            os.kill(first_pid, signal.SIGKILL)
            (retried,) = await pending  # sent once more, to the new child
            (again,) = await compute.batch("sasrec", queries)
            assert compute._process.pid != first_pid and compute.replaced == 1
            return before, retried, again
        finally:
            await compute.close()

    before, retried, again = asyncio.run(scenario())
    assert len(before.ids) == 5
    np.testing.assert_array_equal(before.ids, retried.ids)
    np.testing.assert_array_equal(before.ids, again.ids)


def test_a_thread_compute_runs_off_the_event_loop(head_models):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    bundle = load_bundle(head_models, device="cpu")
    seen_threads = []
    index = bundle.retrievers["sasrec"].index
    search = index.search

    def recording(queries, k):
        seen_threads.append(threading.current_thread().name)
        return search(queries, k)

    index.search = recording

    async def scenario():
        with ThreadPoolExecutor(1, thread_name_prefix="compute") as executor:
            compute = ThreadCompute(bundle, executor)
            await compute.batch("sasrec", similar_queries(head_models))
        return threading.current_thread().name

    assert asyncio.run(scenario()) != seen_threads[0] and seen_threads[0].startswith("compute")


def test_an_app_in_process_mode_serves_and_retires_the_old_process_on_reload(
    make_settings, head_models, tmp_path, history
):
    models = tmp_path / "head-copy"
    shutil.copytree(head_models, models)
    shutil.copytree(models / "with-head", models / "with-head-2")
    settings = make_settings(models_dir=models, compute="process")
    with TestClient(create_app(settings)) as client:
        state = client.app.state.recserve
        # Lone requests are computed in the worker too (RECSERVE_LONE_IN_WORKER=auto).
        assert isinstance(state.recommender.compute, LoneInWorker)
        first = state.recommender.compute.remote
        answer = client.post("/recommend", json={"history": history, "k": 5}).json()
        assert answer["reranked"] and len(answer["items"]) == 5
        (models / "CURRENT").write_text("with-head-2\n")
        reloaded = client.post(
            "/admin/reload",
            headers={"authorization": f"Bearer {settings.admin_token.get_secret_value()}"},
        )
        assert reloaded.status_code == 200
        again = client.post("/recommend", json={"history": history, "k": 5}).json()
        assert again["bundle"] == "with-head-2"
        assert [i["item_id"] for i in again["items"]] == [i["item_id"] for i in answer["items"]]
        second = state.recommender.compute.remote
        assert second is not first and second.running
        for _ in range(100):  # the old one stops once idle
            if not first.running:
                break
            client.get("/healthz")
            time.sleep(0.05)
        assert not first.running
    assert not second.running  # stopped at shutdown


def compute_jobs(bundle, histories):
    """The queries a recommender would send for these histories (no cache)."""
    requests = [
        RankingRequest(
            events=events,
            k=5,
            keep=20,
            exclude_seen=True,
            rerank=True,
            history_cap=1000,
            request_time=1_800_000_000,
        )
        for events in histories
    ]
    _, queries = prepare_queries(bundle.catalogue, bundle.retrievers["sasrec"], requests)
    return queries


def test_batches_queued_in_the_compute_process_are_merged_yet_answered_apart(
    head_models, tiny_data
):
    bundle = load_bundle(head_models, device="cpu")
    groups = [
        compute_jobs(bundle, [user_events(tiny_data, user) for user in users])
        for users in ([0, 1], [2], [3, 4, 5])
    ]
    bad = compute_jobs(bundle, [user_events(tiny_data, 6)])
    bad[0].window = bad[0].window[:, :0]  # an empty window: encoding fails
    alone = [asyncio.run(ThreadCompute(bundle).batch("sasrec", jobs)) for jobs in groups]

    async def scenario():
        compute = ProcessCompute(
            ComputeConfig(models_dir=head_models, bundle="with-head", device="cpu")
        )
        await compute.start()
        try:
            os.kill(compute._process.pid, signal.SIGSTOP)  # so that all four queue up
            calls = [asyncio.ensure_future(compute.batch("sasrec", jobs)) for jobs in groups]
            calls.insert(1, asyncio.ensure_future(compute.batch("sasrec", bad)))
            await asyncio.sleep(0.2)
            os.kill(compute._process.pid, signal.SIGCONT)
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await compute.close()

    first, failed, *rest = asyncio.run(scenario())
    assert isinstance(failed, ComputeError)  # only the bad request's call failed
    for got, expected in zip([first, *rest], alone, strict=True):
        assert [a.ids.tolist() for a in got] == [a.ids.tolist() for a in expected]
        np.testing.assert_allclose([a.scores for a in got], [a.scores for a in expected], rtol=1e-5)


def test_a_stopped_compute_process_is_replaced_within_its_stall_bound_and_the_call_retried(
    head_models,
):
    queries = similar_queries(head_models)

    async def scenario():
        compute = ProcessCompute(
            ComputeConfig(models_dir=head_models, bundle="with-head", device="cpu"),
            call_timeout=30.0,
            stall_seconds=0.5,
        )
        await compute.start()
        try:
            stuck = compute._process.pid
            os.kill(stuck, signal.SIGSTOP)
            started = time.monotonic()
            # Answered by the replacement: the call is retried once, far inside its timeout.
            (ranked,) = await compute.batch("sasrec", queries)
            took = time.monotonic() - started
            return (
                stuck,
                compute._process.pid,
                ranked.ids,
                took,
                compute.replaced,
                compute.available,
            )
        finally:
            await compute.close()

    stuck, replacement, ids, took, replaced, available = asyncio.run(scenario())
    assert replacement != stuck and len(ids) == 5 and replaced == 1 and available
    assert took < 10.0  # the stall bound plus a new child's start, not the 30 s timeout
    with pytest.raises(ProcessLookupError):
        os.kill(stuck, 0)  # killed, not left stopped


def test_a_stalled_compute_process_is_noticed_without_a_call(head_models):
    async def scenario():
        compute = ProcessCompute(
            ComputeConfig(models_dir=head_models, bundle="with-head", device="cpu"),
            stall_seconds=0.5,
        )
        await compute.start()
        try:
            stuck = compute._process.pid
            os.kill(stuck, signal.SIGSTOP)
            await asyncio.sleep(0.8)
            noticed = not compute.available
            for _ in range(200):  # replaced by the watchdog alone
                if compute.available and compute._process.pid != stuck:
                    break
                await asyncio.sleep(0.05)
            return noticed, compute.available, compute._process.pid != stuck
        finally:
            await compute.close()

    assert asyncio.run(scenario()) == (True, True, True)


def test_a_bad_request_fails_only_itself_and_the_compute_process_serves_on(head_models, tiny_data):
    bundle = load_bundle(head_models, device="cpu")
    good = compute_jobs(bundle, [user_events(tiny_data, 1)])
    bad = compute_jobs(bundle, [user_events(tiny_data, 2)])
    bad[0].window = bad[0].window[:, :0]  # an empty window: encoding fails

    async def scenario():
        compute = ProcessCompute(
            ComputeConfig(models_dir=head_models, bundle="with-head", device="cpu")
        )
        await compute.start()
        try:
            pid = compute._process.pid
            with pytest.raises(ComputeError) as failed:
                await compute.batch("sasrec", bad)
            answered = await compute.batch("sasrec", good)
            return pid, compute._process.pid, compute.replaced, failed.value, answered
        finally:
            await compute.close()

    before, after, replaced, failure, answered = asyncio.run(scenario())
    assert before == after and replaced == 0  # the same child, never restarted
    assert not isinstance(failure, ComputeUnavailable) and "Error" in str(failure)
    assert len(answered) == 1 and len(answered[0].ids) == 5


def test_compute_failures_answer_one_line_errors_and_readyz_follows_the_compute(
    make_settings, monkeypatch, caplog
):
    body = {"history": [{"item_id": "1", "ts": 1_700_000_000}], "k": 3}
    with TestClient(create_app(make_settings(compute="thread"))) as client:
        compute = client.app.state.recserve.recommender.compute

        async def unavailable(retriever, queries):
            raise ComputeUnavailable("compute process for tiny stalled (1.2 s silent)")

        monkeypatch.setattr(compute, "batch", unavailable)
        response = client.post("/recommend", json=body)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json() == {"detail": "compute unavailable, retry shortly"}

        async def failed(retriever, queries):
            raise ComputeError("ValueError: a bad window")

        monkeypatch.setattr(compute, "batch", failed)
        with caplog.at_level("ERROR", logger="service.api.errors"):
            response = client.post("/recommend", json=body)
        assert response.status_code == 500
        assert response.json() == {"detail": "compute failed for this request"}
        logged = [r for r in caplog.records if "a bad window" in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is None  # one line, no traceback
        assert logged[0].name == "service.api.errors"

        assert client.get("/readyz").json()["ready"] is True
        monkeypatch.setattr(type(compute), "available", property(lambda self: False))
        answer = client.get("/readyz")
        assert answer.status_code == 503 and answer.json()["ready"] is False
