"""The benchmark scripts run end to end on tiny sizes, so they cannot rot unnoticed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bench.index import (
    IndexCase,
    clustered_vectors,
    default_cases,
    new_kind_cases,
    only_cases,
    queries_near_items,
    replot,
    run_benchmark,
    set_faiss_options,
)
from bench.make_perf_bundle import PerfBundleConfig, make_perf_bundle
from bench.make_perf_bundle import main as make_perf_bundle_main
from bench.processes import ServiceProcess
from service.bundle import CURRENT, FORMAT_VERSION, MANIFEST, load_bundle, read_manifest


def tiny_config(**overrides) -> PerfBundleConfig:
    values = dict(
        items=2_000, users=200, dim=16, max_len=16, batch_size=64, eval_users=50, ctr_epochs=1
    )
    return PerfBundleConfig(**{**values, **overrides})


def test_perf_bundle_is_marked_perf_only_and_records_index_quality(tmp_path):
    summary = make_perf_bundle(
        tiny_config(), tmp_path / "models", "perf-tiny", run_dir=tmp_path / "run"
    )
    manifest = read_manifest(tmp_path / "models" / "perf-tiny")
    assert manifest["perf_only"] is True and summary["perf_only"] is True
    assert manifest["dataset"]["items"] == 2_000  # the whole catalogue, cold items included
    index = manifest["retrievers"]["two_tower"]["index"]
    for key in ("recall@10", "recall@100", "bytes_per_vector", "compression", "query_ms_p50"):
        assert key in index
    assert index["recall@100"] == 1.0  # exact index at this size
    assert manifest["retrievers"]["two_tower"]["ctr_head"]["file"].endswith("ctr_head.onnx")
    assert not (tmp_path / "models" / CURRENT).exists()  # not made current by default
    queries = np.load(summary["queries_file"])
    assert queries.shape == (50, 16)
    assert load_bundle(tmp_path / "models", "perf-tiny", device="cpu").name == "perf-tiny"


def stand_in_bundle(models_dir, name: str, perf_only: bool) -> None:
    """A bundle folder holding only its manifest: all that decides whether the perf
    bundle's CLI may replace it."""
    path = models_dir / name
    path.mkdir(parents=True)
    manifest = {"format_version": FORMAT_VERSION, "perf_only": perf_only}
    (path / MANIFEST).write_text(json.dumps({**manifest, "files": {}, "retrievers": {}}))


@pytest.mark.slow
def test_perf_bundle_cli_builds_a_compressed_index_and_replaces_only_perf_bundles(tmp_path, capsys):
    # Stand-ins for the bundles already there: one build instead of two (15-20 s each),
    # as the manifest alone decides; the test above checks that a build is marked perf-only.
    stand_in_bundle(tmp_path / "models", "perf-ivf", perf_only=True)
    stand_in_bundle(tmp_path / "models", "kept", perf_only=False)
    argv = [
        "--models-dir", str(tmp_path / "models"), "--name", "perf-ivf",
        "--run-dir", str(tmp_path / "run"), "--items", "2000", "--users", "200",
        "--dim", "16", "--batch-size", "64", "--eval-users", "50", "--quiet",
        "--index", "IVF16,PQ4x8", "--nprobe", "8", "--rescore", "200", "--ctr-users", "0",
    ]  # fmt: skip
    assert make_perf_bundle_main(argv) == 2
    assert "pass --replace to rebuild" in capsys.readouterr().err
    assert make_perf_bundle_main([*argv, "--name", "kept", "--replace"]) == 2
    assert "not a perf-only bundle" in capsys.readouterr().err
    assert read_manifest(tmp_path / "models" / "kept")["perf_only"] is False  # still there
    assert make_perf_bundle_main([*argv, "--replace"]) == 0
    assert "bytes/vector" in capsys.readouterr().out
    index = read_manifest(tmp_path / "models" / "perf-ivf")["retrievers"]["two_tower"]["index"]
    assert index["spec"]["factory"] == "IVF16,PQ4x8" and index["spec"]["rescore"] == 200
    assert index["compression"] > 1.0
    assert (
        "ctr_head" not in read_manifest(tmp_path / "models" / "perf-ivf")["retrievers"]["two_tower"]
    )


