import numpy as np
import pytest
import torch

from training.errors import ConfigError
from training.losses import build_objective
from training.models import build_encoder
from training.models.base import log2_buckets, time_buckets
from training.onnx_export import check_encoder_parity, export_user_encoder
from training.trainer import batches, training_windows

from .helpers import losses_of_steps

ENCODER_KINDS = ["sasrec", "nextitnet", "two_tower", "hstu"]


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_encoder_loss_falls_on_tiny_data(kind, tiny_data):
    torch.manual_seed(0)
    model = build_encoder(kind, tiny_data.n_items, max_len=20, dim=32, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    starts, ends = training_windows(tiny_data)
    batch = next(batches(tiny_data, starts, ends, 20, batch_size=64, rng=np.random.default_rng(0)))
    objective = build_objective("full_softmax", tiny_data.train_item_counts())
    losses = losses_of_steps(model, objective, batch, optimizer, steps=30)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_user_embedding_ignores_extra_left_padding(kind):
    model = build_encoder(kind, 50, max_len=12).eval()
    ids = torch.tensor([[3, 7, 9, 4]])
    deltas = torch.tensor([[0.0, 60.0, 3600.0, 86400.0]])
    padded_ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    padded_deltas = torch.cat([torch.zeros(1, 5), deltas], dim=1)
    with torch.no_grad():
        short = model.encode_user(ids, deltas)
        long = model.encode_user(padded_ids, padded_deltas)
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)
    assert torch.linalg.norm(short, dim=-1).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_states_do_not_see_the_future(kind):
    model = build_encoder(kind, 50, max_len=12).eval()
    ids = torch.tensor([[3, 7, 9, 4, 11]])
    changed = ids.clone()
    changed[0, -1] = 20
    deltas = torch.full((1, 5), 100.0)
    with torch.no_grad():
        a = model.hidden_states(ids, deltas)
        b = model.hidden_states(changed, deltas)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_time_buckets_are_log_spaced_and_zero_for_padding():
    ids = torch.tensor([[0, 1, 1, 1, 1, 1]])
    deltas = torch.tensor([[5.0, 0.0, 1.0, 60.0, 86400.0, 1e12]])
    buckets = time_buckets(deltas, ids, n_buckets=32)
    # padding -> 0; 0 s -> 1; 1 s -> 2; a minute -> 5 + 1; a day -> 16 + 1; huge -> capped at 31
    assert buckets.tolist() == [[0, 1, 2, 6, 17, 31]]
    # floor(log2(gap + 1)) exactly at and just below each power of two, in both precisions
    for dtype in (torch.float32, torch.float64):
        gaps = torch.tensor([2.0**k - 1 for k in range(1, 25)], dtype=dtype)
        assert log2_buckets(gaps, 32).tolist() == list(range(2, 26))
        assert log2_buckets(gaps - 1, 32).tolist() == [1, *range(2, 25)]


def test_unknown_model_options_are_refused():
    with pytest.raises(ConfigError, match="no option"):
        build_encoder("sasrec", 10, heads=3)
    with pytest.raises(ConfigError, match="unknown model"):
        build_encoder("gru4rec", 10)


def test_a_model_option_that_is_not_a_number_where_one_is_due_is_refused():
    with pytest.raises(ConfigError, match=r"sasrec option dim must be a number \(int\)"):
        build_encoder("sasrec", 10, dim="64")
    with pytest.raises(ConfigError, match=r"two_tower option dropout must be a number"):
        build_encoder("two_tower", 10, dropout="none")
    assert build_encoder("nextitnet", 10, dropout=0).config.dropout == 0


# The HSTU-kind's export and parity run through a whole bundle in test_hstu.py.
@pytest.mark.slow
@pytest.mark.parametrize("kind", [kind for kind in ENCODER_KINDS if kind != "hstu"])
def test_encoder_exports_to_onnx_with_dynamic_batch_and_length(kind, tmp_path):
    # check_encoder_parity runs onnxruntime against PyTorch at lengths 1, 7 and max_len (none of
    # them the export example's) with ragged left padding, and raises past 1e-4.
    torch.manual_seed(0)
    model = build_encoder(kind, 40, max_len=12, dim=16).eval()
    path = tmp_path / f"{kind}.onnx"
    export_user_encoder(model, path)
    assert check_encoder_parity(model, path) <= 1e-4
