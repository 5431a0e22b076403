"""Bundles change under a running service: admin reload, polling, refusals, no bundle."""

from __future__ import annotations

import shutil
import time

import pytest
from fastapi.testclient import TestClient

from service.bundle import CURRENT, set_current
from service.main import create_app
from tests.service.conftest import ADMIN_TOKEN, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def publish(served_models, source) -> str:
    """Copy bundle folder ``source`` into the served models dir and make it CURRENT."""
    shutil.copytree(source, served_models / source.name)
    set_current(served_models, source.name)
    return source.name


def corrupt_copy(served_models, name: str = "tiny-bad") -> str:
    """A copy of "tiny" with one flipped byte in its index, made CURRENT."""
    shutil.copytree(served_models / "tiny", served_models / name)
    target = served_models / name / "retrievers/sasrec/items.faiss"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    set_current(served_models, name)
    return name


# --------------------------------------------------------------------------- admin auth


def test_reload_without_a_token_is_401(client):
    response = client.post("/admin/reload")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong-token-wrong-token",
        f"Bearer {ADMIN_TOKEN}x",
        f"Bearer {ADMIN_TOKEN[:-1]}",
        f"Basic {ADMIN_TOKEN}",
        ADMIN_TOKEN,
        "Bearer ",
        "Bearer ünïcødé".encode(),
    ],
)
def test_reload_with_a_wrong_token_is_401(client, authorization):
    response = client.post("/admin/reload", headers={"authorization": authorization})
    assert response.status_code == 401


def test_reload_with_the_token_is_200(client):
    response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 200
    assert response.json()["serving"] == "tiny" and response.json()["previous"] == "tiny"


def test_admin_disabled_is_404(make_settings):
    with TestClient(create_app(make_settings(admin_enabled=False, admin_token=None))) as client:
        assert client.post("/admin/reload", headers=ADMIN).status_code == 404


# --------------------------------------------------------------------------- swapping bundles


def test_reload_serves_the_bundle_named_by_current(client, served_models, second_bundle, history):
    before = client.post("/recommend", json={"history": history})
    assert before.json()["bundle"] == "tiny"
    publish(served_models, second_bundle)
    response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 200
    assert response.json()["serving"] == "tiny-v2" and response.json()["previous"] == "tiny"
    after = client.post("/recommend", json={"history": history})
    assert after.status_code == 200 and after.json()["bundle"] == "tiny-v2"
    # Another bundle never meets the old bundle's cache entries.
    assert after.json()["cache"] == "miss"
    assert client.get("/readyz").json()["bundle"] == "tiny-v2"
    assert client.get("/items/1/similar").json()["bundle"] == "tiny-v2"
    assert 'recserve_bundle_info{bundle="tiny-v2"} 1.0' in client.get("/metrics").text


def test_a_reload_reaches_the_other_workers_over_redis(
    make_settings, served_models, second_bundle, history, shared_redis, key_prefix
):
    # Two apps share this process's GIL, and each reload runs a full garbage collection,
    # which takes tens of milliseconds in a test process that holds torch: a Redis reply
    # can wait for it longer than the default timeout.
    settings = make_settings(redis_timeout_seconds=2.0)
    channel = f"{key_prefix}:reload"
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        wait_until(
            lambda: dict(shared_redis.pubsub_numsub(channel)).get(channel.encode()) == 2,
            timeout=10,
            what="both workers to listen on the reload channel",
        )
        publish(served_models, second_bundle)
        response = first.post("/admin/reload", headers=ADMIN)
        assert response.json()["workers_notified"] == 2
        wait_until(
            lambda: second.get("/readyz").json()["bundle"] == "tiny-v2",
            timeout=10,
            what="the second worker to load tiny-v2",
        )
        assert second.post("/recommend", json={"history": history}).json()["bundle"] == "tiny-v2"


def test_workers_follow_current_by_polling(make_settings, served_models, second_bundle):
    with TestClient(create_app(make_settings(reload_poll_seconds=0.1))) as client:
        assert client.get("/readyz").json()["bundle"] == "tiny"
        publish(served_models, second_bundle)
        wait_until(
            lambda: client.get("/readyz").json()["bundle"] == "tiny-v2",
            timeout=10,
            what="polling to load tiny-v2",
        )


