"""Which events an epoch trains on: the window modes of ``training.trainer.epoch_windows``.

The data gives every event its own item, so an item id names one event and the batches'
targets can be traced back to the events they are.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.__main__ import _parser as cli_parser
from training.cli_options import train_config
from training.data import Interactions, build_sequences
from training.errors import ConfigError
from training.trainer import TrainConfig, batches, epoch_windows, train

# Training targets per user: 1 (two events, too few to evaluate: both train), then
# events - 2 held out - 1 first: 1, 2, 3, 5, 11, 30.
LENGTHS = (2, 4, 5, 6, 8, 14, 33)
MAX_LEN = 4


@pytest.fixture(scope="module")
def unique_events():
    """Users of LENGTHS events, each event with an item of its own (``u{user}e{index}``)."""
    rows = [
        (f"u{user}", f"u{user}e{index}", 100 * index)
        for user, length in enumerate(LENGTHS)
        for index in range(length)
    ]
    users, items, stamps = zip(*rows, strict=True)
    return build_sequences(
        Interactions(np.asarray(users), np.asarray(items), np.asarray(stamps, dtype=np.int64))
    )


def event_of(data, item_id: int) -> tuple[int, int]:
    """(user, index in the user's history) of the one event that has ``item_id``."""
    user, index = data.item_map.raw[item_id].removeprefix("u").split("e")
    return int(user), int(index)


def training_targets(data) -> Counter:
    """Every event a model may learn to predict: each user's training events but the first."""
    ends = data.train_end()
    return Counter(
        (user, index)
        for user in range(data.n_users)
        for index in range(1, ends[user] - data.offsets[user])
    )


def scored_targets(data, windows, max_len: int = MAX_LEN) -> tuple[Counter, list]:
    """The events the batches of ``windows`` score, counted, and per row (inputs, targets)
    as events (padding left out)."""
    counted, rows = Counter(), []
    for inputs, _, targets in batches(
        data,
        windows.starts,
        windows.ends,
        max_len,
        batch_size=3,
        rng=np.random.default_rng(0),
        first_targets=windows.first_targets,
    ):
        for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
            events = [event_of(data, i) if i else None for i in row_targets]
            counted.update(e for e in events if e)
            rows.append(([event_of(data, i) for i in row_inputs if i], events))
    return counted, rows


@pytest.mark.parametrize("stride", [0, 1, 3])
def test_sliding_windows_make_every_training_event_a_target_exactly_once(unique_events, stride):
    windows = epoch_windows(unique_events, "sliding", MAX_LEN, np.random.default_rng(0), stride)
    counted, rows = scored_targets(unique_events, windows)
    assert counted == training_targets(unique_events)  # each once, none missing, no other
    assert windows.targets() == sum(counted.values())
    for inputs, targets in rows:
        user = inputs[-1][0]
        # Inputs are consecutive events of one user, the newest just before the last target.
        assert inputs == [(user, i) for i in range(inputs[0][1], inputs[0][1] + len(inputs))]
        assert len(inputs) <= MAX_LEN
        scored = [t for t in targets if t]
        assert scored[-1] == (user, inputs[-1][1] + 1)
        # A window reads every event it may before its targets: max_len, or all there are.
        assert len(inputs) == min(MAX_LEN, inputs[-1][1] + 1)
        assert len(scored) <= (stride or MAX_LEN)


def test_sliding_windows_below_max_len_read_earlier_events_as_context(unique_events):
    windows = epoch_windows(unique_events, "sliding", MAX_LEN, np.random.default_rng(0), 1)
    _, rows = scored_targets(unique_events, windows)
    long_user = len(LENGTHS) - 1
    row = next(r for r in rows if r[0][-1] == (long_user, 20))
    # Stride 1: four events read, only the newest transition (20 -> 21) scored.
    assert row[0] == [(long_user, i) for i in range(17, 21)]
    assert [t for t in row[1] if t] == [(long_user, 21)]


def test_last_windows_score_only_the_newest_max_len_events(unique_events):
    windows = epoch_windows(unique_events, "last", MAX_LEN, np.random.default_rng(0))
    counted, _ = scored_targets(unique_events, windows)
    ends = unique_events.train_end() - unique_events.offsets[:-1]
    expected = Counter(
        (user, index)
        for user in range(unique_events.n_users)
        for index in range(max(1, ends[user] - MAX_LEN), ends[user])
    )
    assert counted == expected
    assert sum(counted.values()) < sum(training_targets(unique_events).values())


def test_crop_windows_are_seeded_and_stay_within_the_training_events(unique_events):
    def draw(seed: int, epochs: int = 200) -> list:
        rng = np.random.default_rng(seed)
        return [epoch_windows(unique_events, "crop", MAX_LEN, rng) for _ in range(epochs)]

    first, again, other = draw(1), draw(1), draw(2)
    ends = lambda epochs: [w.ends.tolist() for w in epochs]  # noqa: E731
    assert ends(first) == ends(again)
    assert ends(first) != ends(other)
    assert len({tuple(e) for e in ends(first)}) > 1  # a new crop each epoch

    starts, train_ends = unique_events.offsets[:-1], unique_events.train_end()
    covered = Counter()
    for windows in first:
        counted, rows = scored_targets(unique_events, windows)
        # One window per user with a transition, MAX_LEN consecutive targets or all it has.
        assert len(windows) == len(LENGTHS)
        assert np.all(windows.ends <= train_ends[train_ends - starts >= 2])
        for inputs, targets in rows:
            scored = [t for t in targets if t]
            user, index = scored[0]
            history = train_ends[user] - starts[user] - 1
            assert scored == [(user, i) for i in range(index, index + len(scored))]
            assert len(scored) == min(MAX_LEN, history)
            assert inputs == [(user, i - 1) for i in range(index, index + len(scored))]
        covered.update(counted)
    # Over the epochs the crops reach events the last window never scores (the oldest and
    # newest events of a long history are each in 1 of its 27 placements here).
    assert set(covered) == set(training_targets(unique_events))


@pytest.mark.parametrize("mode", ["last", "crop", "sliding"])
def test_short_histories_are_one_whole_window_in_every_mode(unique_events, mode):
    windows = epoch_windows(unique_events, mode, 64, np.random.default_rng(3))
    counted, rows = scored_targets(unique_events, windows, max_len=64)
    assert counted == training_targets(unique_events)
    assert len(rows) == len(LENGTHS)


def test_an_unknown_window_mode_or_stride_is_refused_naming_the_option():
    refusal = r"\(--windows\) must be one of last, crop, sliding, not 'random'"
    with pytest.raises(ConfigError, match=refusal):
        TrainConfig(windows="random")
    with pytest.raises(ConfigError, match="--window-stride"):
        TrainConfig(windows="sliding", window_stride=-1)


def test_sequential_encoders_default_to_sliding_windows_and_two_tower_to_the_last():
    assert TrainConfig(model="sasrec").windows == "sliding"
    assert TrainConfig(model="nextitnet").windows == "sliding"
    assert TrainConfig(model="two_tower").windows == "last"
    assert TrainConfig(model="two_tower", windows="crop").windows == "crop"


def test_the_cli_sets_the_window_mode_and_refuses_an_unknown_one(capsys):
    argv = ["train", "--data", "synthetic", "--out", "run"]
    config = train_config(cli_parser().parse_args([*argv, "--windows", "last"]))
    assert (config.windows, config.window_stride) == ("last", 0)
    config = train_config(cli_parser().parse_args([*argv, "--model", "two_tower"]))
    assert config.windows == "last"
    config = train_config(cli_parser().parse_args([*argv, "--window-stride", "5"]))
    assert config.window_stride == 5
    with pytest.raises(SystemExit):
        cli_parser().parse_args([*argv, "--windows", "every"])
    assert "--windows: invalid choice: 'every'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["crop", "sliding"])
def test_training_runs_with_each_window_mode(tiny_data, tmp_path, mode):
    config = TrainConfig(
        epochs=1, windows=mode, window_stride=4, model_options={"max_len": 8, "dim": 16}
    )
    report = train(tiny_data, config, tmp_path).report
    assert report["train_config"]["windows"] == mode
    assert np.isfinite(report["history"][0]["loss"])