def test_index_benchmark_measures_recall_and_writes_json_and_png(tmp_path):
    vectors = clustered_vectors(2_000, 16)
    queries = queries_near_items(vectors, 50)
    cases = [c for c in default_cases(2_000, 16, train_size=2_000, hnsw=True)
             if c.label in ("Flat", "IVF-PQ", "IVF-PQ + re-score",
                            "MIPS->L2 IVF-PQ fast-scan + re-score")]  # fmt: skip
    cases.append(IndexCase("HNSW32", "HNSW32", 0, "ef_search", (64,)))
    report = run_benchmark(
        vectors,
        queries,
        cases,
        "test",
        out_json=tmp_path / "r.json",
        out_png=tmp_path / "r.png",
        latency_queries=10,
        coarse_study=True,
    )
    assert (tmp_path / "r.png").stat().st_size > 0
    written = json.loads((tmp_path / "r.json").read_text())
    flat, plain, rescored, fast_scan, hnsw = written["results"]
    assert flat["points"][0]["recall_at_100"] == 1.0
    assert flat["compression"] < 1.1
    assert plain["compression"] > 2.0
    # Exact re-scoring of the same shortlist never loses recall.
    for a, b in zip(plain["points"], rescored["points"], strict=True):
        assert b["recall_at_10"] >= a["recall_at_10"]
    assert rescored["points"][-1]["recall_at_100"] >= 0.95  # widest nprobe
    assert fast_scan["factory"].endswith("x4fs") and fast_scan["compression"] > 2.0
    assert fast_scan["points"][-1]["recall_at_100"] >= 0.95
    assert hnsw["points"][0]["recall_at_10"] >= 0.9
    assert "recall@100" in report["table"] and report["markdown"].startswith("| index")
    # The coarse study covers all three partitions.
    study = written["coarse_study"]
    assert {row["partition"] for row in study} == {
        "spherical k-means, IP probe",
        "L2 k-means, IP probe",
        "MIPS->L2 augmentation",
    }
    assert all(0.0 <= row["coverage_at_100"] <= 1.0 for row in study)
    # The PNG and tables can be redrawn from the JSON alone.
    again = replot(tmp_path / "r.json", tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 0 and again["table"] == report["table"]


def test_service_cpu_is_split_between_the_worker_and_its_compute_process():
    # A stand-in worker that sleeps while its child (in the compute process's place) spins.
    spin = "import subprocess, sys, time; " + (
        "subprocess.Popen([sys.executable, '-c', 'while True: pass']); time.sleep(30)"
    )
    service = ServiceProcess({})
    service.process = subprocess.Popen([sys.executable, "-c", spin])
    try:
        deadline = time.monotonic() + 10
        while not service.pids_by_role()["compute"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        split = service.cpu_by_role()
        assert split["compute"] > 0.3 > split["workers"]
        assert abs(service.cpu_seconds() - sum(split.values())) < 0.2
    finally:
        for child in service.pids_by_role()["compute"]:
            os.kill(child, signal.SIGKILL)
        service.process.kill()
        service.process.wait()


def test_new_index_kinds_are_searched_with_their_options_and_summarised_at_the_target():
    vectors = clustered_vectors(3_000, 16)
    queries = queries_near_items(vectors, 40)
    cases = only_cases(new_kind_cases(3_000, 16), ["auto", "qb=8", "HNSW8"])
    assert [c.factory.split(",")[-1] for c in cases] == ["PQ10x4fs", "RaBitQ", "RaBitQ", "RaBitQ"]
    report = run_benchmark(vectors, queries, cases, "test", latency_queries=5)
    auto, rabitq, rabitq_qb8, hnsw = report["results"]
    assert hnsw["points"][0]["param"] == "ef_search" and hnsw["points"][0]["value"] == 1000
    assert rabitq["build_seconds"] == rabitq_qb8["build_seconds"]  # one index, built once
    rows = report["operating_points"]
    assert [r["label"] for r in rows] == [c.label for c in cases]
    for row, result in zip(rows, report["results"], strict=True):
        recalls = [p["recall_at_100"] for p in result["points"]]
        if row["reached"]:
            assert row["recall_at_100"] >= 0.95 and recalls.index(row["recall_at_100"]) == next(
                i for i, r in enumerate(recalls) if r >= 0.95
            )
        else:
            assert row["recall_at_100"] == max(recalls) < 0.95
    assert rows[0]["reached"]  # the auto index at its widest nprobe
    assert "recall@100 >= 0.95" in report["markdown"]


def test_faiss_options_reach_the_index_under_its_transforms():
    import faiss

    index = faiss.index_factory(20, "RR20,IVF4,RaBitQ")
    set_faiss_options(index, {"qb": 8})
    assert faiss.downcast_index(faiss.extract_index_ivf(index)).qb == 8
