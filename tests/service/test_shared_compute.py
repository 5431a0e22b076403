"""One compute process per host: every worker's batches computed by one process holding one
copy of the models, each answer reaching its own request, a crash costing only a retry."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import ServiceProcess
from service import compute_host
from service.bundle import load_bundle
from service.compute import (
    BEAT,
    NO_FRAME,
    ComputeConfig,
    SharedCompute,
    ThreadCompute,
    compute_mode,
    frame,
    take_frame,
)
from service.compute_host import ComputeServer, merge_runs
from service.errors import BundleError, ComputeError
from service.settings import Settings
from tests.servers import wait_until
from tests.service.conftest import history_events, server_settings
from tests.service.test_compute import compute_jobs, similar_queries
from tests.service.test_recommender import user_events

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    # A short path: a Unix socket's must fit in 108 bytes.
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"rs-{os.getpid()}-{id(tmp_path)}"
    directory.mkdir()
    server = ComputeServer(directory / "c.sock")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        directory.rmdir()


def config(models) -> ComputeConfig:
    return ComputeConfig(models_dir=models, bundle="with-head", device="cpu")


@pytest.mark.parametrize(
    "merge_limit, computations, host_threads", [(32, 1, 1), (3, 3, 1), (3, 3, 2)]
)
def test_the_workers_batches_are_merged_in_one_process_yet_each_answer_reaches_its_own(
    server, head_models, tiny_data, merge_limit, computations, host_threads
):
    bundle = load_bundle(head_models, device="cpu")
    groups = [
        compute_jobs(bundle, [user_events(tiny_data, user) for user in users])
        for users in ([0, 1], [2], [3, 4, 5], [6])
    ]
    alone = [asyncio.run(ThreadCompute(bundle).batch("sasrec", jobs)) for jobs in groups]

    async def scenario():
        update = {"merge_limit": merge_limit, "host_threads": host_threads}
        merging = config(head_models).model_copy(update=update)
        workers = [SharedCompute(merging, server.path) for _ in range(2)]
        for worker in workers:
            await worker.start()
        try:
            pids = {worker.pid for worker in workers}
            os.kill(server.process.pid, signal.SIGSTOP)  # so that every batch queues up
            calls = [
                asyncio.ensure_future(workers[i % 2].batch("sasrec", jobs))
                for i, jobs in enumerate(groups)
            ]
            await asyncio.sleep(0.3)
            os.kill(server.process.pid, signal.SIGCONT)
            return pids, await asyncio.gather(*calls)
        finally:
            for worker in workers:
                await worker.close()

    pids, results = asyncio.run(scenario())
    assert pids == {server.process.pid}  # one process, so one copy of the models
    for got, expected in zip(results, alone, strict=True):
        assert [a.ids.tolist() for a in got] == [a.ids.tolist() for a in expected]
        np.testing.assert_allclose([a.scores for a in got], [a.scores for a in expected], rtol=1e-5)
    # Both workers' batches were merged, in computations of at most merge_limit queries
    # (batches of 2, 1, 3 and 1 make three under a limit of 3, in any order they arrive),
    # whether one thread computes them or two at once: each answer carries its
    # computation's timings.
    assert len({tuple(r.timings.values()) for batch in results for r in batch}) == computations


def frames_from(connection: socket.socket, count: int, timeout: float = 30.0) -> list:
    """The next ``count`` frames a compute host sends on ``connection`` (heartbeats skipped)."""
    buffer, frames = bytearray(), []
    connection.settimeout(timeout)
    while len(frames) < count:
        value = take_frame(buffer)
        if value is NO_FRAME:
            buffer += connection.recv(1 << 20)
        elif value is not BEAT:
            frames.append(value)
    return frames


@pytest.mark.parametrize("host_threads, overlapped", [(2, True), (1, False)])
def test_a_host_with_two_threads_runs_two_computations_at_once(
    head_models, tiny_data, monkeypatch, host_threads, overlapped
):
    # Each computation waits for a second one to be running beside it: only a host that
    # computes two at once answers both without the barrier breaking.
    together = threading.Barrier(2, timeout=3)
    batches = compute_host._batches

    def meeting(*args):
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait()
        return batches(*args)

    monkeypatch.setattr(compute_host, "_batches", meeting)
    host = compute_host.ComputeHost()
    ours, theirs = socket.socketpair()
    host.add(theirs)
    loop = threading.Thread(target=host.run, daemon=True)
    loop.start()
    try:
        update = {"merge_limit": 1, "host_threads": host_threads}
        ours.sendall(frame(config(head_models).model_copy(update=update).model_dump_json()))
        ((loaded, _),) = frames_from(ours, 1, timeout=120)
        assert loaded is True
        bundle = load_bundle(head_models, device="cpu")
        jobs = compute_jobs(bundle, [user_events(tiny_data, 0), user_events(tiny_data, 1)])
        # Two requests sent together: two runs under merge_limit 1.
        ours.sendall(b"".join(frame((i, "batch", ("sasrec", [job]))) for i, job in enumerate(jobs)))
        replies = frames_from(ours, 2)
        assert sorted(call_id for call_id, _, _ in replies) == [0, 1]
        assert all(ok for _, ok, _ in replies)
        assert together.broken is not overlapped
    finally:
        ours.close()
        loop.join(timeout=10)


@pytest.mark.parametrize(
    "sizes, limit, runs",
    [
        ([2, 1, 3, 1], 32, [[2, 1, 3, 1]]),
        ([2, 1, 3, 1], 3, [[2, 1], [3], [1]]),
        ([5, 1], 3, [[5], [1]]),  # bigger than the limit: a run of its own
        ([1, 1, 1], 1, [[1], [1], [1]]),
    ],
)
def test_queued_batches_are_merged_in_order_up_to_the_limit(sizes, limit, runs):
    requests = [("link", call_id, ["query"] * size) for call_id, size in enumerate(sizes)]
    got = merge_runs(requests, limit)
    assert [[len(queries) for _, _, queries in run] for run in got] == runs
    assert [request for run in got for request in run] == requests


def test_a_crashed_shared_process_is_restarted_and_the_call_it_held_retried(server, head_models):
    queries = similar_queries(head_models)

    async def scenario():
        worker = SharedCompute(config(head_models), server.path)
        await worker.start()
        try:
            (before,) = await worker.batch("sasrec", queries)
            first = worker.pid
            os.kill(first, signal.SIGSTOP)  # a call is sure to be pending when it dies
            pending = asyncio.ensure_future(worker.batch("sasrec", queries))
            await asyncio.sleep(0.2)
            os.kill(first, signal.SIGKILL)
            (retried,) = await pending  # sent once more, to the process the server started
            return first, worker.pid, worker.replaced, before, retried
        finally:
            await worker.close()

    first, second, replaced, before, retried = asyncio.run(scenario())
    assert second != first and second == server.process.pid and server.restarts == 1
    assert replaced == 1
    np.testing.assert_array_equal(before.ids, retried.ids)


def test_a_bundle_the_shared_process_cannot_load_is_refused_and_it_serves_on(
    server, head_models, tmp_path
):
    async def scenario():
        broken = SharedCompute(
            ComputeConfig(models_dir=tmp_path / "nowhere", bundle="with-head", device="cpu"),
            server.path,
        )
        with pytest.raises(BundleError, match="nowhere"):
            await broken.start()
        worker = SharedCompute(config(head_models), server.path)
        await worker.start()
        try:
            return await worker.batch("sasrec", similar_queries(head_models))
        finally:
            await worker.close()

    (ranked,) = asyncio.run(scenario())
    assert len(ranked.ids) == 5 and server.restarts == 0


def test_shared_compute_needs_the_process_service_serve_starts(tmp_path):
    def mode(**fields) -> str:
        return compute_mode(Settings(admin_enabled=False, **fields))

    assert mode(compute="auto") == "process"
    assert mode(compute="thread", compute_socket=tmp_path) == "thread"
    assert mode(compute="auto", compute_socket=tmp_path) == "shared"
    with pytest.raises(ComputeError, match="RECSERVE_COMPUTE_SOCKET"):
        mode(compute="shared")


def loaded_onnxruntime(pid: int) -> bool:
    """Whether process ``pid`` has onnxruntime's native library mapped."""
    return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()


