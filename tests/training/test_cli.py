import json

import pytest
import torch

from service.settings import Settings
from training.__main__ import _parser, main

TINY = "synthetic:users=150,items=60,mean_length=15,seed=4"


def train_argv(data: str, out, epochs: int = 1, max_len: int = 8) -> list[str]:
    """``train`` of a small SASRec-kind encoder (dim 16) on ``data`` into ``out``."""
    return [
        "train",
        "--data",
        data,
        "--epochs",
        str(epochs),
        "--max-len",
        str(max_len),
        "--dim",
        "16",
        "--out",
        str(out),
    ]


def one_error_line(capsys) -> str:
    """The CLI's report of a project error: one ``error: ...`` line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.slow
def test_cli_trains_evaluates_and_writes_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(train_argv(TINY, out, epochs=2, max_len=10))
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


def test_piped_training_reports_one_line_per_epoch_and_draws_no_bar(tmp_path, capsys):
    assert main(train_argv(TINY, tmp_path / "run", epochs=2)) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "batch/s" not in err
    epochs = [line for line in err.splitlines() if line.startswith("sasrec epoch")]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"]
    assert all("loss" in line and "valid NDCG@10" in line for line in epochs)


@pytest.mark.slow
def test_cli_generates_a_file_that_trains(tmp_path, capsys):
    data = tmp_path / "log.parquet"
    assert main(["generate", "--out", str(data), "--users", "100", "--items", "50"]) == 0
    code = main(train_argv(f"parquet:{data}", tmp_path / "run"))
    assert code == 0


def test_cli_reports_a_malformed_file_with_its_line(tmp_path, capsys):
    bad = tmp_path / "log.csv"
    bad.write_text("user,item,timestamp\nu1,i1,100\nu1,i2,yesterday\n")
    code = main(["train", "--data", f"csv:{bad}", "--out", str(tmp_path / "run")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"{bad}:3" in error and "timestamp" in error


def test_batch_recommend_defaults_are_the_services_settings():
    args = _parser().parse_args(["batch-recommend", "--data", "synthetic", "--out", "r.parquet"])
    settings = Settings.model_fields
    assert args.redis_url == settings["redis_url"].default
    assert args.key_prefix == settings["key_prefix"].default
    assert args.history_cap == settings["history_cap"].default
    assert args.candidates == settings["candidates"].default
    assert args.cache_ttl == settings["cache_ttl_seconds"].default


def test_checkpoint_for_other_items_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    main(train_argv(TINY, out))
    other = "synthetic:users=150,items=70,seed=4"
    code = main(["evaluate", "--data", other, "--checkpoint", str(out / "checkpoint.pt")])
    assert code == 2
    assert "other items" in capsys.readouterr().err


# --------------------------------------------------------------------------- project errors
# Each is reported as one "error: ..." line naming the problem, with exit status 2.


def test_a_file_that_is_not_a_checkpoint_is_one_error_line(tmp_path, capsys):
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint\n")
    code = main(["evaluate", "--data", TINY, "--checkpoint", str(junk)])
    assert code == 2
    line = one_error_line(capsys)
    assert f"{junk}: not a readable checkpoint" in line


def test_a_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    code = main(["evaluate", "--data", TINY, "--checkpoint", str(missing)])
    assert code == 2
    assert f"{missing}: no such file" in one_error_line(capsys)


def test_a_checkpoint_of_another_format_is_one_error_line(tmp_path, capsys):
    old = tmp_path / "old.pt"
    torch.save({"format": 99}, old)
    code = main(["evaluate", "--data", TINY, "--checkpoint", str(old)])
    assert code == 2
    assert f"{old}: checkpoint format 99 is not 1" in one_error_line(capsys)


def test_an_unknown_data_kind_is_one_error_line(tmp_path, capsys):
    code = main(["train", "--data", f"movies:{tmp_path}", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "unknown data kind 'movies'" in one_error_line(capsys)


def test_a_malformed_csv_is_one_error_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "log.csv"
    bad.write_text("user,item,timestamp\nu1,i1,100\nu1,i2,3,extra\n")
    code = main(train_argv(f"csv:{bad}", tmp_path / "run"))
    assert code == 2
    assert f"{bad}:3: expected 3 fields, got 4" in one_error_line(capsys)


def test_an_unknown_model_option_is_one_error_line(tmp_path, capsys):
    argv = [*train_argv(TINY, tmp_path / "run"), "--model-option", "colour=3"]
    assert main(argv) == 2
    assert "--model sasrec has no option(s) colour" in one_error_line(capsys)


@pytest.mark.slow
def test_a_ctr_head_that_cannot_be_trained_is_one_error_line(tmp_path, capsys):
    # Two users: the encoder trains and exports, but a head needs three evaluation users.
    data = "synthetic:users=2,items=20"
    assert main(train_argv(data, tmp_path / "run", max_len=4)) == 0
    capsys.readouterr()
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    argv = ["export", "--data", data, "--checkpoint", checkpoint, "--ctr-head", "adam"]
    code = main([*argv, "--models-dir", str(tmp_path / "models")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    # The ONNX exporter may log its own warnings before; the error is one line, the last.
    assert errors == ["error: fewer than three evaluation users: nothing to train a head on"]
    assert err.rstrip("\n").endswith(errors[0])


@pytest.mark.parametrize(("flag", "fitted"), [([], True), (["--no-metadata-encoder"], False)])
def test_export_fits_metadata_encoders_unless_told_not_to(tmp_path, monkeypatch, flag, fitted):
    import training.__main__ as cli

    asked = {}
    monkeypatch.setattr(cli, "export_bundle", lambda *a, **kw: asked.update(kw) or tmp_path)
    argv = ["export", "--data", TINY, "--checkpoint", "c.pt", "--models-dir", str(tmp_path)]
    assert main([*argv, *flag]) == 0
    assert (asked["cold_start"] == cli.DEFAULT_COLD_START) is fitted
    assert (asked["cold_start"] is None) is not fitted


@pytest.mark.parametrize(("flag", "default"), [([], "auto"), (["--rerank-default", "off"], "off")])
def test_export_passes_the_rerank_default_to_the_gate(tmp_path, monkeypatch, flag, default):
    import training.__main__ as cli

    asked = {}
    monkeypatch.setattr(cli, "export_bundle", lambda *a, **kw: asked.update(kw) or tmp_path)
    argv = ["export", "--data", TINY, "--checkpoint", "c.pt", "--models-dir", str(tmp_path)]
    assert main([*argv, *flag]) == 0
    assert asked["gate"].rerank_default == default


def test_an_unknown_rerank_default_is_refused_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--data", TINY, "--checkpoint", "c.pt", "--rerank-default", "maybe"])
    assert "--rerank-default" in capsys.readouterr().err
