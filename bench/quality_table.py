"""Every quality result in one place: encoder x objective x augmentation x settings per
data set, with seeds, epochs, wall time, where it ran, and the command that trains it again.

    .venv/bin/python -m bench.quality_table docs/train_quality*.json \
        --markdown docs/quality_table.md --plot-dir docs

Reads the results files ``bench/train_quality.py`` writes (one row per run), groups the
runs of one configuration as that script does (mean ± standard deviation over seeds), and
writes a markdown table per data set, best NDCG@10 first, followed by the command of every
row, and one PNG per data set (``quality_<data>.png``: the bars of ``train_quality.plot``).
Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_quality import fmt, plot, summarise  # noqa: E402


def data_name(source: str) -> str:
    """A data set's short name from its source (``KIND:PATH``): the folder of its file, or
    the kind for generated data."""
    kind, _, path = source.partition(":")
    if kind == "synthetic":
        return kind
    folder = Path(path).parent.name if Path(path).suffix else Path(path).name
    return folder or kind


def data_flag(source: str) -> str:
    """``--data`` for a source: the loaders take the data set's folder."""
    kind, _, path = source.partition(":")
    return f"{kind}:{Path(path).parent if Path(path).suffix else Path(path)}"


def command(entry: dict) -> str:
    """The bench/train_quality.py command that trains a summarised configuration again, every
    seed of it."""
    config = entry["config"]
    parts = [
        ".venv/bin/python bench/train_quality.py",
        f"--data {data_flag(entry['data'])} --suite single",
        *(f"--run {entry['encoder']}:{entry['objective']}:{seed}" for seed in entry["seed_list"]),
        # repr: the very floats of the row, so that the command names the row's cell.
        f"--max-len {config['max_len']} --dim {config['dim']} --dropout {config['dropout']!r}",
        f"--batch-size {config['batch_size']} --lr {config['lr']!r}",
        f"--epochs {config['epochs']} --eval-every {config['eval_every']}",
        f"--patience {config['patience']} --windows {config['windows']}",
    ]
    if config["window_stride"]:
        parts.append(f"--window-stride {config['window_stride']}")
    if config["width_groups"] > 1:
        parts.append(f"--width-groups {config['width_groups']}")
    if config["max_seconds"]:
        parts.append(f"--max-seconds {config['max_seconds']!r}")
    parts += [f"--loss-option {k}={v}" for k, v in sorted(config["loss_options"].items())]
    if config["augmentation"]:
        parts.append(f"--augment {config['augmentation']}")
        parts += [f"--augment-option {k}={v}" for k, v in sorted(config["augment_options"].items())]
    if any(device.startswith("cuda") for device in entry["devices"]):
        parts.append("--device cuda")
    return " ".join(parts)


def load_rows(paths: list[Path]) -> list[dict]:
    """Every run of the results files (the error names the file that is not one)."""
    rows = []
    for path in paths:
        try:
            loaded = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"error: {path}: not a readable results file ({exc})") from None
        if not isinstance(loaded, list) or not all(isinstance(r, dict) for r in loaded):
            raise SystemExit(f"error: {path}: not a list of runs (bench/train_quality.py)")
        rows += loaded
    return rows


def grouped(rows: list[dict]) -> dict[str, list[dict]]:
    """Each configuration's summary (``train_quality.summarise``) per data set, best mean
    NDCG@10 first."""
    by_data: dict[str, list[dict]] = {}
    for entry in summarise(rows):
        by_data.setdefault(data_name(entry["data"]), []).append(entry)
    for entries in by_data.values():
        entries.sort(key=lambda entry: -entry["ndcg@10"])
    return by_data


def markdown(by_data: dict[str, list[dict]]) -> str:
    """A table per data set and the numbered commands of its rows."""
    out = []
    for data, entries in sorted(by_data.items()):
        out += [
            f"### {data}",
            "",
            "| # | encoder | objective (and augmentation) | windows / len / lr / dropout | seeds "
            "| epochs | Recall@10 | NDCG@10 | popularity NDCG@10 | wall per run (s) | ran on |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for number, s in enumerate(entries, 1):
            out.append(
                f"| {number} | {s['encoder']} | {s['loss']} | {s['settings']} | {s['seeds']} | "
                f"{s['epochs_run']:.0f} | {fmt(s, 'recall@10')} | {fmt(s, 'ndcg@10')} | "
                f"{s['popularity_ndcg@10']:.4f} | {s['wall_seconds']:.0f} | "
                f"{', '.join(s['devices'])} |"
            )
        out += ["", "Commands:", ""]
        out += [f"{n}. `{command(entry)}`" for n, entry in enumerate(entries, 1)]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, nargs="+", help="results files of train_quality")
    parser.add_argument("--markdown", type=Path, help="write the tables here too")
    parser.add_argument("--plot-dir", type=Path, help="write quality_<data>.png here")
    args = parser.parse_args(argv)
    by_data = grouped(load_rows(args.results))
    text = markdown(by_data)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot_dir:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        for data, entries in by_data.items():
            plot(entries, args.plot_dir / f"quality_{data}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
