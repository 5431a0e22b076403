import numpy as np
import pytest

from training.data import build_sequences
from training.datasets import synthetic_config
from training.errors import DataSpecError
from training.synthetic import SyntheticConfig, generate


def test_same_seed_gives_same_log_and_other_seed_another():
    a = generate(SyntheticConfig(users=200, items=100, seed=5))
    b = generate(SyntheticConfig(users=200, items=100, seed=5))
    c = generate(SyntheticConfig(users=200, items=100, seed=6))
    assert np.array_equal(a.items, b.items) and np.array_equal(a.timestamps, b.timestamps)
    assert not np.array_equal(a.items[: len(c.items)], c.items[: len(a.items)])


def test_popularity_is_long_tailed():
    log = generate(SyntheticConfig(users=2000, items=1000, seed=0))
    counts = np.sort(np.bincount(log.items)[1:])[::-1]
    share = counts / counts.sum()
    # uniform popularity would give 0.1 and 0.5
    assert share[:100].sum() > 0.25
    assert share[500:].sum() < 0.35


def test_histories_are_ordered_with_mixed_gaps_and_no_repeats():
    data = build_sequences(generate(SyntheticConfig(users=300, items=200, seed=2)))
    gaps = []
    for u in range(data.n_users):
        span = slice(data.offsets[u], data.offsets[u + 1])
        assert len(set(data.items[span].tolist())) == data.offsets[u + 1] - data.offsets[u]
        gaps.append(np.diff(data.timestamps[span]))
    gaps = np.concatenate(gaps)
    assert (gaps > 0).all()
    # in-session gaps (under an hour) and between-session gaps (over a day) both occur often
    assert (gaps < 3600).mean() > 0.3 and (gaps > 86400).mean() > 0.1


def test_next_item_is_predictable_from_the_previous_one():
    # The most frequent successor of an item predicts the next item far better than popularity.
    data = build_sequences(generate(SyntheticConfig(users=3000, items=300, seed=3)))
    prev, nxt = [], []
    for u in range(data.n_users):
        seq = data.items[data.offsets[u] : data.offsets[u + 1]]
        prev.append(seq[:-1])
        nxt.append(seq[1:])
    prev, nxt = np.concatenate(prev), np.concatenate(nxt)
    pairs = np.zeros((data.n_items + 1, data.n_items + 1), dtype=np.int64)
    np.add.at(pairs, (prev, nxt), 1)
    transition_hit = (pairs.argmax(axis=1)[prev] == nxt).mean()
    popularity_hit = (nxt == np.bincount(nxt).argmax()).mean()
    assert transition_hit > 5 * popularity_hit


@pytest.mark.slow
def test_generator_scales_to_a_million_items():
    log = generate(SyntheticConfig(users=2000, items=1_000_000, mean_length=10, seed=0))
    assert log.items.max() <= 1_000_000
    assert len(np.unique(log.items)) > 10_000


def test_spec_options_are_parsed_and_checked():
    assert synthetic_config("users=10,items=20,seed=3").seed == 3
    assert synthetic_config("mean_length=12.5").mean_length == 12.5
    with pytest.raises(DataSpecError, match="colour"):
        synthetic_config("colour=3")
    with pytest.raises(DataSpecError, match="number"):
        synthetic_config("users=many")
