"""Fixtures of the service tests: served copies of the tiny bundle, Redis, app clients.

Tests that talk to the shared Redis (``RECSERVE_TEST_REDIS_URL``, default
127.0.0.1:6379) get a unique key prefix each, removed afterwards. Tests that need to stop
Redis start their own ``redis-server`` on a free port (``redis_server``). Tests of the same
behaviour on a Redis Cluster share one private cluster of the session (``redis_cluster``:
three primaries with a replica each on loopback ports); tests that kill its nodes start
their own.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import FORCED_ON, SHARED_REDIS_URL
from tests.servers import (  # noqa: F401 (re-exported)
    RedisClusterProcesses,
    RedisProcess,
    free_port,
    wait_until,
)

ADMIN_TOKEN = "test-admin-token-" + "x" * 20


def server_settings(models_dir: Path, key_prefix: str) -> dict[str, str]:
    """RECSERVE_* variables of a real test server (tests/servers.py's ``UvicornService``):
    ``models_dir`` served on CPU, the shared Redis under ``key_prefix``, no reload polling."""
    return {
        "RECSERVE_MODELS_DIR": str(models_dir),
        "RECSERVE_REDIS_URL": SHARED_REDIS_URL,
        "RECSERVE_KEY_PREFIX": key_prefix,
        "RECSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
        "RECSERVE_RELOAD_POLL_SECONDS": "0",
        "RECSERVE_DEVICE": "cpu",
    }


def history_events(data, user: int, end: int | None = None) -> list[dict]:
    """The events of ``user`` (0-based) in ``data`` up to ``end`` (exclusive, into items)."""
    start = int(data.offsets[user])
    end = int(data.offsets[user + 1]) if end is None else int(end)
    return [
        {"item_id": str(data.item_map.raw[item]), "ts": int(ts)}
        for item, ts in zip(data.items[start:end], data.timestamps[start:end], strict=True)
    ]


@pytest.fixture
def history(tiny_data) -> list[dict]:
    """One user's whole history as request events (user 2: twenty-odd known items)."""
    return history_events(tiny_data, 2)


def delete_prefix(client, prefix: str) -> None:
    """Delete the prefix's keys, those under a hash tag (``{prefix:...}``) too."""
    keys = [
        key
        for pattern in (f"{prefix}:*", f"{{{prefix}:*")
        for key in client.scan_iter(match=pattern, count=1000)
    ]
    if keys:
        client.delete(*keys)


@pytest.fixture
def key_prefix(shared_redis):
    """A key prefix no other test uses; its keys are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:20]}"
    yield prefix
    delete_prefix(shared_redis, prefix)


GATE_SAYS_NO = "measured on validation users: no gain shown, retrieval order by default"


def with_gate(models: Path, destination: Path, gate: dict | None) -> Path:
    """A copy of the models dir ``models`` whose CURRENT bundle's retrievers carry ``gate``
    as their ``ctr_head.gate`` (None: no gate, as a bundle exported before it had)."""
    from service.bundle import current_name
    from tests.service.bundles import manifest_of, write_manifest

    shutil.copytree(models, destination)
    bundle = destination / current_name(destination)
    manifest = manifest_of(bundle)
    for entry in manifest["retrievers"].values():
        entry["ctr_head"].pop("gate", None)
        if gate is not None:
            entry["ctr_head"]["gate"] = {**gate}
    write_manifest(bundle, manifest)
    return destination


@pytest.fixture(scope="module")
def gated_off_models(head_models, tmp_path_factory) -> Path:
    """The head bundle as the gate leaves a head that did not help: retrieval order by
    default, with the gate's reason (tests serve copies of it)."""
    return with_gate(
        head_models,
        tmp_path_factory.mktemp("gated") / "gated-off",
        {"rerank_by_default": False, "reason": GATE_SAYS_NO},
    )


@pytest.fixture(scope="session")
def two_retriever_models(tiny_data, trained_run, tmp_path_factory) -> Path:
    """A models dir whose CURRENT bundle ("two") holds the SASRec-kind and a two-tower
    retriever, each with a CTR head that reranks by default: what the quickstart builds,
    in small."""
    from training.ctr import CtrConfig
    from training.export import export_bundle
    from training.rerank_gate import GateConfig
    from training.trainer import TrainConfig, train

    two_tower = train(
        tiny_data,
        TrainConfig(model="two_tower", epochs=2, lr=3e-3, model_options={"max_len": 16, "dim": 16}),
        tmp_path_factory.mktemp("two-tower-run"),
    )
    models = tmp_path_factory.mktemp("two-models")
    config = CtrConfig(candidates=30, epochs=2, encode_batch=128)
    export_bundle(
        [trained_run.checkpoint, two_tower.checkpoint],
        tiny_data,
        models,
        name="two",
        ctr=config,
        gate=GateConfig(**FORCED_ON),
    )
    return models


@pytest.fixture
def served_models(exported_bundle, tmp_path) -> Path:
    """A private copy of the models dir (CURRENT = "tiny") that a test may change."""
    models_dir, _ = exported_bundle
    copy = tmp_path / "models"
    shutil.copytree(models_dir, copy)
    return copy


@pytest.fixture(scope="session")
def second_bundle(exported_bundle, tmp_path_factory) -> Path:
    """Another bundle of the same checkpoint, named "tiny-v2": the tiny bundle's files
    under another name, which is all an export of its own would change that its tests
    read (and it cost an export's 5-10 s)."""
    from tests.service.bundles import manifest_of, write_manifest

    _, tiny = exported_bundle
    out = tmp_path_factory.mktemp("second") / "tiny-v2"
    shutil.copytree(tiny, out)
    manifest = manifest_of(out)
    manifest["name"] = out.name
    write_manifest(out, manifest)
    return out


def app_settings(models_dir: Path, key_prefix: str, **overrides):
    """Settings of a test app: ``models_dir`` served, the shared Redis under ``key_prefix``."""
    from service.settings import Settings

    values = {
        "models_dir": models_dir,
        "redis_url": SHARED_REDIS_URL,
        "key_prefix": key_prefix,
        "reload_poll_seconds": 0,
        "admin_token": ADMIN_TOKEN,
        "device": "cpu",
        # A compute process per test app would add seconds to each; tests/service/
        # test_compute.py and the real-server tests run the default process mode.
        "compute": "thread",
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def redis_url(request) -> str:
    """The Redis of a test's app (``make_settings``): the shared one, or the session's Redis
    Cluster for a test parametrized with ``ON_BOTH_REDIS``."""
    if getattr(request, "param", "single") == "cluster":
        return request.getfixturevalue("redis_cluster").url
    return SHARED_REDIS_URL


# Runs a test whose app uses ``make_settings`` (or ``client``) on one Redis and on a Redis
# Cluster: the same behaviour is asked of both.
ON_BOTH_REDIS = pytest.mark.parametrize("redis_url", ["single", "cluster"], indirect=True)


def sync_client(url: str):
    """redis-py's synchronous client of a service URL (one server, or a cluster for
    ``redis+cluster://``), for tests that look at what the service stored."""
    import redis

    from service.cache import CLUSTER_SCHEMES

    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        return redis.RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}")
    return redis.Redis.from_url(url)


@pytest.fixture
def redis_client(redis_url):
    """A synchronous client of the test app's Redis (``redis_url``)."""
    client = sync_client(redis_url)
    yield client
    client.close()


@pytest.fixture
def make_settings(served_models, key_prefix, redis_url):
    """Settings of a test app: the served copy, the shared Redis (or ``redis_url``) under a
    unique prefix."""

    def make(**overrides):
        values = {"models_dir": served_models, "key_prefix": key_prefix, "redis_url": redis_url}
        return app_settings(**{**values, **overrides})

    return make


@pytest.fixture
def client(make_settings):
    """A TestClient of an app serving the tiny bundle; the lifespan runs."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


@contextmanager
def shared_app(models_dir: Path, tmp_path_factory, redis_client) -> Iterator:
    """A TestClient of an app serving a copy of ``models_dir``, under a key prefix of its
    own (deleted afterwards), for the tests of a module that only read.

    Every app start runs the service's full garbage collection
    (``service.bundle.settle_heap``), which walks the whole heap of the test process, torch
    and the ONNX exporter included: half a second a start. Tests whose requests change
    nothing a later request could see (refused input, reads, recommendations for a history
    sent along, no assertion about caches or counters) share one app instead.
    """
    from fastapi.testclient import TestClient

    from service.main import create_app

    copy = tmp_path_factory.mktemp("shared-app") / "models"
    shutil.copytree(models_dir, copy)
    prefix = f"t{uuid.uuid4().hex[:20]}"
    try:
        with TestClient(create_app(app_settings(copy, prefix))) as test_client:
            yield test_client
    finally:
        delete_prefix(redis_client, prefix)


@pytest.fixture(scope="module")
def reader(exported_bundle, tmp_path_factory, shared_redis):
    """One app serving the tiny bundle for a module's read-only tests (``shared_app``)."""
    with shared_app(exported_bundle[0], tmp_path_factory, shared_redis) as test_client:
        yield test_client


@pytest.fixture
def redis_server(tmp_path):
    """A running private redis-server (``.url``, ``.stop()``, ``.start()``), always killed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(free_port(), tmp_path / "redis")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def start_cluster(workdir: Path) -> RedisClusterProcesses:
    """A private Redis Cluster (three primaries, a replica each), formed and in sync; a
    skip when redis-server is not installed."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed")
    cluster = RedisClusterProcesses(workdir)
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterProcesses]:
    """One private Redis Cluster for the session's tests that do not break it (each
    under a key prefix of its own); ``.url`` is the service's ``redis+cluster://`` URL."""
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def clean_recserve_environment(monkeypatch):
    """No RECSERVE_* variable of the machine running the tests leaks into Settings()."""
    for name in list(os.environ):
        if name.startswith("RECSERVE_"):
            monkeypatch.delenv(name)
