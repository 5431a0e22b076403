"""batch-recommend --warm-cache: the first user_id-only request is already a cache hit."""

import asyncio

from service.bundle import load_bundle
from service.cache import RedisBehaviourCache
from service.recommender import Recommender
from training.batch_recommend import warm_cache


def test_warmed_users_are_served_from_the_cache_with_the_items_a_fresh_run_gives(
    client, make_settings, tiny_data, served_models
):
    settings = make_settings()
    bundle = load_bundle(served_models, device="cpu")

    async def warm():
        cache = RedisBehaviourCache(
            settings.redis_url, settings.key_prefix, settings.history_cap, 60, timeout=5.0
        )
        try:
            return await warm_cache(cache, bundle, tiny_data, candidates=settings.candidates)
        finally:
            await cache.close()

    async def uncached(events):
        result = await Recommender(bundle).recommend(
            events,
            k=10,
            encoder=None,
            exclude_seen=True,
            candidates=settings.candidates,
            rerank=True,
            cache=None,
            history_cap=settings.request_history_cap,
        )
        return [item["item_id"] for item in result.items]

    assert asyncio.run(warm())["users_warmed"] == tiny_data.n_users
    for user in range(5):
        raw_user = str(tiny_data.user_map.raw[user + 1])
        served = client.post("/recommend", json={"user_id": raw_user, "k": 10}).json()
        assert served["cache"] == "hit", raw_user
        span = slice(tiny_data.offsets[user], tiny_data.offsets[user + 1])
        events = list(
            zip(
                tiny_data.item_map.raw[tiny_data.items[span]].tolist(),
                tiny_data.timestamps[span].tolist(),
                strict=True,
            )
        )
        assert [i["item_id"] for i in served["items"]] == asyncio.run(uncached(events))
