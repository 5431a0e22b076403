"""bench/cold_start.py: the split that keeps held-out items out of training, the histories
the cold model reads, and the whole run on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.cold_start import cold_windows, evaluation_events, hold_out_items, main
from service.histories import left_padded_window
from training.datasets import load_dataset
from training.synthetic import SyntheticConfig, generate


def check_split(interactions, share: float) -> None:
    """Held-out items are absent from the cold log, and the cold model reads each held-out
    target's history as its whole cold sequence (the target was the user's last event)."""
    split = hold_out_items(interactions, share, seed=0)
    full, cold = split.full, split.cold
    held_raw = set(full.item_map.raw[split.held_out].tolist())
    assert len(split.held_out) == round(share * full.n_items)
    assert held_raw.isdisjoint(cold.item_map.raw.tolist())
    assert len(cold.items) == len(full.items) - np.isin(full.items, split.held_out).sum()
    known = split.to_cold > 0
    assert not known[split.held_out].any() and known.sum() == cold.n_items
    np.testing.assert_array_equal(cold.item_map.raw[split.to_cold[known]], full.item_map.raw[known])

    held_events, other_events = evaluation_events(split)
    assert np.isin(held_events.targets, split.held_out).all()
    assert not np.isin(other_events.targets, split.held_out).any()
    assert len(held_events.users) + len(other_events.users) == len(full.eval_users())
    ids, deltas = cold_windows(split, held_events, max_len=8)
    cold_index = {raw: i - 1 for i, raw in enumerate(cold.user_map.raw.tolist()) if i}
    cold_users = np.array([cold_index[full.user_map.raw[u + 1]] for u in held_events.users])
    expected = left_padded_window(
        cold.items, cold.timestamps, cold.offsets[cold_users], cold.offsets[cold_users + 1], 8
    )
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(deltas, expected[1])


def test_held_out_items_never_reach_the_cold_log_nor_the_histories_it_reads():
    check_split(generate(SyntheticConfig(users=300, items=120, mean_length=20, seed=1)), 0.1)


@pytest.mark.realdata
def test_the_movielens_split_keeps_held_out_items_out_of_training(real_data):
    check_split(load_dataset(f"ml-1m:{real_data('ml-1m')}"), 0.1)


@pytest.mark.slow
def test_the_bench_ranks_every_variant_on_tiny_data(tmp_path, capsys):
    results, chart = tmp_path / "cold_start.json", tmp_path / "cold_start.png"
    argv = [
        "--data", "synthetic:users=200,items=80,mean_length=15,seed=4", "--epochs", "1",
        "--max-len", "8", "--dim", "8", "--threads", "1", "--run-dir", str(tmp_path / "runs"),
        "--results", str(results), "--plot", str(chart),
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(results.read_text())
    rows = result["held_out_target_events"]
    assert set(rows) == {
        "metadata encoder",
        "(a) random vectors",
        "genre neighbours' mean vector",
        "(b) content only: genre overlap",
        "(c) full model, items trained",
        "(c') metadata encoder fitted with the items present",
    }
    assert result["held_out_items"] == 8
    assert {row["events"] for row in rows.values()} == {rows["metadata encoder"]["events"]}
    assert result["share_of_upper_bound"]["(c) full model, items trained"]["ndcg@10"] == 1.0
    assert "no held-out items in the catalogue" in result["other_test_events"]
    at_one = [p for p in result["exposure_sweep"] if p["scale"] == 1.0]
    assert [p["held_out_targets"] for p in at_one] == [rows[p["vectors"]] for p in at_one]
    assert chart.stat().st_size > 0
    assert "| metadata encoder |" in capsys.readouterr().out

    # Both checkpoints are reused; the table is redrawn from the results alone.
    assert main([*argv, "--from-json", str(results)]) == 0


def test_the_settings_search_reports_one_row_per_setting(trained_run, capsys):
    from bench.cold_start_settings import main as search

    data = "synthetic:users=300,items=120,mean_length=20,seed=1"  # tests/conftest.py's tiny_data
    argv = ["--data", data, "--checkpoint", str(trained_run.checkpoint), "--set", ""]
    assert search([*argv, "--set", "hidden=16,epochs=2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| defaults", "| hidden=16,epochs=2"]
