"""Settings of the metadata encoder, chosen without the test events that bench/cold_start.py
reports: a trained model's own items and validation events.

    .venv/bin/python bench/cold_start_settings.py --data ml-1m:../shared/data/ml-1m \
        --checkpoint runs/cold_start/full/checkpoint.pt \
        --set hidden=128,dropout=0.1,epochs=40,min_steps=200 --set epochs=20 --set ''

Each ``--set`` (``key=value,...`` over ``training.cold_start.ColdStartConfig``; empty: the
defaults) fits the encoder on the checkpoint's item vectors exactly as the export does,
which holds a seeded tenth of the trained items out. Reported per setting: the item-space
quality on those items (as the manifest records it), and the validation events (every
user's second-last event, history before it) ranked over all items with the held-out
items' vectors replaced by the encoder's: NDCG@10 of the events whose target is one of
them, and of the other events. The model trained on all items, so its users' histories
know the held-out items; the numbers compare settings, they are not a cold-start result.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import cli_options  # noqa: E402
from training.cold_start import (  # noqa: E402
    ColdStartConfig,
    catalogue_metadata,
    embed_rows,
    fit_metadata_encoder,
)
from training.data import build_sequences, left_padded_window  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.evaluate import mask_seen, metrics_from_ranks, target_ranks  # noqa: E402
from training.trainer import check_same_items, load_checkpoint  # noqa: E402

BATCH = 512


def parse_setting(text: str) -> dict:
    """``"hidden=128,epochs=40"`` -> ColdStartConfig fields with their types."""
    types = {f.name: f.type for f in fields(ColdStartConfig)}
    setting = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in types:
            raise SystemExit(f"--set: ColdStartConfig has no {key!r} ({', '.join(types)})")
        setting[key] = float(value) if types[key] == "float" else int(value)
    return setting


def valid_ndcg(data, users: np.ndarray, table: np.ndarray, held: np.ndarray) -> dict:
    """NDCG@10 of the validation events whose target is in ``held``, and of the others."""
    everyone, history_end, targets = data.eval_examples("valid")
    ranks = []
    for lo in range(0, len(everyone), BATCH):
        rows = slice(lo, lo + BATCH)
        scores = torch.from_numpy(users[rows] @ table.T)
        masked = mask_seen(scores, data, data.offsets[everyone[rows]], history_end[rows])
        ranks.append(target_ranks(masked, torch.from_numpy(targets[rows])).numpy())
    ranks = np.concatenate(ranks)
    is_held = np.isin(targets, held)
    return {
        "held_out_targets": metrics_from_ranks(ranks[is_held], (10,))["ndcg@10"],
        "other_events": metrics_from_ranks(ranks[~is_held], (10,))["ndcg@10"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli_options.add_data_flags(parser)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[], help="key=value,... ('': defaults)")
    args = parser.parse_args(argv)

    data = build_sequences(load_dataset(args.data, args.skip_malformed))
    model, payload = load_checkpoint(args.checkpoint)
    check_same_items(args.checkpoint, payload, data)
    vectors = model.all_item_embeddings().detach().numpy().copy()
    vectors[0] = 0.0
    everyone, history_end, _ = data.eval_examples("valid")
    ids, deltas = left_padded_window(
        data.items, data.timestamps, data.offsets[everyone], history_end, model.max_len
    )
    with torch.no_grad():
        users = model.encode_user(torch.from_numpy(ids), torch.from_numpy(deltas)).numpy()
    metadata = catalogue_metadata(data)
    trained = data.train_item_counts() > 0
    print(
        "| setting | steps | item space: Recall@10 | neighbours@10 | length ratio | score bias "
        "| valid, held-out targets: NDCG@10 | valid, other events: NDCG@10 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for text in args.set or [""]:
        config = replace(ColdStartConfig(), **parse_setting(text))
        fit = fit_metadata_encoder(vectors, metadata, trained, queries=users, config=config)
        table = vectors.copy()
        table[fit.held_out] = embed_rows(fit.model, metadata, fit.held_out)
        valid = valid_ndcg(data, users, table, fit.held_out)
        quality = fit.report["quality_held_out"]["encoder"]
        print(
            f"| {text or 'defaults'} | {fit.report['steps']} | {quality['recall@10']:.4f} | "
            f"{quality['neighbours@10']:.4f} | {quality['length_ratio']:.3f} | "
            f"{quality['score_bias']:+.3f} | {valid['held_out_targets']:.4f} | "
            f"{valid['other_events']:.4f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
