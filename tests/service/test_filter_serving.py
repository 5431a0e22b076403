"""Request filters end to end on the tiny bundle: the recommender, the API, a real server.

The bundle is the tiny one with attributes added to its items table: a ``colour``
(string), a ``price`` (the internal id) and some items unavailable (the five most
popular, and every seventh), so that each path that could serve them is tested against
it: /recommend, its popularity fallback, /items/{id}/similar, the retrieval cache and
the answer memo.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from cachetools import TTLCache
from fastapi.testclient import TestClient

from service.api.schemas import RecommendResponse, SimilarResponse
from service.bundle import load_bundle
from service.cache import InMemoryBehaviourCache
from service.catalogue import ItemFilter, read_catalogue, write_items_table
from service.errors import InvalidField
from service.main import create_app
from service.recommender import Recommender
from tests.servers import UvicornService
from tests.service.bundles import manifest_of, write_manifest
from tests.service.conftest import history_events, server_settings
from tests.service.test_recommender import recommend, user_events

STARTUP_SECONDS = 60
USERS = (0, 2, 5, 9, 11)


@pytest.fixture(scope="module")
def attributed_models(exported_bundle, tmp_path_factory) -> Path:
    """A models dir whose CURRENT bundle ("tiny") has colour, price and availability."""
    models_dir, _ = exported_bundle
    out = tmp_path_factory.mktemp("attributed") / "models"
    shutil.copytree(models_dir, out)
    bundle = out / "tiny"
    catalogue = read_catalogue(bundle / "items.parquet")
    ids = np.arange(catalogue.n_items + 1)
    colour = np.where(ids % 3 == 0, "red", "blue").astype(object)
    colour[ids % 10 == 0] = None
    available = (ids > 0) & (ids % 7 != 0)
    available[catalogue.popularity_order[:5]] = False
    raw = catalogue.raw_ids.tolist()
    write_items_table(
        bundle / "items.parquet",
        raw,
        catalogue.popularity,
        titles={r: t for r, t in zip(raw, catalogue.titles, strict=True) if t},
        genres=dict(zip(raw, catalogue.genres, strict=True)),
        last_seen=catalogue.last_seen,
        attributes={"colour": colour, "price": ids.astype(float)},
        available=available,
    )
    write_manifest(bundle, manifest_of(bundle))
    return out


@pytest.fixture(scope="module")
def bundle(attributed_models):
    return load_bundle(attributed_models, device="cpu")


@pytest.fixture(scope="module")
def recommender(bundle):
    return Recommender(bundle)


def internal(bundle, result) -> np.ndarray:
    return np.array([bundle.catalogue.lookup[item["item_id"]] for item in result.items], int)


def category(bundle, name: str) -> set[int]:
    return set(bundle.catalogue.categories[name].tolist())


# --------------------------------------------------------------------------- the recommender


def test_unavailable_items_are_never_served_unless_the_filter_allows_them(
    recommender, bundle, tiny_data
):
    available = bundle.catalogue.available
    everything = ItemFilter(available_only=False)
    served_anyway = False
    for user in USERS:
        events = user_events(tiny_data, user)
        assert available[internal(bundle, recommend(recommender, events, k=30))].all()
        allowed = internal(bundle, recommend(recommender, events, k=30, item_filter=everything))
        served_anyway |= not available[allowed].all()
    assert served_anyway  # the test means something: retrieval ranks them among the 30
    fallback = recommend(recommender, [("no-such-item", 1)], k=10)
    assert fallback.fallback == "popularity" and available[internal(bundle, fallback)].all()
    assert fallback.filtered == 5  # the five most popular are unavailable
    similar = asyncio.run(recommender.similar("3", 30, None))
    assert available[internal(bundle, similar)].all() and len(similar.items) == 30


def test_a_category_filter_serves_k_items_of_it(recommender, bundle, tiny_data):
    wanted = category(bundle, "genre-0")
    only = ItemFilter(include_categories=("genre-0",))
    without = ItemFilter(exclude_categories=("genre-0",))
    for user in USERS:
        events = user_events(tiny_data, user)
        inside = recommend(recommender, events, k=10, item_filter=only)
        assert len(inside.items) == 10 and set(internal(bundle, inside).tolist()) <= wanted
        outside = recommend(recommender, events, k=10, item_filter=without)
        assert len(outside.items) == 10 and not set(internal(bundle, outside).tolist()) & wanted
        assert inside.filtered + outside.filtered > 0


def test_the_popularity_fallback_honours_the_filter(recommender, bundle):
    catalogue = bundle.catalogue
    item_filter = ItemFilter(attributes=(("colour", "red"),), exclude_items=("3",))
    result = recommend(recommender, [("no-such-item", 1)], k=8, item_filter=item_filter)
    order = catalogue.popularity_order
    eligible = catalogue.eligible(item_filter).mask.copy()
    eligible[catalogue.lookup["3"]] = False
    expected = order[eligible[order]][:8]
    assert internal(bundle, result).tolist() == expected.tolist()
    last = np.flatnonzero(order == expected[-1])[0]
    assert result.filtered == int(np.count_nonzero(~eligible[order[:last]]))


def test_similar_items_honour_the_filter(recommender, bundle):
    item_filter = ItemFilter(ranges=(("price", 20.0, 60.0),), exclude_items=("30",))
    similar = asyncio.run(recommender.similar("3", 10, None, item_filter))
    prices = bundle.catalogue.number_attributes["price"][internal(bundle, similar)]
    assert len(similar.items) == 10 and ((prices >= 20) & (prices <= 60)).all()
    assert "30" not in [item["item_id"] for item in similar.items] and similar.filtered > 0


def test_the_retrieval_cache_serves_every_filter_and_never_what_it_excludes(
    recommender, bundle, tiny_data
):
    """An entry holds the unfiltered retrieval: a filtered request hits it, and a filter
    it is too shallow for is searched again."""
    cache = InMemoryBehaviourCache()
    cheap = ItemFilter(ranges=(("price", 0.0, 12.0),))
    for user in USERS:
        events = user_events(tiny_data, user)
        first = recommend(recommender, events, cache=cache)
        asyncio.run(recommender.drain())
        cached = recommend(recommender, events, cache=cache, item_filter=cheap)
        fresh = recommend(recommender, events, item_filter=cheap)
        assert (first.cache, cached.cache) == ("miss", "hit")
        assert cached.items == fresh.items and cached.filtered == fresh.filtered
        prices = bundle.catalogue.number_attributes["price"][internal(bundle, cached)]
        assert (prices <= 12).all() and bundle.catalogue.available[internal(bundle, cached)].all()


def test_the_answer_memo_never_reuses_an_answer_across_filters(bundle, tiny_data):
    memo = Recommender(bundle, answers=TTLCache(10_000, 60))
    events = user_events(tiny_data, 2)
    red = ItemFilter(attributes=(("colour", "red"),))
    plain = recommend(memo, events)
    filtered = recommend(memo, events, item_filter=red)
    again = recommend(memo, events, item_filter=ItemFilter(attributes=(("colour", "red"),)))
    blue = recommend(memo, events, item_filter=ItemFilter(attributes=(("colour", "blue"),)))
    assert (plain.cache, filtered.cache, again.cache, blue.cache) == (
        "bypass",
        "bypass",
        "answer",
        "bypass",
    )
    assert again.items == filtered.items != plain.items
    colour = bundle.catalogue.text_attributes["colour"]
    assert (colour.codes[internal(bundle, blue)] == colour.values["blue"]).all()
    assert (colour.codes[internal(bundle, again)] == colour.values["red"]).all()


def test_the_batch_job_never_recommends_an_unavailable_item(bundle, tiny_data, tmp_path):
    import pyarrow.parquet as pq

    from training.batch_recommend import batch_recommend

    batch_recommend(bundle, tiny_data, tmp_path / "recs.parquet", k=10, history="test")
    recs = pq.read_table(tmp_path / "recs.parquet").to_pydict()
    served = bundle.catalogue.internal_ids(recs["item"])
    assert bundle.catalogue.available[served].all()
    assert set(np.bincount(np.unique(recs["user"], return_inverse=True)[1])) == {10}


def test_a_filter_on_an_attribute_the_catalogue_lacks_fails_alone(recommender, tiny_data):
    with pytest.raises(InvalidField, match="^filter.ranges.size: "):
        recommend(
            recommender,
            user_events(tiny_data, 2),
            item_filter=ItemFilter(ranges=(("size", 1.0, 2.0),)),
        )


# --------------------------------------------------------------------------- the API


@pytest.fixture
def attributed_client(make_settings, attributed_models):
    with TestClient(create_app(make_settings(models_dir=attributed_models))) as client:
        yield client


MALFORMED = [
    ({"ranges": {"price": {"min": 5, "max": 1}}}, "body.filter.ranges.price.max"),
    ({"ranges": {"price": {}}}, "body.filter.ranges.price"),
    ({"ranges": {"price": {"min": "cheap"}}}, "body.filter.ranges.price.min"),
    ({"ranges": {"price": {"low": 1}}}, "body.filter.ranges.price.low"),
    ({"colour": "red"}, "body.filter.colour"),
    ({"include_categories": []}, "body.filter.include_categories"),
    ({"include_categories": ["x" * 257]}, "body.filter.include_categories.0"),
    ({"exclude_categories": ["x"] * 257}, "body.filter.exclude_categories"),
    ({"exclude_items": ["x"] * 1001}, "body.filter.exclude_items"),
    ({"attributes": {"colour": 3}}, "body.filter.attributes.colour"),
    ({"attributes": {f"a{i}": "x" for i in range(33)}}, "body.filter.attributes"),
    ({"attributes": {"size": "L"}}, "filter.attributes.size"),  # not in the catalogue
    ({"ranges": {"colour": {"min": 1}}}, "filter.ranges.colour"),  # a string attribute
    ("red", "body.filter"),
]


def test_malformed_filters_are_422_naming_the_field(attributed_client, history):
    for item_filter, field in MALFORMED:
        response = attributed_client.post(
            "/recommend", json={"history": history, "filter": item_filter}
        )
        assert response.status_code == 422, (item_filter, response.text)
        assert field in response.json()["detail"], (item_filter, response.text)
    # JSON has no infinity, but a number too large for a float reads as one.
    body = b'{"user_id": "u", "filter": {"ranges": {"price": {"min": 1e999}}}}'
    response = attributed_client.post(
        "/recommend", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "body.filter.ranges.price.min" in response.json()["detail"]


def test_a_filtered_answer_says_how_many_candidates_the_filter_removed(attributed_client, history):
    item_filter = {"include_categories": ["genre-1"], "ranges": {"price": {"max": 90}}}
    for body in (
        {"history": history, "k": 5, "filter": item_filter},
        {"history": [{"item_id": "no-such-item", "ts": 1}], "k": 5, "filter": item_filter},
    ):
        answer = attributed_client.post("/recommend", json=body).json()
        assert RecommendResponse.model_validate(answer).model_dump() == answer
        assert len(answer["items"]) == 5 and answer["filtered"] > 0
    plain = attributed_client.post("/recommend", json={"history": history}).json()
    assert plain["filtered"] >= 0


def test_similar_items_take_the_filter_as_json(attributed_client):
    item_filter = {"ranges": {"price": {"min": 50}}, "available_only": False}
    response = attributed_client.get(
        "/items/3/similar", params={"k": 5, "filter": json.dumps(item_filter)}
    )
    assert response.status_code == 200, response.text
    body = SimilarResponse.model_validate(response.json())
    assert len(body.items) == 5 and all(int(item.item_id) >= 50 for item in body.items)
    for bad, field in (
        ({"ranges": {"price": {"min": 9, "max": 1}}}, "query.filter.ranges.price.max"),
        ({"attributes": {"size": "L"}}, "filter.attributes.size"),
    ):
        refused = attributed_client.get("/items/3/similar", params={"filter": json.dumps(bad)})
        assert refused.status_code == 422 and field in refused.json()["detail"]
    broken = attributed_client.get("/items/3/similar", params={"filter": "{not json"})
    assert broken.status_code == 422 and "query.filter" in broken.json()["detail"]


# --------------------------------------------------------------------------- a real server


def test_filters_over_http_with_a_compute_process(
    attributed_models, key_prefix, tiny_data, tmp_path
):
    """As deployed: uvicorn, the default process compute, the shared Redis."""
    service = UvicornService(
        server_settings(attributed_models, key_prefix), log_path=tmp_path / "uvicorn.log"
    )
    service.start(timeout=STARTUP_SECONDS)
    catalogue = read_catalogue(attributed_models / "tiny" / "items.parquet")
    red = {"attributes": {"colour": "red"}}
    try:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            history = history_events(tiny_data, 5)
            plain = client.post("/recommend", json={"history": history, "k": 10}).json()
            answer = client.post(
                "/recommend", json={"history": history, "k": 10, "filter": red}
            ).json()
            fallback = client.post(
                "/recommend",
                json={"history": [{"item_id": "nope", "ts": 1}], "k": 10, "filter": red},
            ).json()
            similar = client.get(
                "/items/4/similar", params={"k": 10, "filter": json.dumps(red)}
            ).json()
    finally:
        service.stop()
    assert (plain["cache"], answer["cache"]) == ("miss", "hit")
    colour = catalogue.text_attributes["colour"]
    for body in (answer, fallback, similar):
        ids = [catalogue.lookup[item["item_id"]] for item in body["items"]]
        assert len(ids) == 10 and (colour.codes[ids] == colour.values["red"]).all()
        assert catalogue.available[ids].all()
    assert "Traceback" not in service.log()
