import json

import pytest

from training.__main__ import main

TINY = "synthetic:users=150,items=60,mean_length=15,seed=4"


@pytest.mark.slow
def test_cli_trains_evaluates_and_writes_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            TINY,
            "--epochs",
            "2",
            "--max-len",
            "10",
            "--dim",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "popularity" in printed and "ndcg@10" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["epochs_run"] == 2
    assert set(report["metrics"]) == {"model", "popularity"}
    assert 0.0 <= report["metrics"]["model"]["test"]["ndcg@10"] <= 1.0
    assert (out / "training_curve.png").stat().st_size > 1000
    assert (out / "checkpoint.pt").exists()

    code = main(["evaluate", "--data", TINY, "--checkpoint", str(out / "checkpoint.pt")])
    assert code == 0
    evaluated = capsys.readouterr().out
    test_ndcg = report["metrics"]["model"]["test"]["ndcg@10"]
    assert f"{test_ndcg:.4f}" in evaluated


@pytest.mark.slow
def test_cli_generates_a_file_that_trains(tmp_path, capsys):
    data = tmp_path / "log.parquet"
    assert main(["generate", "--out", str(data), "--users", "100", "--items", "50"]) == 0
    code = main(
        [
            "train",
            "--data",
            f"parquet:{data}",
            "--epochs",
            "1",
            "--max-len",
            "8",
            "--dim",
            "16",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0


def test_cli_reports_a_malformed_file_with_its_line(tmp_path, capsys):
    bad = tmp_path / "log.csv"
    bad.write_text("user,item,timestamp\nu1,i1,100\nu1,i2,yesterday\n")
    code = main(["train", "--data", f"csv:{bad}", "--out", str(tmp_path / "run")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"{bad}:3" in error and "timestamp" in error


def test_checkpoint_for_other_items_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    main(
        [
            "train",
            "--data",
            TINY,
            "--epochs",
            "1",
            "--max-len",
            "8",
            "--dim",
            "16",
            "--out",
            str(out),
        ]
    )
    other = "synthetic:users=150,items=70,seed=4"
    code = main(["evaluate", "--data", other, "--checkpoint", str(out / "checkpoint.pt")])
    assert code == 2
    assert "other items" in capsys.readouterr().err
