"""bench/history_memory.py runs end to end on tiny sizes, against a private redis-server."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.history_memory import main

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server not installed"
)


def test_the_history_bench_measures_both_layouts(tmp_path, capsys):
    out = tmp_path / "history.json"
    argv = ["--users", "4", "--items", "50", "--ops", "20", "--rounds", "2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    memory = result["memory"]
    for size in (20, 200):
        old, new = memory[f"old-{size}"], memory[f"new-{size}"]
        assert new["bytes_per_user_median"] < old["bytes_per_user_median"]
    assert memory["new-200"]["bytes_per_event"] <= 16
    assert memory["item-dictionary"]["items"] > 0
    assert set(result["latency"]) == {"old", "new", "new, codes not remembered"}
    for row in result["latency"].values():
        assert len(row["rounds"]) == 2 and row["append"]["redis_us"] > 0
    assert result["migration"]["users"] == 4
    assert "| 200 |" in capsys.readouterr().out
