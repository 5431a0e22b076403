"""Shared fixtures: tiny synthetic data, and the real datasets when they are present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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
