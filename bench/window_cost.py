"""What one training epoch costs in each window mode (``TrainConfig.windows``).

    .venv/bin/python bench/window_cost.py --data synthetic --max-len 50
    .venv/bin/python bench/window_cost.py --data ml-100k:../shared/data/ml-100k --max-len 50

    .venv/bin/python bench/window_cost.py --data amazon:../shared/data/amazon-beauty-5core-seq \
        --max-len 50 --modes sliding --width-groups 1 4 --augment ticoserec

Per mode (and per ``--width-groups`` value: the encoder reading each batch in that many
groups of windows of similar width, ``UserEncoder.states_by_width``): the windows and
scored targets of an epoch, the positions the encoder computes for them (padding
included; with ``--augment`` the views' positions are not counted), and the process CPU
seconds of one epoch's training steps (with ``--augment``, its contrastive term's views
and their encoding included) of the SASRec-kind encoder with full softmax on one torch
thread. CPU time, not wall time, because the machines these run on are shared: another
job's load stretches the wall clock but not the work done. The modes see the same model
and data; only the windows differ.
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
from training.augment import build_augmentation  # noqa: E402
from training.data import build_sequences  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.losses import build_objective  # noqa: E402
from training.models import build_encoder  # noqa: E402
from training.models.base import width_groups  # noqa: E402
from training.optimizers import build_optimizer  # noqa: E402
from training.trainer import WINDOW_MODES, batches, epoch_windows, sequence_loss  # noqa: E402


def epoch_cost(data, mode: str, groups: int, args) -> dict:
    """Windows, targets, positions and CPU seconds of one epoch in ``mode``, the encoder
    reading each batch in up to ``groups`` width groups."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_encoder("sasrec", data.n_items, max_len=args.max_len, dim=args.dim)
    objective = build_objective("full_softmax", data.train_item_counts())
    augmentation = build_augmentation(
        args.augmentation, cli_options.augment_options(args), data, args.max_len, args.seed
    )
    optimizer = build_optimizer("adam", model.parameters(), lr=1e-3)
    windows = epoch_windows(data, mode, args.max_len, rng, args.window_stride)
    positions, seconds = 0, 0.0
    model.train()
    for item_ids, deltas, targets in batches(
        data,
        windows.starts,
        windows.ends,
        args.max_len,
        batch_size=args.batch_size,
        rng=rng,
        first_targets=windows.first_targets,
    ):
        positions += sum(
            (len(item_ids) if rows is None else len(rows)) * width
            for rows, width in width_groups(item_ids, groups)
        )
        started = time.process_time()
        loss = sequence_loss(model, objective, item_ids, deltas, targets, groups=groups)
        if augmentation is not None:
            loss = loss + augmentation.loss(
                model, item_ids, deltas, torch.device("cpu"), groups=groups
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.process_time() - started
    return {
        "mode": mode,
        "augmentation": args.augmentation,
        "width_groups": groups,
        "windows": len(windows),
        "targets": windows.targets(),
        "positions": positions,
        "cpu_seconds": seconds,
    }


def positive_int(text: str) -> int:
    """An argparse type: a count of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli_options.add_data_flags(parser)
    cli_options.add_model_flags(parser, "--max-len", "--dim")
    cli_options.add_training_flags(
        parser, "--batch-size", "--window-stride", "--seed", "--augment", "--augment-option"
    )
    parser.add_argument("--modes", nargs="+", choices=WINDOW_MODES, default=list(WINDOW_MODES))
    parser.add_argument(
        "--width-groups",
        nargs="+",
        type=positive_int,
        default=[1],
        help="width groups per batch, one row each (1: one pass at the batch's widest window)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: CPU time then measures the work, not the waiting
    data = build_sequences(load_dataset(args.data, args.skip_malformed))
    rows = [
        epoch_cost(data, mode, groups, args) for mode in args.modes for groups in args.width_groups
    ]
    print(json.dumps({"data": data.source, "max_len": args.max_len, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
