"""Quality benchmark: encoders x losses on real data, full ranking, popularity beside.

    .venv/bin/python bench/train_quality.py --suite grid   --data ml-1m:../shared/data/ml-1m
    .venv/bin/python bench/train_quality.py --suite cbns   --data ml-1m:../shared/data/ml-1m
    .venv/bin/python bench/train_quality.py --suite ccl    --data ml-1m:../shared/data/ml-1m
    .venv/bin/python bench/train_quality.py --suite single --run sasrec:full_softmax \
        --data amazon:../shared/data/amazon-beauty-5core-seq
    .venv/bin/python bench/train_quality.py --suite single --run sasrec:full_softmax \
        --augment ticoserec --data amazon:../shared/data/amazon-beauty-5core-seq
    .venv/bin/python bench/train_quality.py --suite single --run sasrec:full_softmax:1 \
        --windows last --max-len 50 --data ml-100k:../shared/data/ml-100k \
        --results docs/train_quality_ml100k.json --plot docs/train_quality_ml100k.png

Suites:
- ``grid``: every encoder with every loss that applies to it (one seed);
- ``cbns``: two-tower, in-batch sampled softmax against the same plus cross-batch
  negatives at the same batch size, three seeds each (mean and standard deviation);
- ``ccl``: the cosine contrastive loss against sampled softmax on the same encoder;
- ``single``: the runs named with ``--run encoder:loss`` (repeatable).

Each finished run is appended to the JSON results file at once (a long suite that is cut
off keeps what it finished); the table and a PNG bar chart are written from that file. A run
whose data, encoder, loss, seed and settings are already in the file is not trained again,
so suites that overlap (``ccl`` and ``cbns`` seed 0 are cells of ``grid``) share their runs
and an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import cli_options  # noqa: E402
from training.data import build_sequences  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.errors import TrainingError  # noqa: E402
from training.trainer import default_windows, train  # noqa: E402

# The suites pick encoder, loss and seed; each encoder's shape beyond the flags is fixed here.
ENCODER_OPTIONS = {
    "sasrec": {"n_layers": 2, "n_heads": 2},
    "nextitnet": {},
    "two_tower": {},
    "hstu": {"n_layers": 2, "n_heads": 2},
}
LOSSES = ["full_softmax", "sampled_softmax", "cbns_softmax", "ccl"]
SUITES = {
    "grid": [(e, loss, 0) for e in ENCODER_OPTIONS for loss in LOSSES],
    "cbns": [
        ("two_tower", loss, seed)
        for loss in ("sampled_softmax", "cbns_softmax")
        for seed in (0, 1, 2)
    ],
    "ccl": [(e, loss, 0) for e in ("two_tower", "sasrec") for loss in ("sampled_softmax", "ccl")],
}


def run_one(data, encoder: str, loss: str, seed: int, args) -> dict:
    """Train and evaluate one configuration; returns a flat result row."""
    config = cli_options.train_config(args, model=encoder, loss=loss, seed=seed)
    config.model_options.update(ENCODER_OPTIONS[encoder])
    out = args.run_dir / f"{args.tag}-{encoder}-{loss}-s{seed}"
    started = time.perf_counter()
    report = train(data, config, out).report
    metrics = report["metrics"]
    return {
        "data": data.source,
        "encoder": encoder,
        "loss": loss,
        "seed": seed,
        "epochs_run": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "wall_seconds": time.perf_counter() - started,
        "test": metrics["model"]["test"],
        "popularity_test": metrics["popularity"]["test"],
        "config": run_settings(args, encoder),
    }


def run_settings(args, encoder: str) -> dict:
    """The settings that make two runs of the same cell comparable (the window mode as
    ``encoder`` trains with it when ``--windows`` is not given)."""
    return {
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "dim": args.dim,
        "lr": args.lr,
        "epochs": args.epochs,
        "patience": args.patience,
        "eval_every": args.eval_every,
        "dropout": args.dropout,
        "loss_options": cli_options.loss_options(args),
        "windows": args.windows or default_windows(encoder),
        "window_stride": args.window_stride,
        "width_groups": args.width_groups,
        "max_seconds": args.max_seconds,
        "augmentation": args.augmentation,
        "augment_options": cli_options.augment_options(args),
    }


# Settings added after the first rows were written, with the value those rows ran with.
LEGACY_SETTINGS = {
    "windows": "last",
    "window_stride": 0,
    "width_groups": 1,
    "max_seconds": 0.0,
    "augmentation": None,
    "augment_options": {},
}


def already_run(rows: list[dict], cell: tuple[str, str, str, int], args) -> bool:
    """Whether ``rows`` hold ``cell`` (data source, encoder, loss, seed) with these settings."""
    settings = run_settings(args, cell[1])
    return any(
        (r["data"], r["encoder"], r["loss"], r["seed"]) == cell
        and {**LEGACY_SETTINGS, **r["config"]} == settings
        for r in rows
    )


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation and median over seeds per (data, encoder, loss, settings)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        config = {**LEGACY_SETTINGS, **row["config"]}
        key = (row["data"], row["encoder"], row["loss"], json.dumps(config, sort_keys=True))
        groups.setdefault(key, []).append(row)
    summary = []
    for (data, encoder, loss, _), members in groups.items():
        config = {**LEGACY_SETTINGS, **members[0]["config"]}
        options = config.get("loss_options") or {}
        entry = {
            "data": data,
            "encoder": encoder,
            "loss": " ".join(
                [loss, *(f"{k}={v}" for k, v in sorted(options.items())), *augment_label(config)]
            ),
            "seeds": len(members),
            "max_len": members[0]["config"]["max_len"],
            "windows": window_label(config),
            "settings": settings_label(config),
            "epochs_run": statistics.mean(m["epochs_run"] for m in members),
        }
        for metric in ("recall@10", "ndcg@10"):
            values = [m["test"][metric] for m in members]
            entry[metric] = statistics.mean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{metric}_median"] = statistics.median(values)
            entry[f"{metric}_runs"] = values
        entry["popularity_ndcg@10"] = members[0]["popularity_test"]["ndcg@10"]
        entry["popularity_recall@10"] = members[0]["popularity_test"]["recall@10"]
        entry["wall_seconds"] = statistics.mean(m["wall_seconds"] for m in members)
        entry["wall_seconds_runs"] = [m["wall_seconds"] for m in members]
        # What it takes to train the group again (bench/quality_table.py prints the command).
        entry["objective"] = loss
        entry["config"] = config
        entry["seed_list"] = sorted(m["seed"] for m in members)
        entry["devices"] = sorted({str(m.get("device", "cpu")) for m in members})
        summary.append(entry)
    return summary


def augment_label(config: dict) -> list[str]:
    """``+ NAME`` and its options when a run trained with an augmentation (none otherwise)."""
    if config["augmentation"] is None:
        return []
    options = sorted(config["augment_options"].items())
    return [f"+ {config['augmentation']}", *(f"{k}={v}" for k, v in options)]


def window_label(config: dict) -> str:
    """The window mode, with its stride where one was set."""
    stride = config["window_stride"]
    return f"{config['windows']}/{stride}" if stride else config["windows"]


def settings_label(config: dict) -> str:
    """The settings a chart's bar is told apart by: windows, max length, lr, dropout."""
    return (
        f"{window_label(config)} / len {config['max_len']} / lr {config['lr']:g} / "
        f"dropout {config['dropout']:g}"
    )


