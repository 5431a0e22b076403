"""The living catalogue over HTTP: add, change and withdraw items while serving.

Against the real Redis (a unique key prefix per test) and the tiny bundle with
attributes (``attributed_models``: a string ``colour``, a numeric ``price``, some items
unavailable). The app tests run a TestClient with the compute thread; the last ones a
real server with two workers and their compute processes, under concurrent load.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.bundle import load_bundle, set_current
from service.main import create_app
from tests.servers import UvicornService, wait_until
from tests.service.conftest import ADMIN_TOKEN, ON_BOTH_REDIS, history_events, server_settings
from tests.service.test_filter_serving import attributed_models  # noqa: F401 (fixture)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
VISIBILITY_SECONDS = 1.0  # the bound docs/ARCHITECTURE.md promises


@pytest.fixture
def models(attributed_models, tmp_path) -> Path:  # noqa: F811 (the imported fixture)
    copy = tmp_path / "living"
    shutil.copytree(attributed_models, copy)
    return copy


@pytest.fixture
def bundle(models):
    return load_bundle(models, device="cpu")


@pytest.fixture
def app_client(make_settings, models):
    def make(**overrides):
        return TestClient(create_app(make_settings(models_dir=models, **overrides)))

    return make


def ask(client, history, **body) -> dict:
    response = client.post("/recommend", json={"history": history, "k": 10, **body})
    assert response.status_code == 200, response.text
    return response.json()


def served_ids(answer: dict) -> list[str]:
    return [item["item_id"] for item in answer["items"]]


def beating_vector(bundle, answer: dict, factor: float = 3.0) -> list[float]:
    """A vector that wins this answer's retrieval: its best item's, longer."""
    vectors = bundle.retrievers["sasrec"].item_vectors
    best = bundle.catalogue.lookup[answer["items"][0]["item_id"]]
    return (np.asarray(vectors[best]) * factor).astype(float).tolist()


@ON_BOTH_REDIS
def test_an_added_item_is_retrieved_filtered_described_and_searched(app_client, bundle, tiny_data):
    history = history_events(tiny_data, 2)
    with app_client() as client:
        before = ask(client, history, rerank=False)
        put = client.put(
            "/items/new-1",
            headers=ADMIN,
            json={
                "title": "Brand New (2024)",
                "genres": ["fresh"],
                "attributes": {"colour": "green"},
                "numbers": {"price": 1234.5},
                "embeddings": {"sasrec": beating_vector(bundle, before)},
            },
        )
        assert put.status_code == 200, put.text
        assert put.json()["version"] >= 1 and put.json()["put"] == ["new-1"]
        after = ask(client, history, rerank=False)
        assert served_ids(after)[0] == "new-1"
        assert served_ids(after)[1:] == served_ids(before)[:9]
        assert after["items"][0]["title"] == "Brand New (2024)"
        # A filter reads the added item's metadata like any other's.
        for item_filter in (
            {"include_categories": ["fresh"]},
            {"attributes": {"colour": "green"}},
            {"ranges": {"price": {"min": 1000}}},
        ):
            assert served_ids(ask(client, history, filter=item_filter)) == ["new-1"]
        assert "new-1" not in served_ids(ask(client, history, filter={"exclude_items": ["new-1"]}))
        described = client.get("/items/new-1").json()["item"]
        assert described["added"] and described["genres"] == ["fresh"]
        assert described["numbers"] == {"price": 1234.5}
        found = client.get("/items", params={"q": "brand new"}).json()
        assert [item["item_id"] for item in found["items"]] == ["new-1"]
        similar = client.get("/items/new-1/similar", params={"k": 5})
        assert similar.status_code == 200 and len(similar.json()["items"]) == 5
        # The added item in a history: never recommended again, not read by the encoder.
        seen = ask(client, [*history, {"item_id": "new-1", "ts": history[-1]["ts"] + 1}])
        assert "new-1" not in served_ids(seen) and seen["unknown_items"] == 1


def test_an_item_without_a_vector_is_embedded_from_its_metadata(app_client, tiny_data):
    with app_client() as client:
        put = client.put("/items/meta-1", headers=ADMIN, json={"title": "Heat (1995)"})
        assert put.status_code == 200, put.text
        similar = client.get("/items/meta-1/similar", params={"k": 3}).json()["items"]
        assert len(similar) == 3
        # Its derived vector is a real one: asked by its genre, the item comes.
        client.put("/items/meta-1", headers=ADMIN, json={"title": "Heat", "genres": ["only"]})
        answer = ask(client, history_events(tiny_data, 2), filter={"include_categories": ["only"]})
        assert served_ids(answer) == ["meta-1"]


def test_a_withdrawn_item_is_never_served_by_any_path(app_client, tiny_data):
    history = history_events(tiny_data, 2)
    with app_client(answer_ttl_seconds=60) as client:
        first = ask(client, history)
        victim = served_ids(first)[0]
        assert ask(client, history)["cache"] == "answer"
        similar_to = client.get(f"/items/{victim}/similar", params={"k": 20}).json()["items"]
        anchor = similar_to[0]["item_id"]
        deleted = client.delete(f"/items/{victim}", headers=ADMIN)
        assert deleted.status_code == 200, deleted.text
        again = ask(client, history)
        assert again["cache"] != "answer" and victim not in served_ids(again)
        assert victim not in served_ids(ask(client, history, rerank=False))
        similar = client.get(f"/items/{anchor}/similar", params={"k": 20}).json()["items"]
        assert victim not in [item["item_id"] for item in similar]
        fallback = ask(client, [{"item_id": "never-seen", "ts": 1}], k=100)
        assert fallback["fallback"] == "popularity" and victim not in served_ids(fallback)
        assert client.get(f"/items/{victim}").status_code == 404
        assert "withdrawn" in client.get(f"/items/{victim}").json()["detail"]
        assert client.get(f"/items/{victim}/similar").status_code == 404
        # A PUT brings it back.
        assert client.put(f"/items/{victim}", headers=ADMIN, json={}).status_code == 200
        assert client.get(f"/items/{victim}").json()["item"]["available"] is True


def test_bad_writes_are_refused_naming_the_field_and_write_nothing(app_client, bundle):
    dim = bundle.retrievers["sasrec"].item_vectors.shape[1]
    existing = str(bundle.catalogue.raw_ids[1])
    cases = [
        ({"embeddings": {"sasrec": [0.1] * (dim - 1)}}, "body.embeddings.sasrec"),
        ({"embeddings": {"nope": [0.1] * dim}}, "body.embeddings.nope"),
        ({"attributes": {"size": "xl"}}, "body.attributes.size"),
        ({"numbers": {"colour": 3}}, "body.numbers.colour"),
        ({"attributes": {"colour": 3}}, "attributes"),
        ({"numbers": {"price": "cheap"}}, "numbers"),
        ({"genres": "drama"}, "genres"),
        ({"colour": "red"}, "colour"),
    ]
    with app_client() as client:
        for body, field in cases:
            response = client.put("/items/bad-1", headers=ADMIN, json=body)
            assert response.status_code == 422, (body, response.text)
            assert field in response.text, (body, response.text)
        nan = client.put(
            "/items/bad-1",
            headers={**ADMIN, "content-type": "application/json"},
            content='{"numbers": {"price": NaN}}',
        )
        assert nan.status_code == 422 and "price" in nan.text
        given = client.put(
            f"/items/{existing}", headers=ADMIN, json={"embeddings": {"sasrec": [0.0] * dim}}
        )
        assert given.status_code == 422 and "trained vectors" in given.text
        # A bulk write with one bad item writes none of them.
        bulk = client.post(
            "/items/bulk",
            headers=ADMIN,
            json={"put": [{"item_id": "good-1"}, {"item_id": "bad-2", "numbers": {"x": 1}}]},
        )
        assert bulk.status_code == 422 and "body.put[1].numbers.x" in bulk.text
        assert client.get("/items/good-1").status_code == 404
        twice = client.post(
            "/items/bulk", headers=ADMIN, json={"put": [{"item_id": "a"}], "delete": ["a"]}
        )
        assert twice.status_code == 422 and "named twice" in twice.text
        missing = client.delete("/items/never-was", headers=ADMIN)
        assert missing.status_code == 404
        assert "\nrecserve_catalogue_version 0.0" in client.get("/metrics").text


def test_a_bulk_write_is_one_version_and_respects_its_limit(app_client, bundle):
    existing = str(bundle.catalogue.raw_ids[3])
    with app_client(catalogue_bulk_limit=3) as client:
        written = client.post(
            "/items/bulk",
            headers=ADMIN,
            json={"put": [{"item_id": "b-1"}, {"item_id": "b-2"}], "delete": [existing]},
        )
        assert written.status_code == 200, written.text
        version = written.json()["version"]
        assert client.get("/items/b-1").status_code == 200
        assert client.get(f"/items/{existing}").status_code == 404
        over = client.post(
            "/items/bulk", headers=ADMIN, json={"put": [{"item_id": f"c-{i}"} for i in range(4)]}
        )
        assert over.status_code == 422 and "at most 3" in over.text
        single = client.put("/items/b-3", headers=ADMIN, json={})
        assert single.json()["version"] == version + 1


def test_writes_need_a_token_with_the_right_scope(app_client):
    keys = [
        {"name": "reader", "key": "r" * 20, "scopes": ["recommend"]},
        {"name": "writer", "key": "w" * 20, "scopes": ["catalogue:write"]},
    ]
    token = "catalogue-token-" + "c" * 16
    with app_client(api_keys=keys, catalogue_token=token) as client:
        assert client.put("/items/t-1", json={}).status_code == 401
        assert client.put("/items/t-1", json={}, headers={"X-API-Key": "r" * 20}).status_code == 403
        assert client.put("/items/t-1", json={}, headers={"X-API-Key": "w" * 20}).status_code == 200
        bearer = {"Authorization": f"Bearer {token}"}
        assert client.put("/items/t-2", json={}, headers=bearer).status_code == 200
        assert client.put("/items/t-3", json={}, headers=ADMIN).status_code == 200
        wrong = {"Authorization": "Bearer " + "x" * 32}
        assert client.delete("/items/t-1", headers=wrong).status_code == 401


@ON_BOTH_REDIS
def test_a_new_app_and_a_reloaded_bundle_serve_every_write(
    app_client, bundle, tiny_data, second_bundle, models
):
    history = history_events(tiny_data, 2)
    with app_client() as client:
        before = ask(client, history, rerank=False)
        victim = served_ids(before)[1]
        client.put(
            "/items/kept-1",
            headers=ADMIN,
            json={"genres": ["kept"], "embeddings": {"sasrec": beating_vector(bundle, before)}},
        )
        client.delete(f"/items/{victim}", headers=ADMIN)
    with app_client() as client:  # a restart: everything comes back from Redis
        answer = ask(client, history, rerank=False)
        assert served_ids(answer)[0] == "kept-1" and victim not in served_ids(answer)
        shutil.copytree(second_bundle, models / second_bundle.name)
        set_current(models, second_bundle.name)
        reloaded = client.post("/admin/reload", headers=ADMIN)
        assert reloaded.json()["serving"] == second_bundle.name
        answer = ask(client, history, rerank=False)
        # The supplied vector was for the old bundle: the new one derives its own.
        assert victim not in served_ids(answer)
        kept = ask(client, history, filter={"include_categories": ["kept"]})
        assert served_ids(kept) == ["kept-1"]


def test_redis_down_writes_get_503_and_reads_serve_the_last_catalogue(
    make_settings, models, redis_server, tiny_data
):
    history = history_events(tiny_data, 2)
    settings = make_settings(models_dir=models, redis_url=redis_server.url)
    with TestClient(create_app(settings)) as client:
        victim = served_ids(ask(client, history))[0]
        assert client.delete(f"/items/{victim}", headers=ADMIN).status_code == 200
        redis_server.stop()
        refused = client.put("/items/late-1", headers=ADMIN, json={})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "nothing was written" in refused.json()["detail"]
        time.sleep(settings.catalogue_poll_seconds * 2)  # the follower fails meanwhile
        answer = ask(client, history)
        assert victim not in served_ids(answer)
        redis_server.start()
        assert client.put("/items/late-1", headers=ADMIN, json={}).status_code == 200


# --------------------------------------------------------------------------- a real server


def test_two_workers_serve_a_write_within_the_bound_under_load(
    models, bundle, key_prefix, tiny_data, tmp_path
):
    """Requests run without pause on both workers while items are withdrawn and added:
    no answer sent later than a write's acknowledgement plus the bound contradicts it."""
    settings = {**server_settings(models, key_prefix), "RECSERVE_ANSWER_TTL_SECONDS": "30"}
    service = UvicornService(settings, workers=2, log_path=tmp_path / "uvicorn.log")
    service.start(timeout=120)
    histories = [history_events(tiny_data, user) for user in (0, 2, 5, 9, 11)]
    answers: list[tuple[float, float, int, list[str]]] = []  # (sent, answered, history, ids)
    stop = threading.Event()
    failures = []

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=service.url, timeout=10) as http:
            while not stop.is_set():
                which = int(rng.integers(len(histories)))
                body = {"history": histories[which], "k": 20}
                sent = time.monotonic()
                response = http.post("/recommend", json=body)
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                answers.append((sent, time.monotonic(), which, served_ids(response.json())))

    try:
        with httpx.Client(base_url=service.url, timeout=10) as http:
            served = served_ids(
                http.post("/recommend", json={"history": histories[1], "k": 20}).json()
            )
            threads = [threading.Thread(target=load, args=(seed,)) for seed in range(4)]
            for thread in threads:
                thread.start()
            # Some answers for history 1 before any write (the first ones wait for both
            # workers' first batches, which a busy machine can make take seconds).
            wait_until(
                lambda: sum(which == 1 for _, _, which, _ in answers) >= 3,
                timeout=30,
                what="answers before the writes",
            )
            deleting = time.monotonic()
            withdrawn = {}
            for victim in served[:3]:
                response = http.delete(f"/items/{victim}", headers=ADMIN)
                assert response.status_code == 200, response.text
                withdrawn[victim] = time.monotonic()
                time.sleep(0.3)
            vector = beating_vector(bundle, {"items": [{"item_id": served[5]}]}, factor=5.0)
            response = http.put(
                "/items/arrived-1", headers=ADMIN, json={"embeddings": {"sasrec": vector}}
            )
            assert response.status_code == 200
            added = time.monotonic()
            time.sleep(2.5)
            stop.set()
            for thread in threads:
                thread.join()
    finally:
        stop.set()
        service.stop()
    assert not failures, failures[:3]
    # Answered before the first DELETE was sent, so before any write: a DELETE is applied
    # before it is acknowledged, by as much as a busy machine delays the acknowledgement.
    before = [items for _, answered, which, items in answers if which == 1 and answered < deleting]
    assert before and all(victim in items for items in before for victim in withdrawn)
    late = [
        (item, sent - at)
        for sent, _, _, items in answers
        for item, at in withdrawn.items()
        if item in items and sent > at + VISIBILITY_SECONDS
    ]
    assert not late, late[:5]
    # The added item wins history 1's retrieval: every answer for it sent after the bound
    # has it, from both workers' memos and batches alike.
    after = [items for sent, _, which, items in answers if which == 1 and sent > added + 1.0]
    assert len(after) > 5
    assert all("arrived-1" in items for items in after)
    log = (tmp_path / "uvicorn.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_the_catalogue_store_round_trips_records():
    from service.catalogue import ItemRecord
    from service.catalogue_store import decode_record, encode_record

    record = ItemRecord(
        title="T",
        genres=("a", "b"),
        attributes=(("colour", "red"),),
        numbers=(("price", 2.5),),
        available=False,
        year=1999,
        vectors=(("sasrec", np.arange(4, dtype=np.float32)),),
        vectors_bundle="tiny",
    )
    back = decode_record(encode_record(record))
    assert back.vectors[0][0] == "sasrec"
    np.testing.assert_array_equal(back.vectors[0][1], record.vectors[0][1])
    assert (back.title, back.genres, back.attributes, back.numbers) == (
        "T",
        ("a", "b"),
        (("colour", "red"),),
        (("price", 2.5),),
    )
    assert not back.served and back.year == 1999 and back.vectors_bundle == "tiny"
    with pytest.raises(ValueError):
        decode_record(json.dumps({"format": 99}))


def test_the_batch_job_serves_the_catalogue_as_the_service_does(
    app_client, bundle, models, make_settings, tiny_data, tmp_path
):
    import asyncio

    import pyarrow.parquet as pq
    import redis.asyncio as aioredis

    from service.catalogue_store import CatalogueStore
    from service.live_catalogue import ServedCatalogue
    from service.reload_signals import deployment_id
    from training.batch_recommend import batch_recommend

    settings = make_settings(models_dir=models)

    def firsts(path) -> list[str]:
        table = pq.read_table(path)
        ranks, items = table.column("rank").to_pylist(), table.column("item").to_pylist()
        return [item for rank, item in zip(ranks, items, strict=True) if rank == 1]

    before = batch_recommend(bundle, tiny_data, tmp_path / "before.parquet", k=10)
    first = firsts(tmp_path / "before.parquet")
    victim = max(set(first), key=first.count)  # the most recommended first item
    with app_client() as client:
        assert client.delete(f"/items/{victim}", headers=ADMIN).status_code == 200
        huge = (np.ones(bundle.retrievers["sasrec"].item_vectors.shape[1]) * 100).tolist()
        client.put("/items/everyones", headers=ADMIN, json={"embeddings": {"sasrec": huge}})

    async def read() -> ServedCatalogue:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            store = CatalogueStore(client, settings.key_prefix, deployment_id(settings))
            version, records = await store.changes_since(0)
        finally:
            await client.aclose()
        return ServedCatalogue.of_records(bundle, version, records, embed=True)

    served = asyncio.run(read())
    after = batch_recommend(bundle, tiny_data, tmp_path / "after.parquet", k=10, served=served)
    assert after["catalogue_version"] == 2 and before["catalogue_version"] == 0
    assert victim not in set(pq.read_table(tmp_path / "after.parquet").column("item").to_pylist())
    # A vector of 100s beats every trained item for any user whose embedding sums positive.
    assert firsts(tmp_path / "after.parquet").count("everyones") > len(first) // 4


def test_an_unreadable_record_in_redis_is_skipped_not_served(app_client, make_settings, models):
    import redis

    from service.catalogue_store import CatalogueStore
    from service.reload_signals import deployment_id

    settings = make_settings(models_dir=models)
    with app_client() as client:
        assert client.put("/items/fine-1", headers=ADMIN, json={}).status_code == 200
        sync = redis.Redis.from_url(settings.redis_url)
        store = CatalogueStore(sync, settings.key_prefix, deployment_id(settings))
        sync.hset(store.items_key, "broken-1", "{not json")
        sync.zadd(store.changes_key, {"broken-1": 99})
        sync.set(store.version_key, 99)
        assert client.put("/items/fine-2", headers=ADMIN, json={}).json()["version"] == 100
        assert client.get("/items/fine-2").status_code == 200
        assert client.get("/items/broken-1").status_code == 404
        sync.close()
