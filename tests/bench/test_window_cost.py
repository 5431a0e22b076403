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


def test_width_groups_score_the_same_targets_computing_fewer_positions(capsys):
    argv = ["--data", "synthetic:users=60,items=30,seed=3", "--max-len", "20", "--dim", "8"]
    argv += ["--modes", "sliding", "--batch-size", "8", "--width-groups", "1", "4"]
    assert main([*argv, "--augment", "ticoserec"]) == 0
    one_pass, grouped = json.loads(capsys.readouterr().out)["rows"]
    assert one_pass["augmentation"] == grouped["augmentation"] == "ticoserec"
    assert (one_pass["width_groups"], grouped["width_groups"]) == (1, 4)
    assert one_pass["windows"] == grouped["windows"] and one_pass["targets"] == grouped["targets"]
    assert grouped["targets"] <= grouped["positions"] < one_pass["positions"]
