"""bench/train_quality.py on tiny synthetic data: results file, resumption, chart."""

from __future__ import annotations

import json

import pytest

from bench.train_quality import main


def tiny_sasrec_argv(tmp_path, results) -> list[str]:
    """One SASRec-kind cell on tiny synthetic data, its results in ``results``."""
    return [
        "--data", "synthetic:users=60,items=20,seed=3", "--suite", "single",
        "--run", "sasrec:full_softmax", "--epochs", "1", "--max-len", "8", "--dim", "8",
        "--results", str(results), "--plot", str(tmp_path / "chart.png"),
        "--run-dir", str(tmp_path / "runs"),
    ]  # fmt: skip


@pytest.mark.slow
def test_a_cell_already_in_the_results_is_not_trained_again(tmp_path, capsys):
    results, chart = tmp_path / "results.json", tmp_path / "chart.png"
    argv = [
        "--data", "synthetic:users=150,items=40,seed=3", "--suite", "single",
        "--run", "two_tower:sampled_softmax", "--epochs", "1", "--eval-every", "1",
        "--max-len", "8", "--dim", "8", "--results", str(results), "--plot", str(chart),
        "--run-dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    assert main(argv) == 0
    first = json.loads(results.read_text())
    assert len(first) == 1 and first[0]["encoder"] == "two_tower"
    assert 0.0 <= first[0]["test"]["ndcg@10"] <= 1.0 and chart.stat().st_size > 0

    assert main(argv) == 0  # same cell, same settings: skipped
    assert "already in" in capsys.readouterr().out
    assert json.loads(results.read_text()) == first

    assert main([*argv, "--lr", "0.01"]) == 0  # other settings: a new cell
    rows = json.loads(results.read_text())
    assert len(rows) == 2 and rows[1]["config"]["lr"] == 0.01


def test_rows_written_before_window_modes_count_as_last_windows(tmp_path, capsys):
    results = tmp_path / "results.json"
    argv = tiny_sasrec_argv(tmp_path, results)
    assert main([*argv, "--windows", "last"]) == 0
    rows = json.loads(results.read_text())
    # as an older file holds it
    for key in ("windows", "window_stride", "max_seconds", "augmentation", "augment_options"):
        del rows[0]["config"][key]
    results.write_text(json.dumps(rows))
    capsys.readouterr()

    assert main([*argv, "--windows", "last"]) == 0  # the old row is this cell
    assert "already in" in capsys.readouterr().out
    assert main(argv) == 0  # SASRec-kind's default mode, sliding: a new cell
    rows = json.loads(results.read_text())
    assert [r["config"].get("windows", "last") for r in rows] == ["last", "sliding"]
    assert "| sliding |" in capsys.readouterr().out


def test_a_run_with_an_augmentation_is_a_cell_of_its_own(tmp_path, capsys):
    results = tmp_path / "results.json"
    argv = tiny_sasrec_argv(tmp_path, results)
    assert main(argv) == 0
    augmented = [*argv, "--augment", "ticoserec", "--augment-option", "weight=0.2"]
    assert main(augmented) == 0
    rows = json.loads(results.read_text())
    assert [r["config"]["augmentation"] for r in rows] == [None, "ticoserec"]
    assert "full_softmax + ticoserec weight=0.2 |" in capsys.readouterr().out


def test_the_table_of_every_result_names_commands_that_train_its_cells_again(tmp_path, capsys):
    from bench import quality_table

    results = tmp_path / "results.json"
    argv = tiny_sasrec_argv(tmp_path, results)
    for seed in ("0", "1"):
        assert main([*argv[:5], f"sasrec:full_softmax:{seed}", *argv[6:]]) == 0
    assert main([*argv, "--augment", "ticoserec", "--lr", "0.01", "--width-groups", "2"]) == 0
    capsys.readouterr()

    markdown, plots = tmp_path / "table.md", tmp_path / "plots"
    written = ["--markdown", str(markdown), "--plot-dir", str(plots)]
    assert quality_table.main([str(results), *written]) == 0
    text = markdown.read_text()
    assert text.count("| sasrec |") == 2 and "| 2 | " in text
    assert "full_softmax + ticoserec" in text and (plots / "quality_synthetic.png").stat().st_size
    commands = [line.split("`")[1] for line in text.splitlines() if line[:1].isdigit()]
    assert len(commands) == 2
    # Each command, given back to bench/train_quality.py, names cells already in the file.
    for command in commands:
        assert command.startswith(".venv/bin/python bench/train_quality.py ")
        flags = command.split()[2:]
        assert main([*flags, "--results", str(results), "--plot", str(tmp_path / "c.png")]) == 0
        out = capsys.readouterr().out
        assert "already in" in out and "on synthetic" not in out
    assert len(json.loads(results.read_text())) == 3


def test_the_table_names_a_file_that_holds_no_results(tmp_path):
    from bench import quality_table

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match="broken.json: not a readable results file"):
        quality_table.main([str(broken)])
    broken.write_text('{"a": 1}')
    with pytest.raises(SystemExit, match="broken.json: not a list of runs"):
        quality_table.main([str(broken)])
