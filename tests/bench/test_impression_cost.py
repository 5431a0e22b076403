"""bench/impression_cost.py on a few hundred impressions against the shared Redis."""

from __future__ import annotations

import json

from bench import impression_cost


def test_the_cost_bench_writes_every_impression_and_cleans_up(shared_redis, tmp_path):
    out = tmp_path / "cost.json"
    assert impression_cost.main(["--impressions", "256", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["record_cpu_us"] > 0
    for batch, calls in (("batch_1", 64), ("batch_32", 8)):
        assert result[batch]["dropped"] == 0
        assert result[batch]["script_calls"] >= calls  # one script per batch, at least
    assert result["memory_bytes"]["attribution_hash"] > 0
    assert not list(shared_redis.scan_iter(match="{impbench*", count=1000))