def server_figures(text: str) -> dict[tuple[str, tuple], float]:
    """The samples of a /metrics text by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_two_workers_share_one_compute_process_and_answer_each_request_as_one_worker(
    served_models, key_prefix, tiny_data, tmp_path
):
    settings = server_settings(served_models, key_prefix)
    service = ServiceProcess(settings, workers=2, log_path=tmp_path / "uvicorn.log")
    service.start(timeout=120)
    try:
        roles = service.pids_by_role()
        assert len(roles["workers"]) == 2 and len(roles["compute"]) == 1
        # One copy of the models on the host: only the compute process has loaded the
        # encoder's runtime (the workers import it only to load models of their own).
        assert [loaded_onnxruntime(pid) for pid in roles["compute"]] == [True]
        assert [loaded_onnxruntime(pid) for pid in roles["workers"]] == [False, False]
        bodies = [
            {"history": history_events(tiny_data, user), "k": 10, "at": 1_800_000_000}
            for user in range(16)
        ]
        got: dict[int, list] = {}

        def ask(indices: list[int]) -> None:
            with httpx.Client(base_url=service.url, timeout=30) as http:
                for i in indices:
                    got[i] = http.post("/recommend", json=bodies[i]).json()["items"]

        # Concurrent clients over both workers first (cache misses, computed in merged
        # batches), then one client asking each history alone (cache hits): an answer that
        # reached another request would show as a difference.
        threads = [
            threading.Thread(target=ask, args=(list(range(start, 16, 4)),)) for start in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with httpx.Client(base_url=service.url, timeout=30) as http:
            expected = [http.post("/recommend", json=body).json()["items"] for body in bodies]
        assert all(expected) and len({str(items) for items in expected}) > 1
        assert [got[i] for i in range(16)] == expected
        wait_until(lambda: service.pids_by_role()["compute"] == roles["compute"], timeout=1)
        # /metrics answers for the whole server whichever worker a scrape reaches: each of
        # several scrapes (new connections, spread over the workers) counts all 32 answers.
        answered = (("route", "/recommend"), ("status", "200"))
        for _ in range(6):
            figures = server_figures(httpx.get(f"{service.url}/metrics", timeout=10).text)
            assert figures[("recserve_requests_total", answered)] == 32
            outcomes = sum(v for (name, _), v in figures.items() if name == "recserve_cache_total")
            assert outcomes == 32
            assert figures[("recserve_bundle_info", (("bundle", "tiny"),))] == 1
    finally:
        service.stop()
    assert "Traceback" not in service.log()
