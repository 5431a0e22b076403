"""The HTTP API through FastAPI's TestClient (the lifespan runs; Redis is real)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.api.schemas import RecommendResponse
from service.main import create_app
from tests.service.conftest import ON_BOTH_REDIS

JSON = {"content-type": "application/json"}


def item_ids(response) -> list[str]:
    return [item["item_id"] for item in response.json()["items"]]


def assert_no_stack_trace(response) -> None:
    text = response.text
    assert "Traceback" not in text and 'File "' not in text and ".py" not in text, text


# --------------------------------------------------------------------------- /recommend


def test_a_history_gets_k_recommendations_from_the_bundle(reader, history):
    response = reader.post("/recommend", json={"history": history, "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["bundle"] == "tiny" and body["encoder"] == "sasrec"
    assert len(body["items"]) == 5 and body["fallback"] is None
    assert body["reranked"] is False and body["unknown_items"] == 0
    assert set(body["timings_ms"]) == {"encode", "retrieve", "rerank", "total"}
    assert not {event["item_id"] for event in history} & set(item_ids(response))
    assert response.headers["content-type"] == "application/json"


def test_every_kind_of_recommend_response_is_what_the_schema_documents(client, history):
    schema = client.get("/openapi.json").json()
    documented = schema["paths"]["/recommend"]["post"]["responses"]["200"]["content"]
    assert documented["application/json"]["schema"]["$ref"].endswith("/RecommendResponse")
    bodies = [
        {"history": history, "k": 3},  # miss
        {"history": history, "k": 3},  # hit
        {"history": [{"item_id": "no-such-item", "ts": 1}]},  # fallback
    ]
    for body in bodies:
        answer = client.post("/recommend", json=body).json()
        assert RecommendResponse.model_validate(answer).model_dump() == answer


@ON_BOTH_REDIS
def test_a_repeated_request_is_a_cache_hit(client, history):
    first = client.post("/recommend", json={"history": history})
    second = client.post("/recommend", json={"history": history})
    assert (first.json()["cache"], second.json()["cache"]) == ("miss", "hit")
    assert item_ids(second) == item_ids(first)


def test_unknown_items_in_a_history_are_counted(reader, history):
    response = reader.post("/recommend", json={"history": [*history, {"item_id": "?", "ts": 1}]})
    assert response.status_code == 200 and response.json()["unknown_items"] == 1


def test_a_history_of_only_unknown_items_gets_the_popularity_fallback(reader):
    response = reader.post("/recommend", json={"history": [{"item_id": "?", "ts": 1}], "k": 4})
    assert response.status_code == 200
    assert response.json()["fallback"] == "popularity" and len(response.json()["items"]) == 4


@ON_BOTH_REDIS
def test_cached_embedding_is_not_served_after_events_change_the_history(client, history):
    user = "user-stale"
    client.post("/events", json=[{"user_id": user, **event} for event in history])
    first = client.post("/recommend", json={"user_id": user})
    assert first.status_code == 200 and first.json()["cache"] == "miss"
    assert client.post("/recommend", json={"user_id": user}).json()["cache"] == "hit"

    top = item_ids(first)[0]
    later = history[-1]["ts"] + 60
    client.post("/events", json={"user_id": user, "item_id": top, "ts": later})
    after = client.post("/recommend", json={"user_id": user})
    assert after.json()["cache"] == "miss"
    assert top not in item_ids(after)  # now seen, so excluded
    changed = [*history, {"item_id": top, "ts": later}]
    expected = client.post("/recommend", json={"history": changed})
    assert item_ids(after) == item_ids(expected)


def test_a_history_longer_than_the_cap_is_served_and_flagged(make_settings, history):
    with TestClient(create_app(make_settings(request_history_cap=5))) as client:
        long = client.post("/recommend", json={"history": history})
        short = client.post("/recommend", json={"history": history[-5:]})
    assert long.status_code == 200 and long.json()["history_truncated"] is True
    assert short.json()["history_truncated"] is False
    # The newest five are what is kept: the same answer as sending only those.
    assert item_ids(long) == item_ids(short)


def test_a_user_with_no_history_is_not_found(reader):
    response = reader.post("/recommend", json={"user_id": "nobody-at-all"})
    assert response.status_code == 404
    assert "nobody-at-all" in response.json()["detail"]


def test_an_unknown_encoder_is_refused_naming_it(reader, history):
    response = reader.post("/recommend", json={"history": history, "encoder": "nope"})
    assert response.status_code == 422
    assert "'nope'" in response.json()["detail"] and "sasrec" in response.json()["detail"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "body, field",
    [
        ({"history": [{"item_id": "1", "ts": 1}], "k": 0}, "k"),
        ({"history": [{"item_id": "1", "ts": 1}], "k": 1001}, "k"),
        ({"history": [{"item_id": "1", "ts": 1}], "k": "5"}, "k"),
        ({"history": [{"item_id": "1", "ts": 1.5}]}, "ts"),
        ({"history": [{"item_id": "1", "ts": 1.0}]}, "ts"),
        ({"history": [{"item_id": "1", "ts": "1700000000"}]}, "ts"),
        ({"history": [{"item_id": "1", "ts": -1}]}, "ts"),
        ({"history": [{"item_id": 1, "ts": 1}]}, "item_id"),
        ({"history": [{"item_id": "", "ts": 1}]}, "item_id"),
        ({"history": [{"item_id": "1"}]}, "ts"),
        ({"history": [{"item_id": "1", "ts": 1, "rating": 5}]}, "rating"),
        ({"history": [], "colour": "red"}, "colour"),
        ({"user_id": 42}, "user_id"),
        ({"user_id": "x" * 257}, "user_id"),
        ({"k": 3}, "user_id"),
        ({}, "user_id"),
        ({"history": "1,2,3"}, "history"),
        ({"user_id": "u", "candidates": 0}, "candidates"),
        ({"user_id": "u", "exclude_seen": "maybe"}, "exclude_seen"),
    ],
)
def test_malformed_recommend_requests_are_422_naming_the_field(reader, body, field):
    response = reader.post("/recommend", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert_no_stack_trace(response)


def test_a_request_that_is_not_an_object_is_422(reader):
    response = reader.post("/recommend", json=[1, 2, 3])
    assert response.status_code == 422 and "body" in response.json()["detail"]


def test_malformed_json_is_422(reader):
    response = reader.post("/recommend", content=b'{"user_id": ', headers=JSON)
    assert response.status_code == 422
    assert_no_stack_trace(response)


def test_a_huge_body_is_413(reader):
    response = reader.post("/recommend", content=b" " * 2_000_000, headers=JSON)
    assert response.status_code == 413 and "body" in response.json()["detail"]


def test_a_huge_streamed_body_without_a_length_is_413(reader):
    def chunks():
        for _ in range(25):
            yield b" " * 100_000

    response = reader.post("/recommend", content=chunks(), headers=JSON)
    assert response.status_code == 413 and "body" in response.json()["detail"]


def test_invalid_utf8_is_refused_without_a_server_error(reader):
    response = reader.post("/recommend", content=b'{"user_id": "\xff\xfe"}', headers=JSON)
    assert response.status_code == 422
    assert "body" in response.json()["detail"]
    assert_no_stack_trace(response)


@pytest.mark.parametrize("depth", [900, 100_000])
def test_deeply_nested_json_is_refused_without_a_server_error(reader, depth):
    for prefix, suffix in [(b"", b""), (b'{"user_id": ', b"}"), (b'{"history": ', b"}")]:
        body = prefix + b"[" * depth + b"]" * depth + suffix
        response = reader.post("/recommend", content=body, headers=JSON)
        assert response.status_code == 422, (prefix, response.status_code)
        assert "body" in response.json()["detail"]
        assert_no_stack_trace(response)


def test_an_unexpected_error_is_500_without_a_stack_trace(make_settings, history, monkeypatch):
    from service.recommender import Recommender

    async def broken(self, *args, **kwargs):
        raise RuntimeError("secret internals at /srv/app/recommender.py line 1")

    monkeypatch.setattr(Recommender, "recommend", broken)
    app = create_app(make_settings())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/recommend", json={"history": history})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error"}
    assert_no_stack_trace(response)


# --------------------------------------------------------------------------- /events


@ON_BOTH_REDIS
def test_events_are_stored_and_a_retry_adds_nothing(client):
    events = [
        {"user_id": "user-retry", "item_id": "3", "ts": 1_700_000_000},
        {"user_id": "user-retry", "item_id": "4", "ts": 1_700_000_060},
    ]
    first = client.post("/events", json=events)
    retry = client.post("/events", json=events)
    assert first.status_code == 200 and first.json() == {"received": 2, "added": 2, "attributed": 0}
    assert retry.status_code == 200 and retry.json() == {"received": 2, "added": 0, "attributed": 0}


def test_a_single_event_object_is_accepted(client):
    response = client.post("/events", json={"user_id": "u1", "item_id": "3", "ts": 1_700_000_000})
    assert response.json() == {"received": 1, "added": 1, "attributed": 0}


@ON_BOTH_REDIS
def test_events_become_the_users_history(client, history):
    client.post("/events", json=[{"user_id": "user-h", **event} for event in reversed(history)])
    by_user = client.post("/recommend", json={"user_id": "user-h"})
    by_history = client.post("/recommend", json={"history": history})
    assert by_user.status_code == 200
    assert item_ids(by_user) == item_ids(by_history)


def test_an_event_far_in_the_future_is_refused_naming_it(client):
    future = int(time.time()) + 3 * 86_400
    one = client.post("/events", json={"user_id": "u", "item_id": "3", "ts": future})
    assert one.status_code == 422 and "body.ts" in one.json()["detail"]
    many = client.post(
        "/events",
        json=[
            {"user_id": "u", "item_id": "3", "ts": 1_700_000_000},
            {"user_id": "u", "item_id": "4", "ts": future},
        ],
    )
    assert many.status_code == 422 and "body[1].ts" in many.json()["detail"]
    assert "future" in many.json()["detail"]
    # Nothing of a refused request was stored.
    assert client.post("/recommend", json={"user_id": "u"}).status_code == 404


def test_an_event_within_a_day_of_clock_skew_is_accepted(client):
    soon = int(time.time()) + 3600
    response = client.post("/events", json={"user_id": "u", "item_id": "3", "ts": soon})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body, field",
    [
        ({"user_id": "u", "item_id": "3", "ts": 1.5}, "ts"),
        ({"user_id": "u", "item_id": "3", "ts": "1700000000"}, "ts"),
        ({"user_id": "u", "item_id": 3, "ts": 1}, "item_id"),
        ({"user_id": "u", "ts": 1}, "item_id"),
        ({"item_id": "3", "ts": 1}, "user_id"),
        ({"user_id": "u", "item_id": "3", "ts": 1, "colour": "red"}, "colour"),
        ([{"user_id": "u", "item_id": "3", "ts": 1}, {"user_id": "u", "item_id": "4"}], "ts"),
    ],
)
def test_malformed_events_are_422_naming_the_field(reader, body, field):
    response = reader.post("/events", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]


def test_too_many_events_in_one_request_are_refused(make_settings):
    with TestClient(create_app(make_settings(max_events_per_request=3))) as client:
        events = [{"user_id": "u", "item_id": "3", "ts": t} for t in range(4)]
        response = client.post("/events", json=events)
    assert response.status_code == 422 and "at most 3 events" in response.json()["detail"]


# --------------------------------------------------------------------------- items, health


def test_similar_items_of_a_known_item(reader):
    response = reader.get("/items/1/similar", params={"k": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["bundle"] == "tiny" and body["item_id"] == "1"
    assert len(body["items"]) == 3 and "1" not in item_ids(response)


def test_similar_items_of_an_unknown_item_are_404(reader):
    response = reader.get("/items/no-such-item/similar")
    assert response.status_code == 404 and "no-such-item" in response.json()["detail"]


def test_similar_items_with_an_unknown_encoder_are_422(reader):
    response = reader.get("/items/1/similar", params={"encoder": "nope"})
    assert response.status_code == 422 and "nope" in response.json()["detail"]


def test_the_catalogue_is_searched_by_title_most_popular_first(reader):
    body = reader.get("/items", params={"q": "ITEM 1", "limit": 5}).json()
    assert body["bundle"] == "tiny" and body["query"] == "ITEM 1"
    assert len(body["items"]) == 5 and body["matched"] > 5
    assert all("item 1" in item["title"].lower() for item in body["items"])
    counts = [item["popularity"] for item in body["items"]]
    assert counts == sorted(counts, reverse=True)


def test_an_item_id_finds_that_item_first(reader):
    # "12" is item 12's id and part of the titles "Item 112", "Item 120", ...
    body = reader.get("/items", params={"q": "12", "limit": 100}).json()
    assert body["items"][0]["item_id"] == "12"
    assert [i["item_id"] for i in body["items"]].count("12") == 1


def test_a_blank_search_lists_the_most_popular_items(reader):
    body = reader.get("/items", params={"limit": 3}).json()
    assert body["matched"] == 120 and len(body["items"]) == 3
    everything = reader.get("/items", params={"limit": 100}).json()["items"]
    assert body["items"] == everything[:3]
    assert everything[0]["popularity"] == max(item["popularity"] for item in everything)


def test_an_item_is_described_as_the_catalogue_holds_it(reader):
    body = reader.get("/items/7").json()
    found = reader.get("/items", params={"q": "7", "limit": 1}).json()["items"][0]
    assert body["bundle"] == "tiny" and body["item"] == found
    item = body["item"]
    assert item["item_id"] == "7" and item["title"] == "Item 7" and item["available"] is True
    assert item["genres"] and item["popularity"] > 0
    assert item["attributes"] == {} and item["numbers"] == {}


def test_an_unknown_item_is_404_naming_it(reader):
    response = reader.get("/items/no-such-item")
    assert response.status_code == 404 and "no-such-item" in response.json()["detail"]


def test_a_search_that_matches_nothing_is_an_empty_list(reader):
    assert reader.get("/items", params={"q": "no such title"}).json()["items"] == []


@pytest.mark.parametrize(
    "params, field", [({"limit": 0}, "query.limit"), ({"q": "x" * 201}, "query.q")]
)
def test_bad_search_parameters_are_422_naming_the_field(reader, params, field):
    response = reader.get("/items", params=params)
    assert response.status_code == 422 and field in response.json()["detail"]


def test_bundle_describes_the_served_retrievers(reader):
    body = reader.get("/bundle").json()
    assert body["name"] == "tiny" and body["items"] == 120 and body["titles"] is True
    assert body["default_encoder"] == "sasrec"
    (retriever,) = body["retrievers"]
    assert retriever["name"] == "sasrec" and retriever["reranks"] is False
    assert retriever["index"] == "Flat" and retriever["dim"] == 16
    assert 0 < retriever["test_metrics"]["ndcg@10"] <= 1
    assert 0 < retriever["popularity_test_metrics"]["ndcg@10"] <= 1
    assert "path" not in str(body) and "git" not in str(body)
    counts = list(body["categories"].values())
    assert counts == sorted(counts, reverse=True) and sum(counts) >= 120  # every item has one
    genres = {
        g
        for item in reader.get("/items", params={"limit": 100}).json()["items"]
        for g in item["genres"]
    }
    assert genres <= set(body["categories"])


def test_healthz_answers(reader):
    assert reader.get("/healthz").json() == {"status": "ok"}


def test_readyz_names_the_bundle(reader):
    response = reader.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True and body["bundle"] == "tiny"
    assert body["encoders"] == ["sasrec"] and body["redis"] == "up"
    assert body["reload_refused"] is False


def test_with_an_answer_ttl_a_repeated_request_is_answered_whole(make_settings, history):
    with TestClient(create_app(make_settings(answer_ttl_seconds=30))) as client:
        first = client.post("/recommend", json={"history": history}).json()
        second = client.post("/recommend", json={"history": history}).json()
        changed = client.post("/recommend", json={"history": history[:-1]}).json()
        text = client.get("/metrics").text
    assert (first["cache"], second["cache"], changed["cache"]) == ("miss", "answer", "miss")
    assert second["items"] == first["items"]
    RecommendResponse.model_validate(second)
    assert 'recserve_cache_total{result="answer"} 1.0' in text


def test_metrics_expose_cache_outcomes_and_stage_latencies(client, history):
    client.post("/recommend", json={"history": history})
    client.post("/recommend", json={"history": history})
    text = client.get("/metrics").text
    assert 'recserve_cache_total{result="miss"} 1.0' in text
    assert 'recserve_cache_total{result="hit"} 1.0' in text
    for stage in ("encode", "retrieve", "rerank", "total"):
        assert f'recserve_stage_seconds_count{{stage="{stage}"}} 2.0' in text
    assert 'recserve_requests_total{route="/recommend",status="200"} 2.0' in text
    assert 'recserve_bundle_info{bundle="tiny"} 1.0' in text
