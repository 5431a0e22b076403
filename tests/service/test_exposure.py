"""What the service shows to whom: /readyz's details only with the admin token, bounded
excerpts of outside text in answers and logs, one content-type rule for every body,
security headers on every answer, and /docs and /metrics switchable by settings."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from service.bundle import CURRENT
from service.main import create_app
from tests.service.conftest import ADMIN_TOKEN

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
METRICS_TOKEN = "metrics-token-" + "m" * 20
HUGE = 1_000_000


# --------------------------------------------------------------------------- excerpt


def test_an_excerpt_is_bounded_escaped_and_says_what_it_left_out():
    from service.errors import EXCERPT_CHARS, excerpt

    assert excerpt("plain-name") == "'plain-name'"
    assert excerpt("tab\there\nand \u202e") == "'tab\\there\\nand \\u202e'"
    assert excerpt("it's") == "'it\\'s'"
    long = excerpt("x" * HUGE)
    assert len(long) < EXCERPT_CHARS + 40 and long.endswith(f"(+{HUGE - EXCERPT_CHARS} characters)")
    escaped = excerpt("\x00" * HUGE)  # escapes count towards the bound
    assert len(escaped) < EXCERPT_CHARS + 40
    assert excerpt("/a path", quote=False) == "/a path"


# --------------------------------------------------------------------------- /readyz


def test_readyz_tells_anyone_whether_it_is_ready_and_no_more(reader):
    body = reader.get("/readyz").json()
    # What a request that does not say rerank gets, and why (the export's gate: numbers).
    rerank = body.pop("rerank")
    assert list(rerank) == ["sasrec"] and set(rerank["sasrec"]) == {"by_default", "reason"}
    assert isinstance(rerank["sasrec"]["reason"], str) and rerank["sasrec"]["reason"]
    assert body == {
        "ready": True,
        "bundle": "tiny",
        "encoders": ["sasrec"],
        "redis": "up",
        "reload_refused": False,
    }


def test_readyz_adds_placement_and_the_last_error_for_the_admin(reader):
    body = reader.get("/readyz", headers=ADMIN).json()
    assert body["placement"]["sasrec"]["index"] == "cpu"
    assert body["last_error"] is None
    wrong = reader.get("/readyz", headers={"authorization": "Bearer " + "w" * 30}).json()
    assert "placement" not in wrong and "last_error" not in wrong


def test_a_refused_reload_is_a_flag_in_public_and_the_reason_for_the_admin(client, served_models):
    (served_models / CURRENT).write_text("no-such-bundle\n")
    assert client.post("/admin/reload", headers=ADMIN).status_code == 409
    public = client.get("/readyz").json()
    assert public["reload_refused"] is True and "last_error" not in public
    assert str(served_models) not in client.get("/readyz").text
    assert "no-such-bundle" in client.get("/readyz", headers=ADMIN).json()["last_error"]


def test_a_huge_current_file_reaches_no_answer_or_log_whole(client, served_models, caplog):
    (served_models / CURRENT).write_text("n" * HUGE + "\n")
    with caplog.at_level(logging.INFO):
        refused = client.post("/admin/reload", headers=ADMIN)
    assert refused.status_code == 409 and len(refused.text) < 2000
    assert "invalid bundle name" in refused.json()["detail"]
    last_error = client.get("/readyz", headers=ADMIN).json()["last_error"]
    assert "invalid bundle name" in last_error and len(last_error) < 2000
    assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 2000


def test_no_bundle_answers_503_without_saying_where_it_looked(make_settings, served_models):
    (served_models / CURRENT).unlink()
    with TestClient(create_app(make_settings())) as client:
        answer = client.post("/recommend", json={"history": []})
        ready = client.get("/readyz")
        detailed = client.get("/readyz", headers=ADMIN).json()
    assert answer.status_code == 503 and answer.json() == {
        "detail": "no bundle loaded, retry shortly"
    }
    assert str(served_models) not in answer.text and str(served_models) not in ready.text
    assert ready.status_code == 503 and ready.json()["reload_refused"] is True
    assert "CURRENT" in detailed["last_error"]


# --------------------------------------------------------------------------- client input


def test_an_unexpected_key_is_named_in_the_answer_only_as_an_excerpt(reader):
    key = "k" * 500_000  # within the body limit
    answer = reader.post("/recommend", json={"history": [], key: 1})
    assert answer.status_code == 422 and len(answer.text) < 2000
    assert "extra" in answer.json()["detail"].lower()
    assert answer.json()["errors"][0]["loc"][1].startswith("'kkk")


def test_a_user_id_with_control_characters_is_escaped_in_the_404(reader):
    answer = reader.post("/recommend", json={"user_id": "nobody\r\nX-Injected: 1"})
    assert answer.status_code == 404
    assert "\\r\\n" in answer.json()["detail"] and "\r" not in answer.json()["detail"]


# --------------------------------------------------------------------------- content types


@pytest.mark.parametrize("path", ["/recommend", "/events"])
@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_415_on_every_route(reader, path, content_type):
    body = (
        b'{"history": []}' if path == "/recommend" else b'{"user_id": "u", "item_id": "1", "ts": 1}'
    )
    headers = {"content-type": content_type} if content_type else {}
    answer = reader.post(path, content=body, headers=headers)
    assert answer.status_code == 415, answer.text
    assert "application/json" in answer.json()["detail"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_or_in_capitals_is_json(reader, content_type):
    answer = reader.post(
        "/recommend", content=b'{"history": []}', headers={"content-type": content_type}
    )
    assert answer.status_code == 200


def test_a_request_without_a_body_needs_no_content_type(client):
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200


# --------------------------------------------------------------------------- headers


def assert_secure(response, csp: bool = True) -> None:
    headers = response.headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    assert headers["x-frame-options"] == "DENY"
    if csp:
        assert headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    else:
        assert "content-security-policy" not in headers


def test_every_api_answer_carries_the_security_headers(reader):
    answers = [
        reader.post("/recommend", json={"history": [], "k": 2}),
        reader.post("/recommend", json={"history": [], "k": 0}),
        reader.post("/recommend", content=b"{}", headers={"content-type": "text/plain"}),
        reader.post(
            "/recommend", content=b"x" * 2_000_000, headers={"content-type": "application/json"}
        ),
        reader.get("/healthz"),
        reader.get("/readyz"),
        reader.get("/metrics"),
        reader.get("/no-such-path"),
        reader.post("/admin/reload"),
        reader.get("/openapi.json"),
    ]
    assert [a.status_code for a in answers] == [200, 422, 415, 413, 200, 200, 200, 404, 401, 200]
    for answer in answers:
        assert_secure(answer)


def test_an_internal_error_carries_the_security_headers(make_settings, monkeypatch):
    from service.recommender import Recommender

    async def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Recommender, "recommend", broken)
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as client:
        answer = client.post("/recommend", json={"history": []})
    assert answer.status_code == 500
    assert_secure(answer)


def test_the_docs_pages_work_without_the_json_policy(reader):
    for path in ("/docs", "/redoc"):
        page = reader.get(path)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert_secure(page, csp=False)


# --------------------------------------------------------------------------- switches


def test_docs_can_be_switched_off(make_settings):
    with TestClient(create_app(make_settings(docs_enabled=False))) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert client.get(path).status_code == 404, path
        assert client.get("/healthz").status_code == 200


def test_metrics_can_be_switched_off(make_settings):
    with TestClient(create_app(make_settings(metrics_enabled=False))) as client:
        assert client.get("/metrics").status_code == 404


def test_metrics_can_be_put_behind_a_token_of_their_own(make_settings):
    with TestClient(create_app(make_settings(metrics_token=METRICS_TOKEN))) as client:
        missing = client.get("/metrics")
        admin = client.get("/metrics", headers=ADMIN)
        granted = client.get("/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert missing.status_code == admin.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert granted.status_code == 200 and "recserve_requests_total" in granted.text
