"""The encoder latency benchmark runs end to end on a tiny encoder."""

import json

import pytest

from bench.encoder_latency import main


@pytest.mark.slow
def test_latency_is_timed_per_batch_size_after_a_parity_checked_export(tmp_path, capsys):
    results = tmp_path / "latency.json"
    flags = "--model hstu --max-len 8 --dim 16 --layers 1 --heads 1 --rounds 2 --calls 3"
    assert main([*flags.split(), "--results", str(results)]) == 0
    assert "hstu (fresh): exported, parity" in capsys.readouterr().out
    written = json.loads(results.read_text())
    assert written["settings"]["max_len"] == 8 and written["settings"]["onnx_threads"] == 1
    rows = written["results"]
    assert [(row["encoder"], row["batch"]) for row in rows] == [
        ("hstu (fresh)", 1),
        ("hstu (fresh)", 32),
    ]
    for row in rows:
        assert row["calls"] == 6
        assert 0 < row["median_ms"] <= row["p90_ms"]
        assert row["cpu_ms_per_call"] > 0


def test_an_encoder_must_be_named():
    with pytest.raises(SystemExit):
        main(["--max-len", "8"])
