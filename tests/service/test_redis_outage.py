"""Redis goes away under a running service, then comes back (a private redis-server)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import redis
from fastapi.testclient import TestClient

from service.bundle import set_current
from service.main import create_app
from tests.service.conftest import ADMIN_TOKEN, wait_until


@pytest.fixture
def outage_client(make_settings, redis_server):
    """An app on a private redis-server (``redis_server``) that the test may stop."""
    with TestClient(create_app(make_settings(redis_url=redis_server.url))) as client:
        yield client


def writes_landed(client) -> None:
    """Wait for the cache writes behind the answers so far: until one lands, a repeat of
    its request is served from the entry being written (a hit), whatever Redis does."""
    client.portal.call(client.app.state.recserve.recommender.drain)


def store(client, user: str, history: list[dict]) -> None:
    response = client.post("/events", json=[{"user_id": user, **event} for event in history])
    assert response.status_code == 200, response.text


def test_a_request_with_a_history_is_served_while_redis_is_down(
    outage_client, redis_server, history
):
    before = outage_client.post("/recommend", json={"history": history})
    assert before.json()["cache"] == "miss"
    writes_landed(outage_client)
    redis_server.stop()
    for _ in range(3):  # the first call meets the dead pooled connection, later ones reconnect
        during = outage_client.post("/recommend", json={"history": history})
        assert during.status_code == 200
        assert during.json()["cache"] == "bypass" and during.json()["fallback"] is None
        assert during.json()["items"] == before.json()["items"]


def test_a_user_id_only_request_gets_the_popularity_fallback_while_redis_is_down(
    outage_client, redis_server, history
):
    store(outage_client, "user-1", history)
    assert outage_client.post("/recommend", json={"user_id": "user-1"}).json()["fallback"] is None
    redis_server.stop()
    response = outage_client.post("/recommend", json={"user_id": "user-1", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["fallback"] == "popularity" and body["cache"] == "bypass"
    assert len(body["items"]) == 5
    assert 'recserve_fallback_total{kind="popularity"} 1.0' in outage_client.get("/metrics").text


def test_events_are_refused_with_retry_after_while_redis_is_down(outage_client, redis_server):
    redis_server.stop()
    event = {"user_id": "user-1", "item_id": "3", "ts": 1_700_000_000}
    for _ in range(2):
        response = outage_client.post("/events", json=event)
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert "unavailable" in response.json()["detail"]
        assert "Traceback" not in response.text


def test_readiness_reports_redis_down_but_still_serves(outage_client, redis_server):
    redis_server.stop()
    ready = outage_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] == "down" and ready.json()["bundle"] == "tiny"


def test_admin_reload_works_while_redis_is_down(outage_client, redis_server):
    redis_server.stop()
    response = outage_client.post(
        "/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200
    assert response.json()["serving"] == "tiny" and response.json()["workers_notified"] is None


def test_the_service_reconnects_by_itself_when_redis_comes_back(
    outage_client, redis_server, history
):
    store(outage_client, "user-1", history[:-1])
    redis_server.stop()
    refused = outage_client.post("/events", json={"user_id": "user-1", **history[-1]})
    assert refused.status_code == 503

    redis_server.start()  # same port, empty: nothing was saved
    wait_until(
        lambda: (
            outage_client.post(
                "/events", json=[{"user_id": "user-1", **event} for event in history]
            ).status_code
            == 200
        ),
        timeout=10,
        what="/events to accept events again",
    )
    assert outage_client.get("/readyz").json()["redis"] == "up"
    first = outage_client.post("/recommend", json={"user_id": "user-1"})
    second = outage_client.post("/recommend", json={"user_id": "user-1"})
    assert first.status_code == 200 and first.json()["fallback"] is None
    assert (first.json()["cache"], second.json()["cache"]) == ("miss", "hit")
    by_history = outage_client.post("/recommend", json={"history": history})
    assert first.json()["items"] == by_history.json()["items"]


def test_the_reload_channel_is_joined_again_after_an_outage(
    outage_client, redis_server, served_models, second_bundle
):
    from service.reload_signals import ReloadSignals

    redis_server.stop()
    redis_server.start()
    signals = ReloadSignals.from_settings(outage_client.app.state.recserve.settings)
    channel = signals.channel
    probe = redis.Redis.from_url(redis_server.url)
    try:
        wait_until(
            lambda: dict(probe.pubsub_numsub(channel)).get(channel.encode()) == 1,
            timeout=10,
            what="the worker to subscribe again",
        )
        shutil.copytree(second_bundle, served_models / second_bundle.name)
        set_current(served_models, second_bundle.name)
        assert probe.publish(channel, signals.sign()) == 1
        wait_until(
            lambda: outage_client.get("/readyz").json()["bundle"] == "tiny-v2",
            timeout=10,
            what="the worker to load tiny-v2 from the channel",
        )
    finally:
        probe.close()


def test_a_hung_redis_costs_a_request_no_more_than_the_timeout(
    outage_client, redis_server, history
):
    before = outage_client.post("/recommend", json={"history": history})
    writes_landed(outage_client)
    os.kill(redis_server.process.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
    try:
        started = time.perf_counter()
        during = outage_client.post("/recommend", json={"history": history})
        took = time.perf_counter() - started
        assert during.status_code == 200 and during.json()["cache"] == "bypass"
        assert during.json()["items"] == before.json()["items"]
        assert took < 2.0  # redis_timeout_seconds is 0.25
        event = {"user_id": "user-1", "item_id": "3", "ts": 1_700_000_000}
        assert outage_client.post("/events", json=event).status_code == 503
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
