"""Worker state: shutdown always finishes, even when a library loses a cancellation."""

from __future__ import annotations

import asyncio
import time

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
