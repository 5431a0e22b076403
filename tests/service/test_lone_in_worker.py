"""LoneInWorker: a lone batch is computed in the worker, the others by the compute process."""

from __future__ import annotations

import asyncio

import pytest

from service.compute import LoneInWorker, lone_in_worker
from service.settings import Settings


class Backend:
    """A compute backend that records the batches it was given and takes ``seconds``."""

    def __init__(self, name: str, seconds: float = 0.02):
        self.name = name
        self.seconds = seconds
        self.batches: list[list[str]] = []
        self.changes: list[str] = []

    async def batch(self, retriever, queries):
        self.batches.append(list(queries))
        await asyncio.sleep(self.seconds)
        return [f"{self.name}:{query}" for query in queries]

    async def update_catalogue(self, change, everything, served):
        self.changes.append(change)


def test_a_lone_batch_runs_in_the_worker_and_company_goes_to_the_process():
    local, remote = Backend("local"), Backend("remote")
    compute = LoneInWorker(local, remote)

    async def scenario():
        alone = await compute.batch("r", ["a"])
        together = await asyncio.gather(
            compute.batch("r", ["b"]), compute.batch("r", ["c"]), compute.batch("r", ["d"])
        )
        big = await compute.batch("r", ["e", "f"])
        after = await compute.batch("r", ["g"])
        return alone, together, big, after

    alone, together, big, after = asyncio.run(scenario())
    assert alone == ["local:a"] and after == ["local:g"]
    # The first of three concurrent batches found nothing computing; the others did.
    assert together == [["local:b"], ["remote:c"], ["remote:d"]]
    assert big == ["remote:e", "remote:f"]  # more than one request: the process's
    assert local.batches == [["a"], ["b"], ["g"]]


def test_a_failing_lone_batch_frees_the_worker_for_the_next():
    class Failing(Backend):
        async def batch(self, retriever, queries):
            raise RuntimeError("onnx said no")

    compute = LoneInWorker(Failing("local"), Backend("remote"))

    async def scenario():
        with pytest.raises(RuntimeError):
            await compute.batch("r", ["a"])
        # Nothing is left counted as computing: the next lone batch is the worker's again.
        with pytest.raises(RuntimeError):
            await compute.batch("r", ["b"])

    asyncio.run(scenario())


def test_both_backends_get_every_catalogue_change():
    local, remote = Backend("local"), Backend("remote")
    asyncio.run(LoneInWorker(local, remote).update_catalogue("v2", "all", None))
    assert local.changes == ["v2"] and remote.changes == ["v2"]


@pytest.mark.parametrize(
    "setting, mode, expected",
    [
        ("auto", "process", True),  # a child of its own: the worker computes lone batches
        ("auto", "shared", False),  # one copy of the models per host
        ("on", "shared", True),
        ("off", "process", False),
        ("on", "thread", False),  # everything is computed in the worker already
    ],
)
def test_where_lone_batches_are_computed(setting, mode, expected):
    settings = Settings(admin_enabled=False, lone_in_worker=setting)
    assert lone_in_worker(settings, mode) is expected
