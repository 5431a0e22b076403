"""bench/catalogue.py on the tiny bundle: every part runs and reports what it measured."""

from __future__ import annotations

import json

import pytest

from bench.catalogue import main


@pytest.mark.usefixtures("shared_redis")  # the write API's server uses the shared Redis
def test_catalogue_benchmark_times_serving_applying_and_the_write_api(exported_bundle, tmp_path):
    models_dir, _ = exported_bundle
    out = tmp_path / "catalogue.json"
    argv = ["--models-dir", str(models_dir), "--bundle", "tiny", "--added", "30"]
    argv += ["--withdrawn", "5", "--requests", "8", "--rounds", "2", "--http"]
    argv += ["--writes", "12", "--writers", "3", "--bulks", "2", "--probes", "3"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["serving"]) == {"bundle", "added", "added+withdrawn"}
    for case in result["serving"].values():
        assert case["miss_p50_ms"] > 0 and case["short_answers"] == 0
    assert result["serving"]["bundle"]["answers_with_an_added_item"].startswith("0 of")
    assert not result["serving"]["added"]["answers_with_an_added_item"].startswith("0 of")
    for where in ("with vectors", "without vectors"):
        assert result["applying"][where]["one_more_ms"] > 0
    api = result["write_api"]
    assert api["failures"] == [] and api["single"]["writes_per_second"] > 0
    assert api["bulk"]["items_per_second"] > 0
    assert 0 < api["visibility"]["p50_s"] <= api["visibility"]["max_s"] < 30
