import pytest
import torch

from training.data import build_sequences
from training.errors import CheckpointError
from training.evaluate import evaluate, model_scorer
from training.synthetic import SyntheticConfig, generate
from training.trainer import TrainConfig, load_checkpoint, train

SMALL = {"max_len": 16, "dim": 32}


@pytest.mark.slow
def test_trained_encoder_beats_popularity_threefold_on_synthetic_data(tmp_path):
    data = build_sequences(generate(SyntheticConfig(users=800, items=300, seed=11)))
    config = TrainConfig(epochs=4, batch_size=64, lr=3e-3, model_options=SMALL)
    metrics = train(data, config, tmp_path).report["metrics"]
    model, popularity = metrics["model"]["test"], metrics["popularity"]["test"]
    assert model["ndcg@10"] >= 3 * popularity["ndcg@10"]


def test_training_stops_early_when_valid_ndcg_stops_improving(tiny_data, tmp_path):
    config = TrainConfig(epochs=10, lr=0.0, patience=2, model_options=SMALL)
    report = train(tiny_data, config, tmp_path).report
    # lr 0: epoch 1 sets the best, epochs 2 and 3 are no better, then it stops
    assert report["epochs_run"] == 3
    assert report["best_epoch"] == 1
    assert report["stopped_by"] == "patience"


def test_training_stops_after_the_epoch_that_passes_its_time_limit(tiny_data, tmp_path):
    config = TrainConfig(epochs=10, max_seconds=1e-6, model_options=SMALL)
    report = train(tiny_data, config, tmp_path).report
    assert report["epochs_run"] == 1 and report["stopped_by"] == "time limit"
    assert "valid" in report["history"][0]  # the last epoch is evaluated, so it can be the best


def test_checkpoint_rebuilds_the_same_model(tiny_data, tmp_path):
    result = train(tiny_data, TrainConfig(epochs=1, model_options=SMALL), tmp_path)
    model, payload = load_checkpoint(result.checkpoint)
    assert payload["item_ids"] == tiny_data.item_map.raw.tolist()
    ids = torch.tensor([[0, 3, 5, 9]])
    deltas = torch.tensor([[0.0, 0.0, 30.0, 4000.0]])
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_user(ids, deltas), result.model.encode_user(ids, deltas)
        )
    reloaded = evaluate(model_scorer(model), tiny_data, "test", model.max_len)
    assert reloaded["ndcg@10"] == pytest.approx(
        result.report["metrics"]["model"]["test"]["ndcg@10"]
    )


def test_checkpoint_of_another_format_is_refused(tmp_path):
    torch.save({"format": 99}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "old.pt")
