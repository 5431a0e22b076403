"""bench/redis_cluster.py runs end to end on tiny sizes, against its own servers."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.redis_cluster import OPS, SETUPS, main

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server and redis-cli not installed",
)


def test_the_cluster_bench_times_every_call_in_every_setup(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    assert main(["--users", "5", "--ops", "10", "--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    for setup in SETUPS:
        for op in OPS:
            figures = result["summary"][setup][op]
            assert 0 < figures["p50_us"] <= figures["p99_us"]
    assert capsys.readouterr().out.count("\n") == 1 + len(SETUPS)
