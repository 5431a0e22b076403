"""The service as deployed: uvicorn in a subprocess, configured by RECSERVE_* variables."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.servers import UvicornService
from tests.service.conftest import ADMIN_TOKEN, history_events, server_settings

STARTUP_SECONDS = 60  # imports of onnxruntime and faiss on a busy machine


@pytest.fixture
def server(served_models, key_prefix, tmp_path):
    """A uvicorn process serving the tiny bundle; yields its base URL; always stopped."""
    service = UvicornService(
        server_settings(served_models, key_prefix),
        log_path=tmp_path / "uvicorn.log",
        access_log=True,
    )
    service.start(timeout=STARTUP_SECONDS)
    try:
        yield service.url
    finally:
        service.stop()
    # A clean shutdown: the lifespan ended without hanging or a traceback.
    text = service.log()
    assert "Traceback" not in text, text


def test_events_then_recommendations_over_http(server, tiny_data):
    history = history_events(tiny_data, 2)
    with httpx.Client(base_url=server, timeout=10) as client:
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        ready = client.get("/readyz", headers=admin).json()
        assert ready["bundle"] == "tiny" and ready["redis"] == "up"
        assert set(ready["placement"]) == set(ready["encoders"])
        for stages in ready["placement"].values():
            assert (stages["encoder"], stages["index"]) == ("CPUExecutionProvider", "cpu")
        stored = client.post("/events", json=[{"user_id": "u-1", **e} for e in history])
        assert stored.status_code == 200
        assert stored.json() == {"received": len(history), "added": len(history), "attributed": 0}

        first = client.post("/recommend", json={"user_id": "u-1", "k": 5})
        second = client.post("/recommend", json={"user_id": "u-1", "k": 5})
        assert first.status_code == 200 and len(first.json()["items"]) == 5
        assert (first.json()["cache"], second.json()["cache"]) == ("miss", "hit")
        assert first.json()["items"] == second.json()["items"]

        bad = client.post("/recommend", json={"user_id": "u-1", "k": 0})
        assert bad.status_code == 422 and "k" in bad.json()["detail"]
        broken = client.post(
            "/recommend",
            content=b"[" * 100_000,
            headers={"content-type": "application/json"},
        )
        assert 400 <= broken.status_code < 500 and "Traceback" not in broken.text
        reload = client.post("/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert reload.status_code == 200 and reload.json()["serving"] == "tiny"
        assert "recserve_cache_total" in client.get("/metrics").text


@pytest.mark.slow
def test_served_top_k_equals_the_offline_ranking(server, tiny_data, trained_run):
    """Exact index, no rerank, seen items excluded: HTTP answers are the offline ranking."""
    import torch

    from training.evaluate import model_scorer, ranked_scores

    users, history_end, _ = tiny_data.eval_examples("test")
    chosen = np.linspace(0, len(users) - 1, 8).astype(int)
    users, history_end = users[chosen], history_end[chosen]
    model = trained_run.model
    scores = ranked_scores(model_scorer(model), tiny_data, users, history_end, model.max_len)
    offline = torch.topk(scores, 10, dim=1).indices.numpy()

    with httpx.Client(base_url=server, timeout=10) as client:
        for row, (user, end) in enumerate(zip(users, history_end, strict=True)):
            history = history_events(tiny_data, int(user), int(end))
            expected = tiny_data.item_map.raw[offline[row]].tolist()
            request = {"k": 10, "exclude_seen": True, "rerank": False}
            by_history = client.post("/recommend", json={**request, "history": history})
            assert by_history.status_code == 200, by_history.text
            body = by_history.json()
            assert body["reranked"] is False and body["fallback"] is None
            assert [item["item_id"] for item in body["items"]] == expected, user

            # The same history sent as events and read back from Redis gives the same.
            raw_user = str(tiny_data.user_map.raw[user + 1])
            stamps = [event["ts"] for event in history]
            if len(set(stamps)) == len(stamps):  # ties may come back in another order
                events = [{"user_id": raw_user, **event} for event in history]
                assert client.post("/events", json=events).status_code == 200
                by_user = client.post("/recommend", json={**request, "user_id": raw_user})
                assert [item["item_id"] for item in by_user.json()["items"]] == expected