# --------------------------------------------------------------------------- refusals


def test_a_corrupt_bundle_is_refused_and_the_old_one_keeps_serving(client, served_models, history):
    corrupt_copy(served_models)
    response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 409
    body = response.json()
    assert "items.faiss" in body["detail"] and "checksum" in body["detail"]
    assert body["serving"] == "tiny"

    served = client.post("/recommend", json={"history": history})
    assert served.status_code == 200 and served.json()["bundle"] == "tiny"
    ready = client.get("/readyz", headers=ADMIN)
    assert ready.status_code == 200 and ready.json()["bundle"] == "tiny"
    assert "items.faiss" in ready.json()["last_error"]
    assert "checksum" in ready.json()["last_error"]
    assert 'recserve_reloads_total{outcome="refused"} 1.0' in client.get("/metrics").text


def test_a_fixed_current_clears_the_last_error(client, served_models, second_bundle):
    corrupt_copy(served_models)
    assert client.post("/admin/reload", headers=ADMIN).status_code == 409
    publish(served_models, second_bundle)
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200
    ready = client.get("/readyz", headers=ADMIN).json()
    assert ready["bundle"] == "tiny-v2" and ready["last_error"] is None


def test_current_set_back_to_the_served_bundle_clears_the_last_error(client, served_models):
    corrupt_copy(served_models)
    assert client.post("/admin/reload", headers=ADMIN).status_code == 409
    set_current(served_models, "tiny")
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200
    ready = client.get("/readyz", headers=ADMIN).json()
    assert ready["bundle"] == "tiny" and ready["last_error"] is None


def test_a_refused_bundle_is_not_retried_by_polling(make_settings, served_models):
    refused_once = 'recserve_reloads_total{outcome="refused"} 1.0'
    with TestClient(create_app(make_settings(reload_poll_seconds=0.05))) as client:
        corrupt_copy(served_models)
        wait_until(
            lambda: refused_once in client.get("/metrics").text,
            timeout=10,
            what="polling to refuse the corrupt bundle",
        )
        time.sleep(0.5)  # ten more polls
        assert refused_once in client.get("/metrics").text  # not re-verified every poll
        ready = client.get("/readyz", headers=ADMIN).json()
        assert ready["bundle"] == "tiny" and "items.faiss" in ready["last_error"]


def test_current_naming_a_missing_bundle_is_refused(client, served_models):
    (served_models / CURRENT).write_text("no-such-bundle\n")
    response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 409 and "no-such-bundle" in response.json()["detail"]
    assert client.get("/readyz").json()["bundle"] == "tiny"


def test_current_cannot_point_outside_the_models_dir(client, served_models):
    (served_models / CURRENT).write_text("../elsewhere\n")
    response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 409 and "invalid bundle name" in response.json()["detail"]


# --------------------------------------------------------------------------- no bundle


def test_a_service_without_a_bundle_answers_503(make_settings, served_models, history):
    (served_models / CURRENT).unlink()
    with TestClient(create_app(make_settings())) as client:
        recommend = client.post("/recommend", json={"history": history})
        assert recommend.status_code == 503 and "Retry-After" in recommend.headers
        assert "no bundle loaded" in recommend.json()["detail"]
        ready = client.get("/readyz", headers=ADMIN)
        assert ready.status_code == 503
        assert ready.json()["ready"] is False and ready.json()["bundle"] is None
        assert "CURRENT" in ready.json()["last_error"]
        assert client.get("/items/1/similar").status_code == 503
        assert client.get("/healthz").status_code == 200  # alive, just not ready


def test_a_service_without_a_bundle_serves_once_one_is_published(
    make_settings, served_models, history
):
    (served_models / CURRENT).unlink()
    with TestClient(create_app(make_settings())) as client:
        assert client.post("/recommend", json={"history": history}).status_code == 503
        set_current(served_models, "tiny")
        assert client.post("/admin/reload", headers=ADMIN).json()["serving"] == "tiny"
        assert client.post("/recommend", json={"history": history}).status_code == 200
        assert client.get("/readyz").status_code == 200
