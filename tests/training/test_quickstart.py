"""The quickstart (``python -m training quickstart``): one bundle of every retriever kind with
a CTR head each, one table, and a quiet console when its output is not a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from service.bundle import load_bundle
from tests.conftest import REPO
from training.errors import ConfigError
from training.quickstart import QuickstartConfig, Recipe, time_limit
from training.trainer import TrainConfig

TINY = "synthetic:users=300,items=120,mean_length=20,seed=1"
RETRIEVERS = ["sasrec", "two_tower", "nextitnet"]


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """``python -m training ...`` in a child process, its output piped (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One quiet quickstart on tiny data: (completed process, run folder, models dir)."""
    root = tmp_path_factory.mktemp("quickstart")
    out, models = root / "run", root / "models"
    done = run_cli(
        "quickstart",
        "--data",
        TINY,
        "--out",
        str(out),
        "--models-dir",
        str(models),
        "--epochs",
        "1",
        "--head-epochs",
        "1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out, models


@pytest.mark.slow
def test_quickstart_exports_one_bundle_of_every_retriever_with_a_ctr_head(quickstart):
    _, _, models = quickstart
    bundle = load_bundle(models, device="cpu")
    assert set(bundle.retrievers) == set(RETRIEVERS)
    assert bundle.default_encoder == "sasrec"
    manifest = json.loads((models / bundle.name / "manifest.json").read_text())
    for name in RETRIEVERS:
        quality = manifest["retrievers"][name]["ctr_head"]["rerank_quality"]
        assert quality["split"] == "test" and quality["depth"] == 200 and quality["users"] > 0
        for order in ("retrieval", "reranked"):
            assert 0.0 <= quality[order]["ndcg@10"] <= 1.0
            assert 0.0 <= quality[order]["recall@10"] <= 1.0
        gate = manifest["retrievers"][name]["ctr_head"]["gate"]
        assert gate["depth"] == 200 and gate["decided_by"] == "gate"
        assert bundle.retrievers[name].rerank_default is gate["rerank_by_default"]


@pytest.mark.slow
def test_quickstart_prints_one_table_of_every_retriever_beside_popularity(quickstart):
    done, out, _ = quickstart
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line}
    summary = json.loads((out / "summary.json").read_text())
    for name in [*RETRIEVERS, "popularity"]:
        assert name in rows, done.stdout
        # the first column is the measured test Recall@10, never a figure of its own
        assert float(rows[name][0]) == pytest.approx(summary["test"][name]["recall@10"], abs=1e-4)
    reranked = summary["rerank_quality"]["sasrec"]["reranked"]["ndcg@10"]
    assert float(rows["sasrec"][-2]) == pytest.approx(reranked, abs=1e-4)
    # The last column is the gate's decision as the manifest records it.
    gate = summary["rerank_gate"]["sasrec"]
    assert rows["sasrec"][-1] == ("yes" if gate["rerank_by_default"] else "no")
    assert rows["popularity"][-1] == "-"


@pytest.mark.slow
def test_piped_quickstart_shows_no_bars_and_no_warnings_which_go_to_its_log(quickstart):
    done, out, _ = quickstart
    console = done.stdout + done.stderr
    assert "\r" not in console and "batch/s" not in console
    assert "sasrec epoch 1/1" in done.stderr  # one line per epoch instead of a bar
    assert "Warning" not in console and "torch" not in console, console
    log = (out / "quickstart.log").read_text()
    assert "py.warnings" in log  # the ONNX exporter's, at least
    assert "sasrec epoch 1/1" in log


QUIET_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from pathlib import Path
    from training.console import configure_logging, output_to_file, PROGRESS
    verbose = sys.argv[1] == "-v"
    log = Path(sys.argv[2])
    with output_to_file(log, enabled=not verbose) as console:
        configure_logging(verbose=verbose, log_file=log, console_warnings=verbose)
        warnings.warn("a library's warning")
        os.write(2, b"C-level chatter\\n")
        print("a library's print")
        logging.getLogger("some.library").info("a library's info")
        PROGRESS.info("progress line")
        print("the table", file=console)
    """
)


@pytest.mark.parametrize("verbose", [False, True])
def test_detail_goes_to_the_log_file_unless_verbose(tmp_path, verbose):
    log = tmp_path / "run.log"
    done = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT, "-v" if verbose else "-q", str(log)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "the table" in done.stdout and "progress line" in done.stderr
    detail = ["a library's warning", "C-level chatter", "a library's print", "a library's info"]
    logged = log.read_text() if log.exists() else ""
    for line in detail:
        assert (line in console) == verbose, console
    for line in ["a library's warning", "a library's info", "progress line"]:
        assert line in logged
    if not verbose:
        assert "C-level chatter" in logged and "a library's print" in logged


def test_an_optional_retriever_trains_only_when_the_budget_has_room():
    optional = Recipe(TrainConfig(model="nextitnet", max_seconds=40), optional=True)
    assert time_limit(optional, left=100, optional_min_seconds=30) == 40
    assert time_limit(optional, left=35, optional_min_seconds=30) == 35
    assert time_limit(optional, left=20, optional_min_seconds=30) is None
    required = Recipe(TrainConfig(model="sasrec", max_seconds=90))
    assert time_limit(required, left=-5, optional_min_seconds=30) == 90


def test_quickstart_limits_name_known_retrievers_and_keep_their_order():
    config = QuickstartConfig().with_limits(epochs=2, head_epochs=1, models=["two_tower", "sasrec"])
    assert [r.train.model for r in config.recipes] == ["sasrec", "two_tower"]
    assert all(r.train.epochs == 2 for r in config.recipes) and config.ctr.epochs == 1
    with pytest.raises(ConfigError, match="gru4rec"):
        QuickstartConfig().with_limits(models=["gru4rec"])
