"""Time-interval-aware augmentation (training.augment): the operators, the similarity
table, the contrastive term and ``--augment ticoserec`` end to end."""

import json

import numpy as np
import pytest
import torch

from tests.training.test_cli import TINY, one_error_line, train_argv
from training.__main__ import main
from training.augment import (
    OPERATORS,
    TiCoSeRecConfig,
    TimeIntervalAugmentation,
    adjacent_items,
    augment_settings,
    interval_cv,
)
from training.data import Interactions, build_sequences
from training.errors import ConfigError
from training.losses import nt_xent_loss
from training.models import build_encoder
from training.trainer import TrainConfig

N_ITEMS = 30
# Each item's stand-in: the next id, wrapping, so a changed event is visible.
SIMILAR = np.concatenate([[0], np.arange(2, N_ITEMS + 1), [1]])


def augmenter(max_len: int = 12, seed: int = 0, **options) -> TimeIntervalAugmentation:
    return TimeIntervalAugmentation(TiCoSeRecConfig(**options), SIMILAR, max_len, seed)


def random_windows(rows: int = 64, width: int = 12, seed: int = 0):
    """Left-padded windows of 1..width events with gaps mixing seconds, hours and months
    (log-normal) and runs of equal times, as day-granular logs have."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, width + 1, rows)
    ids = rng.integers(1, N_ITEMS + 1, (rows, width))
    gaps = np.round(rng.lognormal(8.0, 3.0, (rows, width)))
    gaps[rng.random((rows, width)) < 0.3] = 0.0
    padding = np.arange(width)[None] < (width - counts)[:, None]
    ids[padding], gaps[padding] = 0, 0.0
    return torch.from_numpy(ids), torch.from_numpy(gaps.astype(np.float32))


def window(items: list[int], times: list[float], width: int):
    """One left-padded row from items and their absolute times (first delta 0)."""
    deltas = [0.0] + [b - a for a, b in zip(times, times[1:], strict=False)]
    pad = width - len(items)
    ids = torch.tensor([[0] * pad + items])
    return ids, torch.tensor([[0.0] * pad + deltas], dtype=torch.float32)


def events(ids: torch.Tensor, deltas: torch.Tensor, row: int = 0):
    """A row's (items, times from its first event) without padding."""
    keep = ids[row] > 0
    items = ids[row][keep].tolist()
    times = torch.cumsum(deltas[row][keep].double(), 0)
    return items, (times - times[0]).tolist()


@pytest.mark.parametrize("operator", OPERATORS)
def test_every_operator_gives_the_same_views_under_the_same_seed(operator):
    ids, deltas = random_windows()
    first = getattr(augmenter(seed=3), operator)(ids, deltas)
    second = getattr(augmenter(seed=3), operator)(ids, deltas)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(
        augmenter(seed=3).views(ids, deltas)[0], augmenter(seed=3).views(ids, deltas)[0]
    )


def test_views_drawn_with_another_seed_differ():
    ids, deltas = random_windows()
    assert not torch.equal(
        augmenter(seed=1).views(ids, deltas)[0], augmenter(seed=2).views(ids, deltas)[0]
    )


@pytest.mark.parametrize("operator", OPERATORS)
def test_no_operator_makes_the_time_intervals_less_even(operator):
    ids, deltas = random_windows(rows=256)
    before = interval_cv(ids, deltas)
    after = interval_cv(*getattr(augmenter(rate=0.3), operator)(ids, deltas))
    assert (after <= before + 1e-9).all()


def test_insert_and_crop_make_uneven_rows_more_even():
    ids, deltas = random_windows(rows=256)
    before = interval_cv(ids, deltas)
    for operator in ("insert", "crop"):
        after = interval_cv(*getattr(augmenter(rate=0.3), operator)(ids, deltas))
        assert (after < before - 1e-6).float().mean() > 0.5, operator


@pytest.mark.parametrize("operator", OPERATORS)
def test_views_stay_within_max_len_and_hold_no_padding_between_events(operator):
    ids, deltas = random_windows(width=10)
    out_ids, out_deltas = getattr(augmenter(max_len=10, rate=0.5), operator)(ids, deltas)
    assert out_ids.shape[1] <= 10 and out_ids.shape == out_deltas.shape
    real = out_ids > 0
    # Left-padded: once a row has an event, every later position has one.
    assert (real[:, 1:] >= real[:, :-1]).all()
    assert (out_deltas[~real] == 0).all() and (out_deltas >= 0).all()
    assert (real.sum(1) >= 1).all()


