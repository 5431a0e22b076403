"""What the time-interval-aware operators (``training.augment``) do to one epoch of real
training windows, and what making the views costs.

    .venv/bin/python bench/augment_views.py \
        --data amazon:../shared/data/amazon-beauty-5core-seq --max-len 200

The windows and batches are the trainer's (``epoch_batches``: the encoder's default window
mode, the seed's shuffle). Per operator, applied to every window: the share of windows it
changes, the mean coefficient of variation of their intervals before and after
(``interval_cv``; lower is more even), and the mean change in events per window; then the
seconds that ``TimeIntervalAugmentation.views`` (two views, an operator drawn per row) takes
over the whole epoch, which is what ``--augment ticoserec`` adds before any encoder pass.
The result is printed as JSON (and written to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import cli_options  # noqa: E402
from training.augment import OPERATORS, build_augmentation, interval_cv  # noqa: E402
from training.data import build_sequences  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.trainer import epoch_batches  # noqa: E402


def measure(data, config, max_len: int) -> dict:
    """Per-operator effects on one epoch's windows and the time to make two views of each."""
    augmentation = build_augmentation(
        "ticoserec", config.augment_options, data, max_len, config.seed
    )
    windows, batches = epoch_batches(data, config, max_len, np.random.default_rng(config.seed))
    batches = [(ids, deltas) for ids, deltas, _ in batches]
    effects = {}
    for name in OPERATORS:
        changed = before = after = grown = 0.0
        for ids, deltas in batches:
            out_ids, out_deltas = getattr(augmentation, name)(ids, deltas)
            width = max(ids.shape[1], out_ids.shape[1])
            left = torch.nn.functional.pad(ids, (width - ids.shape[1], 0))
            right = torch.nn.functional.pad(out_ids, (width - out_ids.shape[1], 0))
            changed += float((left != right).any(1).sum())
            before += float(interval_cv(ids, deltas).sum())
            after += float(interval_cv(out_ids, out_deltas).sum())
            grown += float(((out_ids > 0).sum(1) - (ids > 0).sum(1)).sum())
        effects[name] = {
            "changed_share": changed / windows,
            "mean_cv_before": before / windows,
            "mean_cv_after": after / windows,
            "mean_events_added": grown / windows,
        }
    started = time.perf_counter()
    for ids, deltas in batches:
        augmentation.views(ids, deltas)
    return {
        "data": data.source,
        "windows": windows,
        "batches": len(batches),
        "max_len": max_len,
        "augment_options": config.augment_options,
        "operators": effects,
        "views_seconds_per_epoch": time.perf_counter() - started,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli_options.add_data_flags(parser)
    cli_options.add_model_flags(parser, "--model", "--max-len")
    cli_options.add_training_flags(
        parser, "--batch-size", "--windows", "--seed", "--threads", "--augment-option"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = cli_options.train_config(args, augmentation="ticoserec")
    if config.threads:
        torch.set_num_threads(config.threads)
    data = build_sequences(load_dataset(args.data))
    result = measure(data, config, args.max_len)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
