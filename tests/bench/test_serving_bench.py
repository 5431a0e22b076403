import json
import shutil

import pytest

from bench import serving


def test_wrk_text_report_is_parsed():
    text = """Running 1s test @ http://127.0.0.1:1/healthz
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   150.00us  20.00us   1.50ms   90.00%
  Latency Distribution
     50%  140.00us
     90%  180.00us
     99%    1.20ms
  6000 requests in 1.00s, 800.00KB read
Requests/sec:   6000.00
"""
    result = serving.parse_wrk_text(text)
    assert result["requests"] == 6000 and result["duration_us"] == pytest.approx(1e6)
    assert result["p50_ms"] == pytest.approx(0.14) and result["p99_ms"] == pytest.approx(1.2)
    assert result["max_ms"] == pytest.approx(1.5)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed (apt-get install wrk)")
def test_serving_benchmark_runs_against_a_real_server(exported_bundle, tmp_path, monkeypatch):
    import redis

    models_dir, path = exported_bundle
    out = tmp_path / "serving.json"
    monkeypatch.setattr(serving.os, "getpid", lambda: 424242)  # the server's key prefix
    code = serving.main(
        [
            "--models-dir",
            str(models_dir),
            "--bundle",
            path.name,
            "--concurrency",
            "2",
            "--duration",
            "1",
            "--floor-requests",
            "20",
            "--repeat",
            "5",
            "--repeat-share",
            "0.5",
            "--profile",
            str(tmp_path / "profile.txt"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["floor"]["miss_p50_ms"] > 0 and result["floor"]["hit_p50_ms"] > 0
    targets = {run["target"] for run in result["runs"]}
    assert targets == {"/recommend", "/healthz"}
    for run in result["runs"]:
        assert run["requests"] > 0 and run["errors"] == 0 and run["non2xx"] == 0
        assert run["cpu_ms_per_request"] > 0
        # Shared pages count once on the host: proportional memory is at most resident
        # (read a moment apart, so within a margin).
        pss, rss = run["pss_mb_by_role"], run["rss_mb_by_role"]
        for role in ("workers", "compute"):
            assert 0 < pss[role] <= 1.05 * rss[role]
    recommend = [run for run in result["runs"] if run["target"] == "/recommend"]
    assert all(0.0 <= run["cache_hit_share"] <= 1.0 for run in recommend)
    assert all(run["mean_batch"] >= 1.0 for run in recommend)  # requests per batch
    # Both processes were sampled: the worker holding the GIL, and its compute process.
    assert {"worker", "compute"} <= set(result["profile"])
    assert result["profile"]["compute"]["samples"] > 0
    assert (tmp_path / "profile-worker.txt").exists()
    # The cache entries of its random histories do not outlive the benchmark.
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    assert not list(client.scan_iter(match="bench424242:*"))


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed (apt-get install wrk)")
def test_every_run_without_repeats_is_all_cache_misses_and_the_peer_runs_beside(
    exported_bundle, tmp_path, capsys
):
    models_dir, path = exported_bundle
    out = tmp_path / "serving.json"
    argv = ["--models-dir", str(models_dir), "--bundle", path.name, "--concurrency", "1", "2"]
    argv += ["--duration", "1", "--floor-requests", "5", "--out", str(out)]
    argv += ["--peer", "--rerank", "off"]
    assert serving.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["rerank"] == "off" and result["peer_workers"] == 1
    runs = [run for run in result["runs"] if run["target"] == "/recommend"]
    ours = [run for run in runs if not run.get("peer")]
    # The second run does not replay the first one's histories.
    assert [run["cache_hit_share"] for run in ours] == [0.0, 0.0]
    peers = [run for run in runs if run.get("peer")]
    assert [run["concurrency"] for run in peers] == [1, 2]
    for run in peers:
        assert run["requests"] > 0 and run["errors"] == 0 and run["non2xx"] == 0
        assert run["cpu_ms_per_request"] > 0
    assert "| throughput ratio |" in capsys.readouterr().out
