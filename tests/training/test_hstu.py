"""The HSTU-kind encoder: causality, the relative time bias, and a bundle the service serves.

The interface tests every encoder shares (loss falls, left padding, no peeking at the
next item) run it through ``ENCODER_KINDS`` in test_models.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from service.bundle import load_bundle, read_manifest
from service.recommender import Recommender
from training.models import build_encoder
from training.models.base import log2_buckets
from training.models.hstu import pair_time_buckets

IDS = torch.tensor([[0, 0, 3, 7, 9, 4, 11, 2]])
DELTAS = torch.tensor([[0.0, 0.0, 5.0, 60.0, 3600.0, 86400.0, 7.0, 1e6]])


def hstu(**options):
    torch.manual_seed(0)
    return build_encoder("hstu", 30, max_len=12, dim=16, **options).eval()


def states(model, ids, deltas):
    with torch.no_grad():
        return model.hidden_states(ids, deltas)


def test_a_state_depends_on_no_later_event_nor_its_time():
    model = hstu()
    base = states(model, IDS, DELTAS)
    for cut in range(3, IDS.shape[1]):
        ids, deltas = IDS.clone(), DELTAS.clone()
        ids[0, cut:] = 29
        deltas[0, cut:] = 1e7
        changed = states(model, ids, deltas)
        torch.testing.assert_close(changed[:, :cut], base[:, :cut])
        assert not torch.allclose(changed[:, cut], base[:, cut])


def test_pair_buckets_are_log2_buckets_of_the_time_between_two_events():
    times = torch.tensor([[100.0, 105.0, 165.0, 3765.0, 90165.0]])
    deltas = torch.cat([torch.tensor([[40.0]]), times.diff(dim=1)], dim=1)
    expected = log2_buckets((times[:, :, None] - times[:, None, :]).abs(), 32)
    assert torch.equal(pair_time_buckets(deltas, 32), expected)
    # Left padding (gap 0) and the first event's gap to the one before the window change
    # nothing: only differences within the window count.
    padded = torch.cat([torch.zeros(1, 3), deltas], dim=1)
    padded[0, 3] = 1e9
    assert torch.equal(pair_time_buckets(padded, 32)[:, 3:, 3:], expected)
    # One second apart at the far end of a long span: float32 could not tell them apart.
    far = torch.tensor([[0.0, 3e8, 1.0]])
    assert pair_time_buckets(far, 32)[0, 2, 1].item() == 2  # floor(log2(1 + 1)) + 1


def test_timestamps_reach_the_output_only_through_the_time_bias():
    model = hstu()
    other = DELTAS * 37.0
    assert not torch.allclose(states(model, IDS, DELTAS), states(model, IDS, other))
    # A time bias equal in every bucket is a constant: the times no longer matter.
    with torch.no_grad():
        for layer in model.layers:
            layer.time_bias.weight.fill_(0.3)
    torch.testing.assert_close(states(model, IDS, DELTAS), states(model, IDS, other))
    untimed = hstu(use_time=False)
    assert all(layer.time_bias is None for layer in untimed.layers)
    torch.testing.assert_close(states(untimed, IDS, DELTAS), states(untimed, IDS, other))


def test_attention_is_scaled_by_max_len_not_by_the_batch_length():
    # The served batch is as wide as its longest history; a short history's embedding
    # must not depend on its neighbours' lengths.
    model = hstu()
    ids, deltas = IDS[:, 4:], DELTAS[:, 4:]
    with torch.no_grad():
        alone = model.encode_user(ids, deltas)
        batched = model.encode_user(
            torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1).repeat(2, 1),
            torch.cat([torch.zeros(1, 4), deltas], dim=1).repeat(2, 1),
        )
    torch.testing.assert_close(batched, alone.repeat(2, 1), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def hstu_bundle(tiny_data, tmp_path_factory):
    """A bundle of an HSTU-kind checkpoint trained briefly on ``tiny_data``, exported
    through the project's export path (ONNX parity checked there)."""
    from training.export import export_bundle
    from training.trainer import TrainConfig, train

    config = TrainConfig(model="hstu", epochs=1, lr=3e-3, model_options={"max_len": 16, "dim": 16})
    run = train(tiny_data, config, tmp_path_factory.mktemp("hstu-run"))
    models_dir = tmp_path_factory.mktemp("hstu-models")
    export_bundle([run.checkpoint], tiny_data, models_dir, name="hstu")
    return models_dir, run.model


def test_an_hstu_bundle_serves_what_the_model_computes(hstu_bundle, tiny_data):
    models_dir, model = hstu_bundle
    manifest = read_manifest(models_dir / "hstu")
    assert manifest["default_encoder"] == "hstu"
    assert manifest["retrievers"]["hstu"]["onnx_parity_max_abs_diff"] <= 1e-4
    bundle = load_bundle(models_dir, device="cpu")
    # Whole seconds at powers of two (2**k - 1 + 1): where a float log2 in the graph put
    # pairs in the bucket below PyTorch's.
    raw = [str(r) for r in tiny_data.item_map.raw[[4, 9, 2, 17, 5]]]
    times = np.cumsum([1_600_000_000, 1023, 1, 65535, 3]).tolist()
    events = list(zip(raw, times, strict=True))

    answer = asyncio.run(
        Recommender(bundle).recommend(events, k=10, rerank=False, exclude_seen=True)
    )

    ids = torch.tensor([[4, 9, 2, 17, 5]])
    deltas = torch.tensor([[0.0, 1023.0, 1.0, 65535.0, 3.0]])
    with torch.no_grad():
        user = model.encode_user(ids, deltas)
        scores = (user @ model.all_item_embeddings().T)[0]
    served = bundle.retrievers["hstu"].encoder.encode(ids.numpy(), deltas.numpy())
    np.testing.assert_allclose(served, user.numpy(), atol=1e-5)
    scores[0] = -np.inf
    scores[ids[0]] = -np.inf
    expected = tiny_data.item_map.raw[torch.topk(scores, 10).indices.numpy()].tolist()
    assert [item["item_id"] for item in answer.items] == [str(e) for e in expected]