def test_insert_gives_way_at_the_oldest_end_and_keeps_the_newest_events():
    ids, deltas = window(list(range(1, 9)), [0, 1, 2, 3, 4, 5, 105, 106], width=8)
    out_ids, out_deltas = augmenter(max_len=8, rate=0.1).insert(ids, deltas)
    assert out_ids.shape[1] == 8
    assert out_ids[0].tolist() == [2, 3, 4, 5, 6, SIMILAR[6], 7, 8]
    assert out_deltas[0].tolist() == [1, 1, 1, 1, 1, 50, 50, 1]


def test_insert_puts_the_similar_item_halfway_into_the_largest_interval():
    ids, deltas = window([5, 9, 2, 7, 4], [0, 10, 20, 220, 230], width=8)
    out_ids, out_deltas = augmenter(rate=0.1).insert(ids, deltas)
    items, times = events(out_ids, out_deltas)
    # The largest interval is 20 -> 220, after item 2; its stand-in goes in at 120.
    assert items == [5, 9, 2, SIMILAR[2], 7, 4]
    assert times == [0, 10, 20, 120, 220, 230]


def test_insert_fills_the_largest_intervals_first_when_it_inserts_several():
    ids, deltas = window([1, 2, 3, 4, 5, 6], [0, 900, 910, 920, 1720, 1730], width=10)
    # rate 0.4 of 6 events: two inserts, into 0 -> 900 and 920 -> 1720.
    out_ids, out_deltas = augmenter(rate=0.4).insert(ids, deltas)
    items, times = events(out_ids, out_deltas)
    assert items == [1, SIMILAR[1], 2, 3, 4, SIMILAR[4], 5, 6]
    assert times == [0, 450, 900, 910, 920, 1320, 1720, 1730]


def test_insert_leaves_an_even_sequence_alone():
    # Halving the largest of three near-equal intervals would make them less even.
    ids, deltas = window([1, 2, 3, 4], [0, 100, 200, 301], width=8)
    out_ids, out_deltas = augmenter(rate=0.3).insert(ids, deltas)
    assert events(out_ids, out_deltas) == events(ids, deltas)


def test_replace_swaps_the_event_before_the_largest_interval_and_keeps_times():
    ids, deltas = window([5, 9, 2, 7, 4], [0, 10, 20, 220, 230], width=6)
    out_ids, out_deltas = augmenter(rate=0.1).replace(ids, deltas)
    assert out_ids[0].tolist() == [0, 5, 9, SIMILAR[2], 7, 4]
    assert torch.equal(out_deltas, deltas)


def test_crop_keeps_the_most_even_run():
    # Five events, rate 0.2: one goes; the run without the first (a gap of 1,000 before
    # even steps of 10) is the most even.
    ids, deltas = window([1, 2, 3, 4, 5], [0, 1000, 1010, 1020, 1030], width=6)
    out_ids, out_deltas = augmenter(rate=0.2).crop(ids, deltas)
    assert out_ids[0].tolist() == [0, 0, 2, 3, 4, 5]
    assert out_deltas[0].tolist() == [0, 0, 1000, 10, 10, 10]  # the first keeps its gap


def test_crop_keeps_a_row_whose_runs_are_all_less_even_than_the_whole():
    # Intervals 2, 1, 1, 2 (CV 0.33): both runs of three intervals have CV 0.35.
    ids, deltas = window([1, 2, 3, 4, 5], [0, 2, 3, 4, 6], width=5)
    out_ids, _ = augmenter(rate=0.2).crop(ids, deltas)
    assert torch.equal(out_ids, ids)


def test_reorder_shuffles_only_the_most_even_run_and_keeps_times():
    # Events 2..5 are 10 apart, the rest far apart: the run of 4 (rate 0.5 of 8) is 2..5.
    times = [0, 1000, 1010, 1020, 1030, 5000, 9000, 20000]
    ids, deltas = window([1, 2, 3, 4, 5, 6, 7, 8], times, width=8)
    shuffled = [augmenter(rate=0.5, seed=s).reorder(ids, deltas) for s in range(8)]
    for out_ids, out_deltas in shuffled:
        assert torch.equal(out_deltas, deltas)
        row = out_ids[0].tolist()
        assert row[:1] == [1] and row[5:] == [6, 7, 8] and sorted(row[1:5]) == [2, 3, 4, 5]
    assert any(out[0][0].tolist() != ids[0].tolist() for out in shuffled)


