"""bench/ccl_diagnostics.py: one epoch on a small synthetic log, every figure recorded."""

from __future__ import annotations

import json
import math

from bench import ccl_diagnostics


def test_the_diagnostics_record_geometry_and_gradients_per_epoch(tmp_path):
    out = tmp_path / "diag.json"
    argv = ["--data", "synthetic:users=200,items=80", "--model", "sasrec", "--loss", "ccl"]
    assert ccl_diagnostics.main([*argv, "--epochs", "2", "--threads", "1", "--out", str(out)]) == 0
    history = json.loads(out.read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        for name in ("cos_states", "cos_items", "active", "grad_items_in", "grad_items_out"):
            assert math.isfinite(row[name]), name
        assert 0.0 <= row["active"] <= 1.0
        assert -1.0 <= row["cos_states"] <= 1.0


def test_the_diagnostics_record_the_cross_batch_memory(tmp_path):
    out = tmp_path / "diag.json"
    argv = ["--data", "synthetic:users=200,items=80", "--model", "sasrec"]
    argv += ["--loss", "cbns_softmax", "--loss-option", "warmup_steps=1", "--probe-every", "1"]
    assert ccl_diagnostics.main([*argv, "--epochs", "2", "--threads", "1", "--out", str(out)]) == 0
    history = json.loads(out.read_text())["history"]
    for row in history:
        assert 0.0 < row["memory_share"] < 1.0  # the memory takes part after one step
        assert row["memory_drift"] > 0.0  # stored vectors lag the table being trained
    refreshed = tmp_path / "refreshed.json"
    argv += ["--loss-option", "refresh=true"]
    ccl_diagnostics.main([*argv, "--epochs", "1", "--threads", "1", "--out", str(refreshed)])
    assert json.loads(refreshed.read_text())["history"][0]["memory_drift"] == 0.0
