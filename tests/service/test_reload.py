"""Bundles change under a running service: admin reload, polling, refusals, no bundle."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from service.bundle import CURRENT, set_current
from service.main import create_app
from tests.service.bundles import publish_mismatch
from tests.service.conftest import ADMIN_TOKEN, ON_BOTH_REDIS, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def publish(served_models, source) -> str:
    """Copy bundle folder ``source`` into the served models dir and make it CURRENT."""
    shutil.copytree(source, served_models / source.name)
    set_current(served_models, source.name)
    return source.name


def signals(client, outcome: str) -> float:
    """recserve_reload_signals_total{outcome=...} of the app behind ``client``."""
    found = re.search(
        rf'recserve_reload_signals_total{{outcome="{outcome}"}} ([0-9.]+)',
        client.get("/metrics").text,
    )
    return float(found.group(1)) if found else 0.0


def reload_channel_of(settings) -> str:
    from service.reload_signals import ReloadSignals

    return ReloadSignals.from_settings(settings).channel


def wait_for_listeners(redis_client, channel: str, count: int) -> None:
    import redis

    # A cluster client asks its default node alone unless told to ask (and sum) them all.
    nodes = {"target_nodes": "all"} if isinstance(redis_client, redis.RedisCluster) else {}
    wait_until(
        lambda: dict(redis_client.pubsub_numsub(channel, **nodes)).get(channel.encode()) == count,
        timeout=10,
        what=f"{count} worker(s) to listen on {channel}",
    )


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


def test_reload_without_a_token_is_401(reader):
    response = reader.post("/admin/reload")
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
def test_reload_with_a_wrong_token_is_401(reader, authorization):
    response = reader.post("/admin/reload", headers={"authorization": authorization})
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
    text = client.get("/metrics").text
    assert 'recserve_bundle_info{bundle="tiny-v2"} 1.0' in text
    assert 'recserve_bundle_info{bundle="tiny"}' not in text


@ON_BOTH_REDIS
def test_a_reload_reaches_the_other_workers_over_redis(
    make_settings, served_models, second_bundle, history, redis_client
):
    # Two apps share this process's GIL, and each reload runs a full garbage collection,
    # which takes tens of milliseconds in a test process that holds torch: a Redis reply
    # can wait for it longer than the default timeout.
    settings = make_settings(redis_timeout_seconds=2.0)
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        wait_for_listeners(redis_client, reload_channel_of(settings), 2)
        publish(served_models, second_bundle)
        response = first.post("/admin/reload", headers=ADMIN)
        assert response.json()["workers_notified"] == 2
        wait_until(
            lambda: second.get("/readyz").json()["bundle"] == "tiny-v2",
            timeout=10,
            what="the second worker to load tiny-v2",
        )
        assert second.post("/recommend", json={"history": history}).json()["bundle"] == "tiny-v2"
        assert signals(second, "accepted") >= 1


# --------------------------------------------------------------------------- the channel's trust


def two_workers(settings):
    """Two apps of one deployment (one process, as two uvicorn workers would be)."""
    return TestClient(create_app(settings)), TestClient(create_app(settings))


def test_a_forged_reload_message_is_ignored_counted_and_leaves_no_error(
    make_settings, served_models, second_bundle, shared_redis, key_prefix
):
    # What the probe did: `redis-cli publish recserve:reload ml100k`, on every channel
    # the workers listen on (PUBSUB CHANNELS shows them to anyone who reaches Redis).
    shutil.copytree(second_bundle, served_models / second_bundle.name)  # there, not CURRENT
    settings = make_settings(redis_timeout_seconds=2.0)
    first, second = two_workers(settings)
    with first, second:
        channels = wait_until(
            lambda: [
                c
                for c in shared_redis.pubsub_channels(f"{key_prefix}:reload*")
                if dict(shared_redis.pubsub_numsub(c)).get(c) == 2
            ],
            timeout=10,
            what="both workers to listen on a reload channel",
        )
        forged = [
            second_bundle.name.encode(),
            json.dumps({"v": 1, "deployment": "x", "ts": time.time(), "nonce": "n", "mac": "0"}),
        ]
        for channel in channels:
            for message in forged:
                shared_redis.publish(channel, message)
        clients = (first, second)

        def settled():
            moved = any(c.get("/readyz").json()["bundle"] != "tiny" for c in clients)
            counted = all(
                signals(c, "unsigned") + signals(c, "other_deployment")
                == len(forged) * len(channels)
                for c in clients
            )
            return moved or counted

        wait_until(settled, timeout=10, what="the workers to hear the forged messages")
        time.sleep(0.3)  # a reload it had started would show by now
        for client in clients:
            ready = client.get("/readyz", headers=ADMIN).json()
            assert ready["bundle"] == "tiny", "a forged message switched the bundle"
            assert ready["last_error"] is None
            assert signals(client, "accepted") == 0
            assert 'recserve_reloads_total{outcome="refused"}' not in client.get("/metrics").text


def test_signed_signals_are_accepted_only_fresh_once_and_for_this_deployment(
    make_settings, served_models, shared_redis
):
    from service.reload_signals import ReloadSignals, deployment_id

    settings = make_settings(redis_timeout_seconds=2.0)
    ours = ReloadSignals.from_settings(settings)
    here = deployment_id(settings)
    first, second = two_workers(settings)
    with first, second:
        wait_for_listeners(shared_redis, ours.channel, 2)
        capture = shared_redis.pubsub()
        capture.subscribe(ours.channel)
        wait_for_listeners(shared_redis, ours.channel, 3)
        assert first.post("/admin/reload", headers=ADMIN).json()["workers_notified"] == 3
        genuine = wait_until(
            lambda: capture.get_message(timeout=0.1, ignore_subscribe_messages=True),
            timeout=5,
            what="the signal of /admin/reload",
        )["data"]
        capture.close()
        wait_until(lambda: signals(second, "accepted") == 1, 10, what="the genuine signal")
        prefix = settings.key_prefix
        for message in (
            genuine,  # replayed
            ReloadSignals(prefix, here, "another-admin-token-xxxxxxxx").sign(),
            ReloadSignals(prefix, "elsewhere", ADMIN_TOKEN).sign(),
            ReloadSignals(prefix, here, ADMIN_TOKEN, clock=lambda: time.time() - 3600).sign(),
        ):
            shared_redis.publish(ours.channel, message)
        expected = {"replayed": 1, "bad_signature": 1, "other_deployment": 1, "stale": 1}
        for client in (first, second):
            wait_until(
                lambda c=client: all(signals(c, k) == n for k, n in expected.items()),
                timeout=10,
                what="the four signals to be refused",
            )
            assert signals(client, "accepted") == 1
            assert client.get("/readyz", headers=ADMIN).json()["last_error"] is None


@pytest.mark.parametrize("scoped_by", ["models_dir", "RECSERVE_DEPLOYMENT"])
def test_deployments_sharing_redis_and_prefix_do_not_hear_each_other(
    make_settings, served_models, second_bundle, tmp_path, shared_redis, scoped_by
):
    # Same Redis, same key prefix, even the same admin token.
    if scoped_by == "models_dir":
        other_models = tmp_path / "other-models"
        shutil.copytree(served_models, other_models)
        blue = make_settings(redis_timeout_seconds=2.0)
        green = make_settings(redis_timeout_seconds=2.0, models_dir=other_models)
    else:
        blue = make_settings(redis_timeout_seconds=2.0, deployment="blue")
        green = make_settings(redis_timeout_seconds=2.0, deployment="green")
    with TestClient(create_app(blue)) as first, TestClient(create_app(green)) as other:
        publish(served_models, second_bundle)  # blue's models dir
        response = first.post("/admin/reload", headers=ADMIN)
        assert response.json()["serving"] == "tiny-v2"
        assert response.json()["workers_notified"] == 1  # blue's one worker, not green's
        time.sleep(0.5)
        ready = other.get("/readyz", headers=ADMIN).json()
        assert ready["bundle"] == "tiny" and ready["last_error"] is None
        assert "recserve_reload_signals_total{" not in other.get("/metrics").text
        assert 'recserve_reloads_total{outcome="refused"}' not in other.get("/metrics").text


def test_a_signal_clears_an_error_once_current_is_fine_again(
    make_settings, served_models, shared_redis
):
    settings = make_settings(redis_timeout_seconds=2.0)
    first, second = two_workers(settings)
    with first, second:
        wait_for_listeners(shared_redis, reload_channel_of(settings), 2)
        corrupt_copy(served_models)
        assert first.post("/admin/reload", headers=ADMIN).status_code == 409
        set_current(served_models, "tiny")
        assert second.post("/admin/reload", headers=ADMIN).status_code == 200
        wait_until(
            lambda: first.get("/readyz", headers=ADMIN).json()["last_error"] is None,
            timeout=10,
            what="the signal to clear the first worker's error",
        )


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


@pytest.mark.parametrize("compute", ["thread", pytest.param("process", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["vectors", "index", "head"])
def test_a_bundle_whose_parts_do_not_fit_is_refused_and_the_old_one_keeps_serving(
    make_settings, served_models, head_models, history, kind, compute
):
    # Checksums all match: only the load-time checks of the parts can refuse it.
    with TestClient(create_app(make_settings(compute=compute))) as client:
        source = head_models / "with-head" if kind == "head" else served_models / "tiny"
        named = publish_mismatch(served_models, source, kind, f"bad-{kind}")
        response = client.post("/admin/reload", headers=ADMIN)
        assert response.status_code == 409, response.text
        assert named in response.json()["detail"] and response.json()["serving"] == "tiny"
        for _ in range(5):
            served = client.post("/recommend", json={"history": history})
            assert served.status_code == 200 and served.json()["bundle"] == "tiny"
        assert client.get("/items/1/similar").status_code == 200
        ready = client.get("/readyz", headers=ADMIN).json()
        assert ready["bundle"] == "tiny" and named in ready["last_error"]


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
