"""Who may call what: API keys with scopes, and the stored-history rule."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.main import create_app
from service.settings import ApiKey

READER = "reader-key-0123456789"
HISTORIAN = "historian-key-0123456789"
WRITER = "writer-key-0123456789"
OPERATOR = "operator-key-0123456789"
KEYS = [
    ApiKey(name="reader", key=READER, scopes=("recommend",)),
    ApiKey(name="historian", key=HISTORIAN, scopes=("recommend", "history:read")),
    ApiKey(name="writer", key=WRITER, scopes=("events:write",)),
    ApiKey(name="operator", key=OPERATOR, scopes=("admin",)),
]
HISTORY = {"history": [{"item_id": "1", "ts": 1_700_000_000}], "k": 3}


def key(value: str) -> dict:
    return {"X-API-Key": value}


@pytest.fixture
def keyed(make_settings):
    with TestClient(create_app(make_settings(api_keys=KEYS))) as client:
        yield client


def test_without_a_valid_key_every_endpoint_but_health_answers_401(keyed):
    for headers in ({}, key("not-a-key-0123456789"), key(READER[:-1])):
        response = keyed.post("/recommend", json=HISTORY, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "ApiKey"
        assert response.json()["detail"].startswith("X-API-Key")
        assert keyed.get("/items/1/similar", headers=headers).status_code == 401
        assert keyed.post("/events", json=[], headers=headers).status_code == 401
    assert keyed.get("/healthz").status_code == 200


def test_each_key_does_only_what_its_scopes_allow(keyed):
    assert keyed.post("/recommend", json=HISTORY, headers=key(READER)).status_code == 200
    assert keyed.get("/items/1/similar", headers=key(READER)).status_code == 200
    event = {"user_id": "u-access", "item_id": "1", "ts": 1_700_000_000}
    refused = keyed.post("/events", json=event, headers=key(READER))
    assert refused.status_code == 403 and "'events:write'" in refused.json()["detail"]
    assert keyed.post("/events", json=event, headers=key(WRITER)).status_code == 200
    assert keyed.post("/recommend", json=HISTORY, headers=key(WRITER)).status_code == 403

    stored = {"user_id": "u-access", "k": 3}
    refused = keyed.post("/recommend", json=stored, headers=key(READER))
    assert refused.status_code == 403 and "'history:read'" in refused.json()["detail"]
    assert keyed.post("/recommend", json=stored, headers=key(HISTORIAN)).status_code == 200


def test_a_key_with_the_admin_scope_stands_for_the_admin_token(keyed):
    assert keyed.post("/admin/reload", headers=key(OPERATOR)).status_code == 200
    assert keyed.post("/admin/reload", headers=key(HISTORIAN)).status_code == 401


def test_exclude_seen_false_on_a_stored_history_can_be_refused(make_settings):
    settings = make_settings(stored_history_excludes_seen=True)
    with TestClient(create_app(settings)) as client:
        event = {"user_id": "u-seen", "item_id": "1", "ts": 1_700_000_000}
        assert client.post("/events", json=event).status_code == 200
        stored = {"user_id": "u-seen", "k": 3, "exclude_seen": False}
        refused = client.post("/recommend", json=stored)
        assert refused.status_code == 403
        assert refused.json()["detail"].startswith("body.exclude_seen")
        # A history the caller sent is the caller's own: it may see it again.
        sent = {**HISTORY, "exclude_seen": False}
        assert client.post("/recommend", json=sent).status_code == 200
        assert client.post("/recommend", json={"user_id": "u-seen", "k": 3}).status_code == 200


@pytest.mark.parametrize(
    "keys, problem",
    [
        ([{"name": "a", "key": "short", "scopes": ["recommend"]}], "at least 16"),
        ([{"name": "a", "key": READER, "scopes": ["everything"]}], "scopes"),
        (
            [
                {"name": "a", "key": READER, "scopes": ["recommend"]},
                {"name": "a", "key": WRITER, "scopes": ["recommend"]},
            ],
            "name of its own",
        ),
        (
            [
                {"name": "a", "key": READER, "scopes": ["recommend"]},
                {"name": "b", "key": READER, "scopes": ["recommend"]},
            ],
            "two keys are the same",
        ),
    ],
)
def test_bad_api_key_settings_are_refused_at_start(make_settings, keys, problem):
    with pytest.raises(ValidationError, match=problem):
        make_settings(api_keys=keys)