def test_adjacent_items_counts_neighbours_within_a_users_training_events():
    # u1: a b a c (its last two held out: only a -> b counts); u2: a c c b a c (a c, c b,
    # b a, then held out); u3: b c (two events: all training).
    users = ["u1"] * 4 + ["u2"] * 6 + ["u3"] * 2
    items = ["a", "b", "a", "c", "a", "c", "c", "b", "a", "c", "b", "c"]
    stamps = np.arange(len(users))
    data = build_sequences(Interactions(np.array(users), np.array(items), stamps))
    ids = {raw: i for i, raw in enumerate(data.item_map.raw.tolist())}
    table = adjacent_items(data)
    # a: next to b once (u1) and to c once (u2): a tie, to the smaller id. b: a once, c
    # twice (u2, u3). c: a once, b twice. Repeats (c c) do not count.
    assert table[ids["a"]] == ids["b"]
    assert table[ids["b"]] == ids["c"]
    assert table[ids["c"]] == ids["b"]
    assert table[0] == 0


def test_an_item_without_neighbours_stands_for_itself():
    users, items = np.array(["u1", "u1", "u2"]), np.array(["a", "b", "z"])
    data = build_sequences(Interactions(users, items, np.arange(3)))
    z = data.item_map.raw.tolist().index("z")
    assert adjacent_items(data)[z] == z


def test_nt_xent_is_lower_for_matching_views_than_for_mismatched_ones():
    torch.manual_seed(0)
    states = torch.randn(16, 8)
    matching = nt_xent_loss(states, states + 0.01 * torch.randn(16, 8), temperature=0.5)
    mismatched = nt_xent_loss(states, states.roll(1, dims=0), temperature=0.5)
    assert torch.isfinite(matching) and matching < mismatched


@pytest.mark.parametrize("kind", ["sasrec", "nextitnet", "hstu"])
def test_contrastive_term_is_finite_and_its_gradient_reaches_the_encoder(kind):
    torch.manual_seed(0)
    model = build_encoder(kind, N_ITEMS, max_len=12, dim=16)
    ids, deltas = random_windows(rows=16)
    loss = augmenter().loss(model, ids, deltas, torch.device("cpu"))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    layers = [p for name, p in model.named_parameters() if not name.startswith("item_")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers)
    assert model.item_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weight": 0}, "--augment-option weight must be positive"),
        ({"temperature": -1}, "--augment-option temperature must be positive"),
        ({"rate": 1.5}, "--augment-option rate must lie in (0, 1)"),
        ({"p_insert": 0, "p_replace": 0, "p_crop": 0, "p_reorder": 0}, "not all 0"),
        ({"weight": "high"}, "--augment-option weight must be a number"),
        ({"colour": 1}, "ticoserec has no option(s) colour"),
    ],
)
def test_bad_augment_options_are_refused_naming_the_flag(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(augmentation="ticoserec", augment_options=options)


def test_augment_options_without_an_augmentation_are_refused():
    with pytest.raises(ConfigError, match="--augment-option needs --augment ticoserec"):
        TrainConfig(augment_options={"weight": 0.2})
    with pytest.raises(ConfigError, match="--augment"):
        augment_settings("mixup", {})
    assert TrainConfig(augmentation="none").augmentation is None


def test_cli_reports_a_bad_augment_option_as_one_line(tmp_path, capsys):
    argv = [*train_argv(TINY, tmp_path / "run"), "--augment", "ticoserec"]
    assert main([*argv, "--augment-option", "rate=2"]) == 2
    assert "--augment-option rate must lie in (0, 1)" in one_error_line(capsys)


def test_cli_refuses_an_unknown_augmentation_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*train_argv(TINY, tmp_path / "run"), "--augment", "mixup"])
    assert "--augment" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sasrec", "nextitnet", "hstu"])
def test_training_with_augment_runs_end_to_end(kind, tmp_path):
    out = tmp_path / kind
    argv = [*train_argv(TINY, out, epochs=2), "--model", kind, "--augment", "ticoserec"]
    assert main([*argv, "--augment-option", "weight=0.2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["train_config"]["augmentation"] == "ticoserec"
    assert report["train_config"]["augment_options"] == {"weight": 0.2}
    assert all(0 < epoch["augment_seconds"] < epoch["seconds"] for epoch in report["history"])
    for epoch in report["history"]:
        assert np.isfinite(epoch["loss"]) and 0 < epoch["contrastive_loss"] < epoch["loss"]


def test_crop_finds_the_even_run_of_seconds_after_a_gap_of_decades():
    # Float64 running sums of squares (1e18 after the first gap) would lose the 1-3 s gaps.
    times = [0, 1_000_000_000, 1_000_000_001, 1_000_000_004, 1_000_000_005, 1_000_000_006]
    ids, deltas = window([1, 2, 3, 4, 5, 6], times, width=6)
    deltas = deltas.double()  # float32 would round the gaps themselves
    out_ids, _ = augmenter(rate=0.3).crop(ids, deltas)
    # Drop one of six: of the runs 1..5 (a gap of decades) and 2..6 (1, 3, 1, 1 s), the latter.
    assert out_ids[0].tolist() == [0, 2, 3, 4, 5, 6]
