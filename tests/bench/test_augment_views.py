"""bench/augment_views.py on tiny synthetic data."""

from __future__ import annotations

import json

from bench.augment_views import main
from training.augment import OPERATORS


def test_the_report_gives_each_operators_effect_and_the_cost_of_the_views(tmp_path, capsys):
    out = tmp_path / "views.json"
    argv = ["--data", "synthetic:users=80,items=30,seed=2", "--max-len", "12", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert set(report["operators"]) == set(OPERATORS)
    for name, effect in report["operators"].items():
        assert 0 < effect["changed_share"] <= 1, name
        assert effect["mean_cv_after"] <= effect["mean_cv_before"] + 1e-9, name
    assert report["operators"]["insert"]["mean_events_added"] > 0
    assert report["operators"]["crop"]["mean_events_added"] < 0
    assert report["views_seconds_per_epoch"] > 0
