"""Worker state: shutdown always finishes, even when a library loses a cancellation."""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
import weakref

import service.state as state_module
from service.cache import InMemoryBehaviourCache
from service.metrics import Metrics
from service.settings import Settings
from service.state import AppState


def test_shutdown_does_not_hang_when_a_task_swallows_a_cancellation(monkeypatch, tmp_path):
    # Python 3.11's asyncio.wait_for (used by redis-py's sends) can swallow a cancellation;
    # the reload listener then waits for ever. Shutdown must cancel again, not hang.
    monkeypatch.setattr(state_module, "STOP_WAIT_SECONDS", 0.05)
    state = AppState(
        Settings(models_dir=tmp_path, dev_mode=True), InMemoryBehaviourCache(), Metrics()
    )
    seen = []

    async def stubborn():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("swallowed")
        await asyncio.sleep(3600)

    async def scenario():
        task = asyncio.create_task(stubborn())
        state._tasks.append(task)
        await asyncio.sleep(0)
        started = time.perf_counter()
        await state.stop_background()
        return task, time.perf_counter() - started

    task, took = asyncio.run(scenario())
    assert seen == ["swallowed"] and task.cancelled()
    assert took < 1.0
    assert state._tasks == []


def test_a_retired_bundle_is_freed_and_the_served_one_is_kept_out_of_the_collector(
    served_models, second_bundle
):
    # The served bundle is frozen out of the cyclic collector (a full pass over a large
    # catalogue stalls every request in flight); a retired one must still be freed, even
    # though the recommender that held it sits in a reference cycle.
    shutil.copytree(second_bundle, served_models / second_bundle.name)
    state = AppState(
        Settings(models_dir=served_models, dev_mode=True, compute="thread"),
        InMemoryBehaviourCache(),
        Metrics(),
    )

    async def scenario():
        await state.reload("tiny")
        first = weakref.ref(state.recommender.bundle)
        assert gc.get_freeze_count() > 0
        await state.reload(second_bundle.name)
        await asyncio.gather(*state._retiring)
        await asyncio.sleep(0)  # the retiring task's done callback
        assert state.recommender.bundle.name == second_bundle.name
        alive = first() is not None
        await state.close()
        return alive

    assert not asyncio.run(scenario())


def test_polling_clears_an_error_once_current_names_the_served_bundle_again(served_models):
    # CURRENT unreadable for a while (an operator's mistake), then fixed: the error it left
    # must not outlive it, as nothing else reloads while CURRENT names the served bundle.
    state = AppState(
        Settings(
            models_dir=served_models, dev_mode=True, compute="thread", reload_poll_seconds=0.02
        ),
        InMemoryBehaviourCache(),
        Metrics(),
    )

    async def wait_for(condition):
        for _ in range(500):
            if condition():
                return True
            await asyncio.sleep(0.01)
        return False

    async def scenario():
        await state.reload()
        state.start_background()
        try:
            current = served_models / "CURRENT"
            current.rename(served_models / "CURRENT.away")
            assert await wait_for(lambda: state.last_error is not None)
            (served_models / "CURRENT.away").rename(current)
            cleared = await wait_for(lambda: state.last_error is None)
            return cleared, state.bundle_name
        finally:
            await state.stop_background()
            await state.close()

    assert asyncio.run(scenario()) == (True, "tiny")


def test_a_flood_of_signals_costs_one_re_read_per_interval(tmp_path, monkeypatch):
    from service.reload_signals import ReloadSignals

    settings = Settings(
        models_dir=tmp_path, admin_token="x" * 20, reload_signal_interval_seconds=0.2
    )
    state = AppState(settings, InMemoryBehaviourCache(), Metrics())
    rereads = []

    async def reload(name=None):
        assert name is None  # a signal never names the bundle: CURRENT does
        rereads.append(time.perf_counter())
        return "tiny"

    monkeypatch.setattr(state, "reload", reload)
    sender = ReloadSignals.from_settings(settings)

    async def scenario():
        state.start_background()
        try:
            started = time.perf_counter()
            while time.perf_counter() - started < 0.5:
                assert state.on_signal(sender.sign()) == "accepted"
                assert state.on_signal(b"forged") == "unsigned"
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
        finally:
            await state.stop_background()

    asyncio.run(scenario())
    assert 2 <= len(rereads) <= 4  # at 0, 0.2, 0.4 s: not one per signal
    text = state.metrics.render().decode()
    assert 'recserve_reload_signals_total{outcome="unsigned"}' in text
