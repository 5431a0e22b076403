import json

import numpy as np
import pytest
import torch

from service.bundle import load_bundle, read_manifest
from training.batch_recommend import batch_recommend
from training.errors import CheckpointError, ExportError
from training.evaluate import model_scorer, ranked_scores
from training.onnx_export import (
    PARITY_TOLERANCE,
    check_encoder_parity,
    check_parity,
    export_user_encoder,
    parity_shapes,
)


def test_parity_shapes_include_lengths_not_used_at_export():
    shapes = parity_shapes(200)
    lengths = {length for _, length in shapes}
    assert {1, 7, 50, 200} <= lengths
    assert 8 not in lengths  # the export example's length


def test_one_parity_check_names_file_difference_shape_and_tolerance(tmp_path):
    path = tmp_path / "graph.onnx"
    batches = [
        ("batch 1, length 2", (np.zeros((1, 2), np.float32),)),
        ("batch 3, length 5", (np.ones((3, 5), np.float32),)),
    ]

    def reference(x):
        return 2 * x

    def close(x):
        return 2 * x + (x > 0) * PARITY_TOLERANCE / 2

    assert check_parity(reference, close, batches, path) == pytest.approx(PARITY_TOLERANCE / 2)
    with pytest.raises(ExportError) as caught:
        check_parity(reference, lambda x: 2 * x + (x > 0) * 1e-3, batches, path)
    assert str(caught.value) == (
        f"{path}: onnxruntime differs from PyTorch by 1.00e-03 at batch 3, length 5 "
        "(tolerance 1e-04)"
    )
    with pytest.raises(ExportError, match=r"output shape \(1, 1\), PyTorch gives \(1, 2\)"):
        check_parity(reference, lambda x: x[:, :1], batches, path)


def test_export_fails_when_onnx_does_not_match_pytorch(trained_run, tmp_path):
    model = trained_run.model
    path = tmp_path / "encoder.onnx"
    export_user_encoder(model, path)
    assert check_encoder_parity(model, path) <= 1e-4
    changed = type(model)(model.config)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.ln_f.bias.add_(0.5)
    changed.eval()
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_encoder_parity(changed, path)


def test_bundle_round_trip_serves_what_the_model_computes(exported_bundle, trained_run, tiny_data):
    models_dir, path = exported_bundle
    bundle = load_bundle(models_dir, device="cpu")
    assert bundle.name == "tiny" and bundle.path == path.resolve()
    manifest = read_manifest(path)
    entry = manifest["retrievers"]["sasrec"]
    assert entry["index"]["recall@10"] == 1.0  # exact index on a small catalogue
    assert entry["onnx_parity_max_abs_diff"] <= 1e-4
    assert manifest["dataset"]["items"] == tiny_data.n_items
    assert set(manifest["files"]) >= {"items.parquet", "retrievers/sasrec/user_encoder.onnx"}

    retriever = bundle.retrievers["sasrec"]
    ids = np.array([[0, 0, 4, 9, 2]], dtype=np.int64)
    deltas = np.array([[0, 0, 0, 50, 7000]], dtype=np.float32)
    with torch.no_grad():
        expected = trained_run.model.encode_user(torch.from_numpy(ids), torch.from_numpy(deltas))
    np.testing.assert_allclose(retriever.encoder.encode(ids, deltas), expected.numpy(), atol=1e-5)
    vectors = trained_run.model.all_item_embeddings().detach().numpy()
    np.testing.assert_allclose(retriever.item_vectors[1:], vectors[1:], atol=0)
    assert bundle.catalogue.raw_ids.tolist() == tiny_data.item_map.raw.tolist()


def test_batch_recommendations_equal_the_offline_ranking(
    exported_bundle, trained_run, tiny_data, tmp_path
):
    import pyarrow.parquet as pq

    models_dir, _ = exported_bundle
    bundle = load_bundle(models_dir, device="cpu")
    out = tmp_path / "recs.parquet"
    stats = batch_recommend(bundle, tiny_data, out, k=10, history="test")
    recs = pq.read_table(out).to_pydict()
    assert stats["users"] == len(tiny_data.eval_users())

    users, history_end, _ = tiny_data.eval_examples("test")
    model = trained_run.model
    scores = ranked_scores(model_scorer(model), tiny_data, users, history_end, model.max_len)
    offline = torch.topk(scores, 10, dim=1).indices.numpy()
    served: dict[str, list[str]] = {}
    for user, item in zip(recs["user"], recs["item"], strict=True):
        served.setdefault(user, []).append(item)
    for row, user in enumerate(users):
        raw_user = tiny_data.user_map.raw[user + 1]
        assert served[raw_user] == tiny_data.item_map.raw[offline[row]].tolist()


