"""Hostile and odd input, and what the service must never reveal (reliability issue)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.history_store import HEADER, RECORD_SIZE
from service.main import create_app
from tests.service.conftest import ADMIN_TOKEN

HOSTILE_IDS = ["a:b", "*", "u *", " padded ", "tab\tand\nnewline", "recserve:hist:*", "{x}"]


@pytest.mark.parametrize("user_id", HOSTILE_IDS)
def test_user_ids_with_key_syntax_get_only_their_own_history(
    client, shared_redis, key_prefix, user_id
):
    """No id can name, glob or collide with another key: each user's events stay theirs."""
    neighbour = "a"  # a prefix of several hostile ids
    now = int(time.time())
    assert (
        client.post("/events", json={"user_id": neighbour, "item_id": "1", "ts": now}).status_code
        == 200
    )
    events = [{"user_id": user_id, "item_id": item, "ts": now + i} for i, item in enumerate("234")]
    stored = client.post("/events", json=events)
    assert stored.status_code == 200 and stored.json()["added"] == 3

    keys = sorted(k.decode() for k in shared_redis.scan_iter(f"{key_prefix}:*"))
    history_keys = [k for k in keys if ":hp:" in k]
    assert len(history_keys) == 2  # one per user, whatever the id held
    assert set(keys) - set(history_keys) == {f"{key_prefix}:itemcodes"}
    for key in history_keys:
        assert key.startswith(f"{key_prefix}:hp:{{{key_prefix}:hist:") and key.endswith("}")
        suffix = key.removeprefix(f"{key_prefix}:hp:{{{key_prefix}:hist:")[:-1]
        assert len(suffix) == 40 and all(c in "0123456789abcdef" for c in suffix), key
    stored = sum(shared_redis.strlen(key) - HEADER.size for key in history_keys)
    assert stored == 4 * RECORD_SIZE

    mine = client.post("/recommend", json={"user_id": user_id, "k": 5, "exclude_seen": True})
    assert mine.status_code == 200
    assert not {"2", "3", "4"} & {i["item_id"] for i in mine.json()["items"]}


@pytest.mark.parametrize("item_id", ["1:2", "*", " 3 ", "9\n"])
def test_item_ids_with_key_syntax_are_just_unknown_items(reader, item_id):
    response = reader.post("/recommend", json={"history": [{"item_id": item_id, "ts": 1}]})
    assert response.status_code == 200
    assert response.json()["unknown_items"] == 1 and response.json()["fallback"] == "popularity"


def test_an_empty_history_gets_the_popularity_fallback(reader):
    response = reader.post("/recommend", json={"history": [], "k": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["fallback"] == "popularity" and len(body["items"]) == 3


def test_duplicate_events_in_a_history_are_served(reader, history):
    response = reader.post("/recommend", json={"history": history + history, "k": 5})
    assert response.status_code == 200 and len(response.json()["items"]) == 5


def test_history_order_does_not_matter_because_events_are_sorted_by_time(reader, history):
    ordered = reader.post("/recommend", json={"history": history, "k": 10, "rerank": False})
    shuffled = reader.post("/recommend", json={"history": history[::-1], "k": 10, "rerank": False})
    assert ordered.status_code == shuffled.status_code == 200
    assert ordered.json()["items"] == shuffled.json()["items"]


def test_a_history_event_in_the_future_is_served(reader, history):
    future = [{**history[-1], "ts": int(time.time()) + 10**7}]
    response = reader.post("/recommend", json={"history": history[:-1] + future, "k": 5})
    assert response.status_code == 200


def test_k_beyond_the_catalogue_returns_the_catalogue_and_huge_k_is_422(reader, history):
    capped = reader.post("/recommend", json={"history": history, "k": 1000, "exclude_seen": False})
    assert capped.status_code == 200
    assert 0 < len(capped.json()["items"]) <= 120  # the tiny catalogue
    huge = reader.post("/recommend", json={"history": history, "k": 10**12})
    assert huge.status_code == 422 and "k" in huge.json()["detail"]


# --------------------------------------------------------------------------- CORS and secrets


def test_cors_is_off_by_default(reader, history):
    origin = {"Origin": "https://elsewhere.example"}
    response = reader.post("/recommend", json={"history": history}, headers=origin)
    assert "access-control-allow-origin" not in response.headers
    preflight = reader.options(
        "/recommend", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_configured_origins(make_settings, history):
    settings = make_settings(cors_origins=["https://shop.example"])
    with TestClient(create_app(settings)) as client:
        allowed = client.post(
            "/recommend", json={"history": history}, headers={"Origin": "https://shop.example"}
        )
        other = client.post(
            "/recommend", json={"history": history}, headers={"Origin": "https://evil.example"}
        )
    assert allowed.headers.get("access-control-allow-origin") == "https://shop.example"
    assert "access-control-allow-origin" not in other.headers


def test_no_response_or_setting_repr_reveals_the_admin_token(client, make_settings, history):
    responses = [
        client.post("/admin/reload", headers={"authorization": "Bearer wrong-token-" + "y" * 20}),
        client.post("/admin/reload", headers={"authorization": f"Basic {ADMIN_TOKEN}"}),
        client.post("/admin/reload"),
        client.get("/readyz"),
        client.get("/healthz"),
        client.get("/metrics"),
        client.get("/openapi.json"),
        client.post("/recommend", json={"history": history, "k": "x"}),
    ]
    for response in responses:
        assert ADMIN_TOKEN not in response.text, response.request.url
    assert [r.status_code for r in responses[:3]] == [401, 401, 401]
    assert ADMIN_TOKEN not in repr(make_settings()) and ADMIN_TOKEN not in str(make_settings())
