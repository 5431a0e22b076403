"""bench/plain_peer.py: the yardstick does recserve's work, so it serves recserve's items."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from bench import plain_peer
from service.bundle import current_name, load_bundle
from service.recommender import Recommender
from service.settings import Settings

AT = 1_800_000_000


@pytest.fixture(scope="module")
def peer(head_models):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(plain_peer.MODELS_DIR_ENV, str(head_models))
        patch.setenv(plain_peer.BUNDLE_ENV, current_name(head_models))
        with TestClient(plain_peer.create_app()) as client:
            yield client


def recserve_items(models_dir, cases: list[tuple[list, bool | None]]) -> list[list[str]]:
    settings = Settings(models_dir=models_dir, dev_mode=True, compute="thread", device="cpu")
    bundle = load_bundle(models_dir, current_name(models_dir), device="cpu")

    async def run() -> list[list[str]]:
        recommender = Recommender.from_settings(bundle, settings)
        await recommender.start()
        try:
            answers = [
                await recommender.recommend(events, k=10, rerank=rerank, at=AT)
                for events, rerank in cases
            ]
        finally:
            await recommender.close()
        return [[item["item_id"] for item in answer.items] for answer in answers]

    return asyncio.run(run())


def test_the_peer_serves_exactly_what_recserve_serves(peer, head_models, tiny_data):
    cases = []
    for user in range(1, 13):
        start, end = tiny_data.offsets[user], tiny_data.offsets[user + 1]
        items = tiny_data.item_map.raw[tiny_data.items[max(start, end - 15) : end]]
        # Out of order on purpose, with an unknown item: both sort by time and skip it.
        events = [(str(item), AT - 3600 * (j % 5) - j) for j, item in enumerate(items)]
        events.append(("no-such-item", AT - 10))
        cases.append((events, [None, True, False][user % 3]))
    expected = recserve_items(head_models, cases)
    for (events, rerank), want in zip(cases, expected, strict=True):
        body = {"history": [{"item_id": i, "ts": t} for i, t in events], "k": 10, "at": AT}
        if rerank is not None:
            body["rerank"] = rerank
        answer = peer.post("/recommend", json=body)
        assert answer.status_code == 200, answer.text
        assert [item["item_id"] for item in answer.json()["items"]] == want


def test_the_peer_refuses_what_pydantic_refuses_and_answers_an_unknown_history(peer):
    assert peer.post("/recommend", json={"history": [{"item_id": 1}]}).status_code == 422
    answer = peer.post("/recommend", json={"history": [{"item_id": "nope", "ts": 1}]})
    assert answer.json() == {"items": []}
