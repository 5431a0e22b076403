"""Shared fixtures: tiny synthetic data, and the real datasets when they are present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REDIS_URL = os.environ.get("RECSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# One native thread for the tests' own training, exports and index builds (torch's intra-op
# pool, faiss's OpenMP, BLAS), and for the processes they start, unless set outside. Their
# work is tiny, and with a thread per core the threads spin-wait for each other whenever
# something else holds a core (the tests' servers, other jobs): on a busy 2-core machine
# an export's 100-step metadata-encoder fit took 17-23 s with two threads, 0.2 s with one.
# The service sets its own thread counts (RECSERVE_NATIVE_THREADS, RECSERVE_ONNX_THREADS).
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")


def real_data_dir() -> Path:
    """Where the real datasets live: $RECSERVE_DATA_DIR or ../shared/data beside the repo."""
    return Path(os.environ.get("RECSERVE_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture
def real_data():
    """Path to one real dataset folder, or a skip that says where it was looked for."""

    def find(name: str) -> Path:
        path = real_data_dir() / name
        if not path.exists():
            pytest.skip(f"real data {name} not found at {path}; set RECSERVE_DATA_DIR")
        return path

    return find


@pytest.fixture(scope="session")
def tiny_data():
    """A small synthetic log as SequenceData (a few hundred users): fast to train on."""
    from training.data import build_sequences
    from training.synthetic import SyntheticConfig, generate

    return build_sequences(generate(SyntheticConfig(users=300, items=120, mean_length=20, seed=1)))


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """A SASRec-kind checkpoint trained briefly on ``tiny_data``."""
    from training.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(epochs=2, lr=3e-3, model_options={"max_len": 16, "dim": 16})
    return train(tiny_data, config, out)


@pytest.fixture(scope="session")
def exported_bundle(tiny_data, trained_run, tmp_path_factory):
    """A models dir holding one exact-index bundle of ``trained_run`` (CURRENT points at it)."""
    from training.export import export_bundle

    models_dir = tmp_path_factory.mktemp("models")
    path = export_bundle([trained_run.checkpoint], tiny_data, models_dir, name="tiny")
    return models_dir, path


# The tiny data's heads are too weakly measured for the gate to be predictable, so the
# tests' head bundles force the rerank on at export (the option under test in
# tests/training): their tests are about serving a head. ``gated_off_models``
# (tests/service) is the other case.
FORCED_ON = {"rerank_default": "on"}


@pytest.fixture(scope="session")
def head_models(tiny_data, trained_run, tmp_path_factory):
    """A models dir whose CURRENT bundle ("with-head") has a CTR head that reranks by
    default."""
    from training.ctr import CtrConfig
    from training.export import export_bundle
    from training.rerank_gate import GateConfig

    models = tmp_path_factory.mktemp("head-models")
    config = CtrConfig(candidates=30, epochs=2, encode_batch=128)
    export_bundle(
        [trained_run.checkpoint],
        tiny_data,
        models,
        name="with-head",
        ctr=config,
        gate=GateConfig(**FORCED_ON),
    )
    return models


@pytest.fixture(scope="session")
def shared_redis():
    """A sync client of the shared Redis; skips the test when it is not running."""
    import redis

    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"no Redis at {SHARED_REDIS_URL} ({exc}); set RECSERVE_TEST_REDIS_URL")
    yield client
    client.close()
