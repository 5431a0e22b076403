"""The encoder reading a batch in groups of windows of similar width (``--width-groups``):
the same states, loss and gradients as one pass over the batch, less padding computed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.test_augment import N_ITEMS, augmenter, random_windows
from training.__main__ import _parser as cli_parser
from training.cli_options import train_config
from training.errors import ConfigError
from training.losses import build_objective
from training.models import build_encoder
from training.models.base import width_groups
from training.trainer import TrainConfig, sequence_loss, train

ENCODERS = ("sasrec", "nextitnet", "hstu", "two_tower")


def next_items(ids: torch.Tensor) -> torch.Tensor:
    """Targets for left-padded windows: each event's successor (any item), none after the
    last and none at padding, so rows score different numbers of positions."""
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = (ids[:, -1] % N_ITEMS) + 1
    return torch.where(ids > 0, targets, 0)


def assert_same_loss_and_gradients(model, loss_of, groupings: tuple[int, ...]) -> None:
    """``loss_of(groups)`` and every parameter's gradient equal for each of ``groupings``
    (the first the reference)."""
    results = []
    for groups in groupings:
        model.zero_grad()
        loss = loss_of(groups)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (one_loss, one_grads), *grouped = results
    assert one_grads
    for grouped_loss, grouped_grads in grouped:
        assert grouped_loss == pytest.approx(one_loss, rel=1e-5)
        assert one_grads.keys() == grouped_grads.keys()
        for name, grad in one_grads.items():
            torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_width_groups_hold_every_row_once_narrowest_first():
    ids, _ = random_windows(rows=50, width=12, seed=3)
    widths = (ids > 0).sum(1)
    groups = width_groups(ids, 4)
    assert len(groups) == 4
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(50))
    for rows, width in groups:
        assert width == int(widths[rows].max())
    for (_, width), (later, _) in zip(groups, groups[1:], strict=False):
        assert width <= int(widths[later].min())
    assert width_groups(ids, 1) == [(None, 12)]
    assert len(width_groups(ids[:3], 8)) == 3  # never more groups than rows


@pytest.mark.parametrize("encoder", ENCODERS)
def test_grouped_reading_gives_the_one_pass_loss_and_gradients(encoder):
    torch.manual_seed(0)
    model = build_encoder(encoder, N_ITEMS, max_len=12, dim=16).eval()  # no dropout draws
    objective = build_objective("full_softmax", np.ones(N_ITEMS + 1))
    ids, deltas = random_windows(rows=40, width=12, seed=1)
    ids[:2] = 0  # rows of padding alone: a group of width 0 is read at width 1
    targets = next_items(ids)
    assert_same_loss_and_gradients(
        model,
        lambda groups: sequence_loss(model, objective, ids, deltas, targets, groups=groups),
        (1, 3, 45),  # 45: more groups than rows
    )


def test_last_states_come_back_in_row_order():
    model = build_encoder("sasrec", N_ITEMS, max_len=12, dim=16).eval()
    ids, deltas = random_windows(rows=30, width=12, seed=2)
    with torch.no_grad():
        expected = model.hidden_states(ids, deltas)[:, -1]
        torch.testing.assert_close(model.last_states(ids, deltas, 5), expected)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_the_contrastive_term_and_its_gradients_are_the_same_read_in_groups(encoder):
    torch.manual_seed(0)
    model = build_encoder(encoder, N_ITEMS, max_len=12, dim=16).eval()
    ids, deltas = random_windows(rows=32, width=12, seed=4)
    cpu = torch.device("cpu")
    # Augmenters of one seed draw the same views.
    assert_same_loss_and_gradients(
        model,
        lambda groups: augmenter(seed=5).loss(model, ids, deltas, cpu, groups=groups),
        (1, 4),
    )


def test_width_groups_are_a_setting_of_training_and_its_cli(tiny_data, tmp_path):
    for wrong in (0, -1, True, 2.5):
        with pytest.raises(ConfigError, match=r"\(--width-groups\) must be a positive count"):
            TrainConfig(width_groups=wrong)
    argv = ["train", "--data", "synthetic", "--out", "run"]
    assert train_config(cli_parser().parse_args(argv)).width_groups == 1
    config = train_config(cli_parser().parse_args([*argv, "--width-groups", "4"]))
    assert config.width_groups == 4
    config = TrainConfig(
        epochs=1,
        width_groups=3,
        augmentation="ticoserec",
        model_options={"max_len": 8, "dim": 16},
    )
    report = train(tiny_data, config, tmp_path).report
    assert report["train_config"]["width_groups"] == 3
    assert np.isfinite(report["history"][0]["loss"])