def test_failed_export_leaves_no_bundle_behind(tiny_data, trained_run, tmp_path, monkeypatch):
    import training.export as export

    def broken(*args, **kwargs):
        raise ExportError("simulated")

    monkeypatch.setattr(export, "check_encoder_parity", broken)
    with pytest.raises(ExportError):
        export.export_bundle([trained_run.checkpoint], tiny_data, tmp_path, name="broken")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_for_other_items_is_not_exported(trained_run, tmp_path):
    from training.data import build_sequences
    from training.export import export_bundle
    from training.synthetic import SyntheticConfig, generate

    other = build_sequences(generate(SyntheticConfig(users=50, items=40, seed=9)))
    with pytest.raises(CheckpointError, match="other items"):
        export_bundle([trained_run.checkpoint], other, tmp_path, name="x")


def test_manifest_is_plain_json_with_offline_metrics(exported_bundle):
    _, path = exported_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    metrics = manifest["retrievers"]["sasrec"]["offline_metrics"]
    assert {"model", "popularity"} <= set(metrics)
    assert manifest["perf_only"] is False


def test_index_is_chosen_for_where_the_service_will_search(
    tiny_data, trained_run, tmp_path, monkeypatch
):
    import training.export as export
    from service.devices import faiss_gpus
    from service.errors import DeviceError

    # A GPU index asked for where faiss sees no GPU fails before anything is written.
    monkeypatch.setattr(export, "faiss_gpus", lambda device: faiss_gpus(device, count=0))
    with pytest.raises(DeviceError, match="faiss sees no GPU"):
        export.export_bundle([trained_run.checkpoint], tiny_data, tmp_path, index_device="gpu")
    assert list(tmp_path.iterdir()) == []

    asked = []
    spec_for = export.index_spec_for
    monkeypatch.setattr(export, "faiss_gpus", lambda device: faiss_gpus(device, count=1))
    monkeypatch.setattr(
        export, "index_spec_for", lambda *args, gpu: asked.append(gpu) or spec_for(*args, gpu=gpu)
    )
    for device in ("auto", "cpu"):
        export.export_bundle(
            [trained_run.checkpoint],
            tiny_data,
            tmp_path,
            name=device,
            index_device=device,
            cold_start=None,  # the index is the point here, not the metadata encoder
        )
    assert asked == [True, False]  # auto takes the GPU faiss sees; cpu never does


@pytest.mark.slow
def test_a_ctr_head_export_records_the_gate_decided_on_held_out_validation_users(
    tiny_data, trained_run, tmp_path
):
    from training.ctr import CtrConfig, prepare_ctr_data
    from training.export import export_bundle
    from training.rerank_gate import GateConfig

    config = CtrConfig(candidates=30, epochs=2, encode_batch=128)
    path = export_bundle(
        [trained_run.checkpoint],
        tiny_data,
        tmp_path,
        name="gated",
        ctr=config,
        gate=GateConfig(resamples=300, seed=5),
    )
    head = read_manifest(path)["retrievers"]["sasrec"]["ctr_head"]
    gate = head["gate"]
    # Decided on the held-out users' valid events at the head's depth, never on the test.
    held_out = prepare_ctr_data(tiny_data, path, config).holdout_users
    assert gate["split"] == "valid" and gate["validation_users"] == len(held_out)
    assert gate["depth"] == 30 and gate["resamples"] == 300 and gate["seed"] == 5
    assert gate["delta"] == pytest.approx(gate["ndcg_reranked"] - gate["ndcg_retrieval"])
    low, high = gate["ci"]
    assert low <= gate["delta"] <= high
    assert gate["rerank_by_default"] is (low > 0) and gate["decided_by"] == "gate"
    assert gate["reason"]
    # The test split's difference beside it, to check the decision against.
    quality = head["rerank_quality"]
    assert quality["delta"] == pytest.approx(
        quality["reranked"]["ndcg@10"] - quality["retrieval"]["ndcg@10"]
    )
    assert quality["ci"][0] <= quality["delta"] <= quality["ci"][1]
    # The service reads the decision.
    retriever = load_bundle(tmp_path, "gated", device="cpu", models=False).retrievers["sasrec"]
    assert retriever.rerank_default is gate["rerank_by_default"]
    assert retriever.rerank_reason == gate["reason"]
    # The benchmark's table is read from this record.
    from bench.rerank_gate import gate_rows, test_by_users

    (row,) = gate_rows(path)
    assert row["test_delta"] == quality["delta"] and row["valid_delta"] == gate["delta"]
    helped = quality["delta"] > 0
    assert row["verdict"].startswith("right" if gate["rerank_by_default"] == helped else "wrong")
    # Its diagnostic draws the gate's users again, and the rest, from the same data.
    split = test_by_users(path, "synthetic:users=300,items=120,mean_length=20,seed=1")
    assert split["held_out"]["users"] == gate["validation_users"]
    assert split["held_out"]["users"] + split["trained_on"]["users"] == quality["users"]
