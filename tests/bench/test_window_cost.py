"""bench/window_cost.py on tiny synthetic data: the counts it reports are the windows'."""

from __future__ import annotations

import json

from bench.window_cost import main


def test_sliding_scores_every_transition_and_last_only_the_newest(capsys):
    argv = ["--data", "synthetic:users=40,items=30,seed=2", "--max-len", "6", "--dim", "8"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["mode"]: row for row in report["rows"]}
    assert set(rows) == {"last", "crop", "sliding"}
    assert rows["last"]["windows"] == rows["crop"]["windows"] == 40  # one per user
    assert rows["last"]["targets"] == rows["crop"]["targets"] <= 40 * 6
    assert rows["sliding"]["targets"] > rows["last"]["targets"]
    assert rows["sliding"]["windows"] > 40
    for row in rows.values():
        assert row["targets"] <= row["positions"] and row["cpu_seconds"] > 0


def test_length_buckets_hold_the_same_targets_in_fewer_positions(capsys):
    argv = ["--data", "synthetic:users=60,items=30,seed=3", "--max-len", "20", "--dim", "8"]
    argv += ["--modes", "sliding", "--batch-size", "8", "--length-buckets", "0", "4"]
    assert main(argv) == 0
    plain, bucketed = json.loads(capsys.readouterr().out)["rows"]
    assert (plain["length_buckets"], bucketed["length_buckets"]) == (0, 4)
    assert plain["windows"] == bucketed["windows"] and plain["targets"] == bucketed["targets"]
    assert bucketed["positions"] < plain["positions"]
