"""What the service shows to whom: /readyz's details only with the admin token, bounded
excerpts of outside text in answers and logs."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from service.bundle import CURRENT
from service.main import create_app
from tests.service.conftest import ADMIN_TOKEN

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
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


def test_readyz_tells_anyone_whether_it_is_ready_and_no_more(client):
    body = client.get("/readyz").json()
    assert body == {
        "ready": True,
        "bundle": "tiny",
        "encoders": ["sasrec"],
        "redis": "up",
        "reload_refused": False,
    }


def test_readyz_adds_placement_and_the_last_error_for_the_admin(client):
    body = client.get("/readyz", headers=ADMIN).json()
    assert body["placement"]["sasrec"]["index"] == "cpu"
    assert body["last_error"] is None
    wrong = client.get("/readyz", headers={"authorization": "Bearer " + "w" * 30}).json()
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


def test_an_unexpected_key_is_named_in_the_answer_only_as_an_excerpt(client):
    key = "k" * 500_000  # within the body limit
    answer = client.post("/recommend", json={"history": [], key: 1})
    assert answer.status_code == 422 and len(answer.text) < 2000
    assert "extra" in answer.json()["detail"].lower()
    assert answer.json()["errors"][0]["loc"][1].startswith("'kkk")


def test_a_user_id_with_control_characters_is_escaped_in_the_404(client):
    answer = client.post("/recommend", json={"user_id": "nobody\r\nX-Injected: 1"})
    assert answer.status_code == 404
    assert "\\r\\n" in answer.json()["detail"] and "\r" not in answer.json()["detail"]