def fmt(entry: dict, metric: str) -> str:
    """A metric with its standard deviation when there are several seeds."""
    std = f" ± {entry[f'{metric}_std']:.4f}" if entry["seeds"] > 1 else ""
    return f"{entry[metric]:.4f}{std}"


def table(summary: list[dict]) -> str:
    """One markdown row per group of seeds: mean ± std, the median, and mean wall time."""
    lines = [
        "| data | encoder | loss | max len | windows | seeds | epochs | Recall@10 | NDCG@10 "
        "| median Recall@10 | median NDCG@10 | popularity NDCG@10 | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        lines.append(
            f"| {s['data'].split(':')[0]} | {s['encoder']} | {s['loss']} | {s['max_len']} | "
            f"{s['windows']} | {s['seeds']} | {s['epochs_run']:.0f} | "
            f"{fmt(s, 'recall@10')} | {fmt(s, 'ndcg@10')} | {s['recall@10_median']:.4f} | "
            f"{s['ndcg@10_median']:.4f} | {s['popularity_ndcg@10']:.4f} | "
            f"{s['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Left: horizontal bars of the median test NDCG@10 over seeds, whiskers from the lowest
    to the highest seed, the popularity baseline as a line (horizontal so that long labels
    stay readable). Right: every run's NDCG@10 against its wall time, one colour per bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['encoder']} / {s['loss']} / {s['settings']}" for s in summary]
    medians = [s["ndcg@10_median"] for s in summary]
    spread = [
        [m - min(s["ndcg@10_runs"]) for m, s in zip(medians, summary, strict=True)],
        [max(s["ndcg@10_runs"]) - m for m, s in zip(medians, summary, strict=True)],
    ]
    fig, (ax, runs) = plt.subplots(
        1, 2, figsize=(12, max(3, 0.32 * len(summary) + 1)), width_ratios=(3, 2)
    )
    positions = list(range(len(summary))[::-1])  # first row on top
    colours = [plt.cm.tab10(i % 10) for i in range(len(summary))]
    ax.barh(positions, medians, xerr=spread, capsize=3, color=colours)
    ax.set_yticks(positions, labels, fontsize=7)
    if summary:
        ax.axvline(summary[0]["popularity_ndcg@10"], color="tab:red", ls="--", label="popularity")
        ax.set_title(summary[0]["data"].split(":")[0], fontsize=9)
        ax.legend(fontsize=7)
    ax.set_xlabel("test NDCG@10, median over seeds (whiskers: lowest, highest)")
    for s, colour in zip(summary, colours, strict=True):
        runs.scatter(s["wall_seconds_runs"], s["ndcg@10_runs"], color=colour, s=18)
    runs.set_xlabel("wall time of a run (s)")
    runs.set_ylabel("test NDCG@10")
    runs.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long labels would be cut at the left
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli_options.add_data_flags(parser)
    parser.add_argument("--suite", choices=[*SUITES, "single"], default="grid")
    parser.add_argument("--run", action="append", default=[], help="encoder:loss[:seed]")
    # Encoder, loss and seed come from the suite; every other setting is in run_settings.
    cli_options.add_model_flags(parser, "--max-len", "--dim", "--dropout")
    cli_options.add_training_flags(
        parser,
        "--loss-option",
        "--epochs",
        "--batch-size",
        "--lr",
        "--patience",
        "--eval-every",
        "--windows",
        "--window-stride",
        "--width-groups",
        "--max-seconds",
        "--threads",
        "--device",
        "--augment",
        "--augment-option",
    )
    parser.set_defaults(epochs=200, eval_every=2, max_len=200)
    parser.add_argument("--tag", default="q")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "quality")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "train_quality.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "train_quality.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run_suite(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_suite(args) -> int:
    """Train the suite's cells not yet in the results file; write the table and the chart."""
    runs = list(SUITES.get(args.suite, []))
    for spec in args.run:
        encoder, loss, *seed = spec.split(":")
        runs.append((encoder, loss, int(seed[0]) if seed else 0))
    data = build_sequences(load_dataset(args.data, args.skip_malformed))
    rows = json.loads(args.results.read_text()) if args.results.exists() else []
    for encoder, loss, seed in runs:
        if already_run(rows, (data.source, encoder, loss, seed), args):
            print(f"== {encoder} / {loss} / seed {seed}: already in {args.results}", flush=True)
            continue
        print(f"== {encoder} / {loss} / seed {seed} on {data.source}", flush=True)
        row = run_one(data, encoder, loss, seed, args)
        print(f"   test {json.dumps(row['test'])} in {row['wall_seconds']:.0f}s", flush=True)
        rows.append(row)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(rows, indent=2))
    summary = summarise(rows)
    print(table(summary))
    # One data set per chart: its popularity line is the baseline of every bar.
    plot([entry for entry in summary if entry["data"] == data.source], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
