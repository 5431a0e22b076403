"""The CTR head's pipeline end to end: candidates, training, evaluation, the benchmark."""

import json
from dataclasses import replace

import numpy as np
import pytest

from training.ctr import CtrConfig, prepare_ctr_data, rerank_quality, torch_scorer, train_ctr_head
from training.onnx_export import check_head_parity, export_ctr_head

TINY_HEAD = dict(candidates=30, epochs=3, batch_size=16, deep=(32,), tower=8, cross_layers=1)


def test_train_ctr_head_runs_end_to_end_and_beats_chance(tiny_data, exported_bundle, tmp_path):
    _, bundle_path = exported_bundle
    config = CtrConfig(**TINY_HEAD)
    prepared = prepare_ctr_data(tiny_data, bundle_path, config)
    head, report = train_ctr_head(tiny_data, bundle_path, config, prepared=prepared)
    assert report["tasks"] == ["watched"]  # the synthetic data has no ratings
    assert report["features"][-1] == "genre_overlap"  # ... but it has genres
    assert report["train_groups"] > 0
    holdout, test = report["holdout_valid"]["watched"], report["test"]["watched"]
    assert holdout["auc"] > 0.5 and test["auc"] > 0.5
    assert np.isfinite(holdout["log_loss"]) and np.isfinite(test["log_loss"])
    # No user trains the head and is also held out.
    assert not set(prepared.train_users) & set(prepared.holdout_users)

    quality = rerank_quality(
        torch_scorer(head), prepared.test, prepared.retriever.index.vectors, (10, 30)
    )
    assert quality["10"]["retrieval"]["recall@10"] <= quality["30"]["recall@depth"]
    assert quality["10"]["retrieval"] == quality["30"]["retrieval"]  # the same top 10
    for depth in ("10", "30"):
        assert 0.0 <= quality[depth]["reranked"]["ndcg@10"] <= 1.0

    path = tmp_path / "ctr_head.onnx"
    export_ctr_head(head, path)
    assert check_head_parity(head, path) <= 1e-4


def test_a_second_label_trains_two_tasks_with_adatask(tiny_data, exported_bundle):
    _, bundle_path = exported_bundle
    rng = np.random.default_rng(0)
    rated = replace(tiny_data, ratings=rng.integers(1, 6, len(tiny_data.items)).astype(np.float32))
    config = CtrConfig(**{**TINY_HEAD, "epochs": 2, "optimizer": "adatask", "max_users": 150})
    head, report = train_ctr_head(rated, bundle_path, config)
    assert report["tasks"] == ["watched", "liked"] and report["users"]["subsampled"]
    assert head.config.tasks == ["watched", "liked"]
    liked = report["test"]["liked"]
    assert 0.0 < liked["positive_rate"] < report["test"]["watched"]["positive_rate"]


@pytest.mark.slow
def test_rerank_benchmark_runs_on_tiny_data(tiny_data, trained_run, tmp_path, capsys):
    from bench.rerank_quality import main

    results = tmp_path / "rerank.json"
    argv = [
        "--data", "synthetic:users=300,items=120,mean_length=20,seed=1",
        "--checkpoint", str(trained_run.checkpoint),
        "--models-dir", str(tmp_path / "models"),
        "--results", str(results),
        "--candidates", "30", "--depths", "10", "30",
        "--head-epochs", "2", "--latency-runs", "20",
    ]  # fmt: skip
    assert main(argv) == 0
    written = json.loads(results.read_text())
    assert set(written["heads"]) == {"adam", "adatask"}
    for result in written["heads"].values():
        assert result["ranking"]["30"]["reranked"]["ndcg@10"] >= 0.0
        assert result["onnx_parity_max_abs_diff"] <= 1e-4
        assert result["latency_ms"]["head_p50"] > 0
        gate = result["gate"]
        assert gate["depth"] == 30 and gate["validation_users"] == result["users"]["holdout"]
        assert gate["test"]["split"] == "test" and gate["verdict"].startswith(("right", "wrong"))
    assert "NDCG@10" in capsys.readouterr().out
