"""Cold start: items held out of training altogether, embedded from their metadata alone.

    .venv/bin/python bench/cold_start.py --data ml-1m:../shared/data/ml-1m --max-len 50 \
        --epochs 24 --eval-every 3 --patience 3 --lr 2e-3 --threads 1
    ## redraw the table and the PNG from the JSON without training: --from-json docs/cold_start.json

Protocol (docs/BENCHMARKS.md, "Cold start"):

- A seeded ``--share`` of the catalogue's items (default 10%) is held out. Every event of
  theirs is removed from the log, and the *cold* SASRec-kind model trains on what is left
  (its own leave-last-out split: its last two events per user stay out of training). No
  held-out item appears in any sequence it trains or early-stops on.
- The *full* model is the same SASRec with the same settings trained on the whole log
  (upper bound (c): the held-out items' own learned vectors).
- Evaluated: the test events (each user's last event of the whole log) whose target is a
  held-out item, with full ranking over **all** items, the user's earlier items masked
  (held-out ones included), ties counted against the model. The cold model reads the
  history as the service would: the held-out items in it are unknown to it and skipped,
  the time gaps taken between the events it knows. The full model reads all of it.
- The held-out items get vectors in the cold model's space from: the metadata encoder
  exactly as ``training.export`` fits and exports it for the cold model (the bundle's ONNX
  graph run through ``service.item_metadata.ItemMetadataEncoder``, its vocabulary fitted
  on the cold catalogue, so words only held-out items have are unknown to it); (a) random
  vectors (Gaussian directions, lengths drawn from the trained items' lengths); and, as a
  model-free vector, the mean vector of the trained items whose genres are most alike
  (Jaccard). (b) is content only, no model: every item scored by the ``genre_overlap``
  feature of ``service.features`` with the user's history, ties broken at random (seeded;
  counted against it they would bury the held-out items among hundreds of equals).
- (c') reads the issue's "the same encoder trained with those items present" literally:
  the full model, its held-out items' vectors replaced by a metadata encoder fitted on all
  of the full model's trained items, held-out ones included.
- Also reported: the other test events (target not held out), so that a gain on the new
  items that costs the rest shows.

Steps are resumable: a checkpoint in ``--run-dir`` whose training settings and items match
is reused, not trained again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.bundle import load_bundle  # noqa: E402
from service.errors import RecserveError  # noqa: E402
from service.features import GENRE_WINDOW, genre_matrix, genre_overlap  # noqa: E402
from service.histories import left_padded_window  # noqa: E402
from training import cli_options  # noqa: E402
from training.cold_start import (  # noqa: E402
    ColdStartConfig,
    catalogue_metadata,
    embed_rows,
    fit_metadata_encoder,
)
from training.data import Interactions, SequenceData, build_sequences  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.errors import CheckpointError, TrainingError  # noqa: E402
from training.evaluate import mask_seen, metrics_from_ranks, target_ranks  # noqa: E402
from training.export import export_bundle, git_commit  # noqa: E402
from training.models.base import UserEncoder  # noqa: E402
from training.trainer import TrainConfig, load_checkpoint, read_checkpoint, train  # noqa: E402

CUTOFFS = (10, 50)
BATCH = 256
# Factors on the held-out items' vectors: how widely new items are shown, against what
# the other test events lose (1.0: the vectors as they are).
EXPOSURE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


# --------------------------------------------------------------------------- the split


@dataclass
class ColdSplit:
    """The whole log, the log without the held-out items, and which items those are."""

    full: SequenceData
    cold: SequenceData
    held_out: np.ndarray  # sorted internal ids of ``full``
    to_cold: np.ndarray  # (N_full + 1,) the cold id of each full id, 0 = held out (or padding)


def hold_out_items(interactions: Interactions, share: float, seed: int) -> ColdSplit:
    """Hold a seeded ``share`` of the items out: the cold log has none of their events."""
    full = build_sequences(interactions)
    rng = np.random.default_rng(seed)
    count = int(round(share * full.n_items))
    held_out = np.sort(rng.choice(np.arange(1, full.n_items + 1), size=count, replace=False))
    held_raw = full.item_map.raw[held_out]
    keep = ~np.isin(interactions.items.astype(str), held_raw)
    cold = build_sequences(
        Interactions(
            users=interactions.users[keep],
            items=interactions.items[keep],
            timestamps=interactions.timestamps[keep],
            ratings=None if interactions.ratings is None else interactions.ratings[keep],
            source=f"{interactions.source} without {count} held-out items (seed {seed})",
            metadata=interactions.metadata,
        )
    )
    cold_ids = {raw: i for i, raw in enumerate(cold.item_map.raw.tolist()) if i}
    to_cold = np.array([cold_ids.get(raw, 0) for raw in full.item_map.raw.tolist()], np.int64)
    to_cold[0] = 0
    return ColdSplit(full, cold, held_out, to_cold)


@dataclass
class Events:
    """Test events of the whole log: user, where the history ends, target (full ids)."""

    users: np.ndarray
    history_end: np.ndarray
    targets: np.ndarray

    def take(self, rows: np.ndarray) -> Events:
        return Events(self.users[rows], self.history_end[rows], self.targets[rows])


def evaluation_events(split: ColdSplit) -> tuple[Events, Events]:
    """(events whose target is held out, the other test events)."""
    events = Events(*split.full.eval_examples("test"))
    held = np.isin(events.targets, split.held_out)
    return events.take(np.flatnonzero(held)), events.take(np.flatnonzero(~held))


# --------------------------------------------------------------------------- models


def trained_model(data: SequenceData, config: TrainConfig, out: Path) -> UserEncoder:
    """The model of ``out/checkpoint.pt`` when it finished training on these items with
    ``config``; otherwise one trained now."""
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        try:
            payload = read_checkpoint(checkpoint)
            finished = "metrics" in json.loads(payload["report"])
            same = json.loads(payload["train_config"]) == asdict(config)
            if finished and same and payload["item_ids"] == data.item_map.raw.tolist():
                print(f"   reusing {checkpoint}", flush=True)
                return load_checkpoint(checkpoint)[0]
        except (CheckpointError, KeyError, ValueError):
            pass  # not a usable checkpoint of this run: train again
    print(f"   training into {out}", flush=True)
    return train(data, config, out).model


def user_embeddings(model: UserEncoder, windows: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The model's user embeddings (b, d) of left-padded (ids, deltas) windows."""
    ids, deltas = windows
    with torch.no_grad():
        return model.encode_user(torch.from_numpy(ids), torch.from_numpy(deltas)).numpy()


def full_windows(split: ColdSplit, events: Events, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole history of each event, as the full model reads it."""
    data = split.full
    starts = data.offsets[events.users]
    return left_padded_window(data.items, data.timestamps, starts, events.history_end, max_len)


def cold_windows(split: ColdSplit, events: Events, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each event's history as the cold model reads it: in cold ids, the held-out items
    skipped and the gaps taken between the events that remain (as the service does with
    items it does not know)."""
    data = split.full
    starts = data.offsets[events.users]
    lengths = events.history_end - starts
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.repeat(starts, lengths) + np.arange(lengths.sum()) - offsets
    ids = split.to_cold[data.items[positions]]
    owner = np.repeat(np.arange(len(events.users)), lengths)
    known = ids > 0
    ids, stamps, owner = ids[known], data.timestamps[positions][known], owner[known]
    ends = np.cumsum(np.bincount(owner, minlength=len(events.users)))
    begins = np.concatenate([[0], ends[:-1]])
    return left_padded_window(ids, stamps, begins, ends, max_len)


# --------------------------------------------------------------------------- ranking


def ranks_of(scores: np.ndarray, split: ColdSplit, events: Events) -> np.ndarray:
    """0-based rank of each target among all items (full ids), the history masked."""
    masked = mask_seen(
        torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)),
        split.full,
        split.full.offsets[events.users],
        events.history_end,
    )
    return target_ranks(masked, torch.from_numpy(events.targets)).numpy()


def vector_ranks(
    users: np.ndarray,
    table: np.ndarray,
    split: ColdSplit,
    events: Events,
    *,
    hidden: np.ndarray | None = None,
) -> np.ndarray:
    """Ranks by inner product of user embeddings with ``table`` (N_full + 1, d); the items
    ``hidden`` are left out of the catalogue (never ranked above a real item)."""
    ranks = []
    for lo in range(0, len(users), BATCH):
        rows = np.arange(lo, min(lo + BATCH, len(users)))
        scores = users[rows] @ table.T
        if hidden is not None:
            scores[:, hidden] = -np.inf
        ranks.append(ranks_of(scores, split, events.take(rows)))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def content_ranks(split: ColdSplit, events: Events, seed: int) -> np.ndarray:
    """(b): every item scored by ``genre_overlap`` with the whole history (held-out items'
    genres included: metadata needs no model), ties broken at random."""
    data = split.full
    genres = [[], *(data.metadata.genres.get(raw, []) for raw in data.item_map.raw[1:].tolist())]
    matrix, _ = genre_matrix(genres)
    rng = np.random.default_rng(seed)
    everything = np.arange(data.n_items + 1)
    ranks = []
    for lo in range(0, len(events.users), BATCH):
        batch = events.take(np.arange(lo, min(lo + BATCH, len(events.users))))
        history, _ = full_windows(split, batch, GENRE_WINDOW)
        candidates = np.broadcast_to(everything, (len(batch.users), len(everything)))
        scores = genre_overlap(matrix, history, candidates)
        # Overlaps are fractions with small denominators: a jitter below 1e-6 only orders equals.
        scores = scores + rng.random(scores.shape) * 1e-6
        ranks.append(ranks_of(scores, split, batch))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def random_vectors(trained: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(a): Gaussian directions with lengths drawn from the trained vectors' lengths."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((count, trained.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lengths = rng.choice(np.linalg.norm(trained, axis=1), size=count)
    return (directions * lengths[:, None]).astype(np.float32)


def genre_neighbour_vectors(split: ColdSplit, cold_vectors: np.ndarray) -> np.ndarray:
    """For each held-out item, the mean cold vector of the trained items whose genre sets
    are most alike (Jaccard); no model."""
    data = split.cold
    trained = np.flatnonzero(data.train_item_counts() > 0)
    genres_of = data.metadata.genres
    cold_sets = [set(genres_of.get(raw, [])) for raw in data.item_map.raw[trained].tolist()]
    vectors = []
    for raw in split.full.item_map.raw[split.held_out].tolist():
        own = set(genres_of.get(raw, []))
        alike = np.array([len(own & s) / max(len(own | s), 1) for s in cold_sets])
        vectors.append(cold_vectors[trained[alike == alike.max()]].mean(axis=0))
    return np.asarray(vectors, dtype=np.float32)


FITTED_WITH_THEM = "(c') metadata encoder fitted with the items present"


def fitted_with_them(split: ColdSplit, full_vectors: np.ndarray) -> np.ndarray:
    """(c'): the full model's vectors with the held-out items' replaced by a metadata
    encoder fitted on every trained item of the full model, held-out ones included: what
    the encoder gives items it was fitted on, against (c)'s learned vectors."""
    metadata = catalogue_metadata(split.full)
    trained = split.full.train_item_counts() > 0
    config = ColdStartConfig(holdout_share=0.0)
    model = fit_metadata_encoder(full_vectors, metadata, trained, config=config).model
    table = full_vectors.copy()
    table[split.held_out] = embed_rows(model, metadata, split.held_out)
    return table


def summary(ranks: np.ndarray) -> dict:
    """Recall and NDCG at ``CUTOFFS``, MRR, and the standard error of NDCG@10."""
    result = metrics_from_ranks(ranks, CUTOFFS)
    gains = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    result["ndcg@10_se"] = float(gains.std(ddof=1) / np.sqrt(len(ranks))) if len(ranks) > 1 else 0.0
    result["events"] = int(len(ranks))
    return result


# --------------------------------------------------------------------------- the run


def run(args) -> dict:
    """Split, train (or reuse) both models, export the cold one, rank every variant."""
    started = time.perf_counter()
    interactions = load_dataset(args.data, args.skip_malformed)
    if interactions.metadata is None:
        raise TrainingError(f"{args.data}: the data has no item metadata to start cold items from")
    split = hold_out_items(interactions, args.share, args.split_seed)
    held_events, other_events = evaluation_events(split)
    print(
        f"== {split.full.n_items} items, {len(split.held_out)} held out; "
        f"{len(held_events.users)} test events with a held-out target",
        flush=True,
    )
    config = cli_options.train_config(args)
    run_dir = Path(args.run_dir)
    print("== full model (upper bound)", flush=True)
    full_model = trained_model(split.full, config, run_dir / "full")
    print("== cold model (held-out items removed)", flush=True)
    cold_model = trained_model(split.cold, config, run_dir / "cold")

    print("== export of the cold model, with its metadata encoder", flush=True)
    models_dir = run_dir / "models"
    shutil.rmtree(models_dir, ignore_errors=True)
    export_started = time.perf_counter()
    export_bundle(
        [run_dir / "cold" / "checkpoint.pt"],
        split.cold,
        models_dir,
        name="cold",
        make_current=False,
        cold_start=ColdStartConfig(),
    )
    export_seconds = time.perf_counter() - export_started
    bundle = load_bundle(models_dir, "cold", device="cpu")
    retriever = bundle.retrievers[config.model]
    records = [
        split.full.metadata.record(raw) for raw in split.full.item_map.raw[split.held_out].tolist()
    ]
    encoded = retriever.metadata_encoder.embed(records)

    cold_vectors = np.asarray(retriever.item_vectors)
    trained_rows = cold_vectors[split.cold.train_item_counts() > 0]
    base = np.zeros((split.full.n_items + 1, cold_vectors.shape[1]), np.float32)
    known = split.to_cold > 0
    base[known] = cold_vectors[split.to_cold[known]]
    variants = {
        "metadata encoder": encoded,
        "(a) random vectors": random_vectors(trained_rows, len(split.held_out), args.split_seed),
        "genre neighbours' mean vector": genre_neighbour_vectors(split, cold_vectors),
    }
    full_vectors = full_model.all_item_embeddings().detach().numpy()
    upper_name = "(c) full model, items trained"

    rows: dict[str, dict] = {}
    others: dict[str, dict] = {}
    sweep = []
    cold_users = user_embeddings(cold_model, cold_windows(split, held_events, cold_model.max_len))
    cold_others = user_embeddings(cold_model, cold_windows(split, other_events, cold_model.max_len))
    others["no held-out items in the catalogue"] = summary(
        vector_ranks(cold_others, base, split, other_events, hidden=split.held_out)
    )
    for name, vectors in variants.items():
        for scale in EXPOSURE_SCALES:
            table = base.copy()
            table[split.held_out] = vectors * scale
            point = {
                "vectors": name,
                "scale": scale,
                "held_out_targets": summary(vector_ranks(cold_users, table, split, held_events)),
                "other_events": summary(vector_ranks(cold_others, table, split, other_events)),
            }
            sweep.append(point)
            if scale == 1.0:
                rows[name], others[name] = point["held_out_targets"], point["other_events"]
    content = content_ranks(split, held_events, args.split_seed)
    rows["(b) content only: genre overlap"] = summary(content)
    full_users = user_embeddings(full_model, full_windows(split, held_events, full_model.max_len))
    rows[upper_name] = summary(vector_ranks(full_users, full_vectors, split, held_events))
    rows[FITTED_WITH_THEM] = summary(
        vector_ranks(full_users, fitted_with_them(split, full_vectors), split, held_events)
    )
    full_others = user_embeddings(full_model, full_windows(split, other_events, full_model.max_len))
    others[upper_name] = summary(vector_ranks(full_others, full_vectors, split, other_events))

    upper = rows[upper_name]
    share_of_upper = {
        name: {
            m: row[m] / upper[m] if upper[m] else None
            for m in ("ndcg@10", "recall@10", "recall@50")
        }
        for name, row in rows.items()
    }
    manifest_entry = bundle.manifest["retrievers"][config.model]["metadata_encoder"]
    return {
        "git_commit": git_commit(),
        "data": split.full.source,
        "items": split.full.n_items,
        "held_out_items": int(len(split.held_out)),
        "share": args.share,
        "split_seed": args.split_seed,
        "train_config": asdict(config),
        "cold_data": split.cold.summary(),
        "held_out_target_events": rows,
        "share_of_upper_bound": share_of_upper,
        "other_test_events": others,
        "exposure_sweep": sweep,
        "metadata_encoder_manifest": {
            k: manifest_entry[k]
            for k in (
                "items",
                "quality_held_out",
                "onnx_parity_max_abs_diff",
                "fit_seconds",
                "config",
            )
        },
        "export_seconds": export_seconds,
        "wall_seconds": time.perf_counter() - started,
    }


def table(result: dict) -> str:
    """The markdown table of the held-out-target events, with the share of (c)."""
    lines = [
        "| held-out items' vectors | NDCG@10 (± s.e.) | Recall@10 | Recall@50 | MRR "
        "| share of (c), NDCG@10 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["held_out_target_events"].items():
        share = result["share_of_upper_bound"][name]["ndcg@10"]
        lines.append(
            f"| {name} | {row['ndcg@10']:.4f} ± {row['ndcg@10_se']:.4f} | {row['recall@10']:.4f} | "
            f"{row['recall@50']:.4f} | {row['mrr']:.4f} | {share:.1%} |"
        )
    lines += [
        "",
        "| other test events (target not held out) | NDCG@10 | Recall@10 |",
        "| --- | --- | --- |",
    ]
    for name, row in result["other_test_events"].items():
        lines.append(f"| {name} | {row['ndcg@10']:.4f} | {row['recall@10']:.4f} |")
    lines += [
        "",
        "| held-out items' vectors | x | held-out targets NDCG@10 | Recall@50 "
        "| other events NDCG@10 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for point in result["exposure_sweep"]:
        held, other = point["held_out_targets"], point["other_events"]
        lines.append(
            f"| {point['vectors']} | {point['scale']:g} | {held['ndcg@10']:.4f} | "
            f"{held['recall@50']:.4f} | {other['ndcg@10']:.4f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Left: NDCG@10, Recall@10 and Recall@50 of each variant on the held-out targets.
    Right: what the held-out targets gain against what the other test events lose as the
    held-out items' vectors are scaled (``EXPOSURE_SCALES``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["held_out_target_events"]
    names = list(rows)
    metrics = ("ndcg@10", "recall@10", "recall@50")
    fig, (bars, trade) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=(3, 2))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        positions = np.arange(len(names)) + (k - 1) * width
        values = [rows[n][metric] for n in names]
        bars.bar(positions, values, width, label=metric)
        if metric == "ndcg@10":  # its standard error
            errors = [rows[n]["ndcg@10_se"] for n in names]
            bars.errorbar(positions, values, yerr=errors, fmt="none", ecolor="black", capsize=3)
    labels = [textwrap.fill(n, 16) for n in names]
    bars.set_xticks(np.arange(len(names)), labels, fontsize=7)
    bars.set_ylabel("full ranking over all items")
    bars.set_title(
        f"{result['data'].split(':')[0]}: {rows[names[0]]['events']} test events whose "
        f"target is one of {result['held_out_items']} held-out items",
        fontsize=9,
    )
    bars.legend(fontsize=8)

    for name in dict.fromkeys(p["vectors"] for p in result["exposure_sweep"]):
        points = [p for p in result["exposure_sweep"] if p["vectors"] == name]
        x = [p["other_events"]["ndcg@10"] for p in points]
        y = [p["held_out_targets"]["ndcg@10"] for p in points]
        trade.plot(x, y, marker="o", label=name)
        for p, xi, yi in zip(points, x, y, strict=True):
            trade.annotate(
                f"x{p['scale']:g}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    none = result["other_test_events"]["no held-out items in the catalogue"]["ndcg@10"]
    trade.axvline(none, color="grey", ls=":", label="no held-out items (other events)")
    upper = "(c) full model, items trained"
    trade.plot(
        result["other_test_events"][upper]["ndcg@10"],
        result["held_out_target_events"][upper]["ndcg@10"],
        marker="*",
        markersize=12,
        color="black",
        ls="none",
        label=upper,
    )
    trade.set_xlabel("other test events: NDCG@10")
    trade.set_ylabel("held-out targets: NDCG@10")
    trade.set_title("scaling the held-out items' vectors", fontsize=9)
    trade.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli_options.add_data_flags(parser, default="ml-1m:../shared/data/ml-1m")
    cli_options.add_model_flags(parser, models=("sasrec", "nextitnet", "two_tower"))
    cli_options.add_training_flags(parser)
    parser.add_argument("--share", type=float, default=0.1, help="share of items held out")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "cold_start")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "cold_start.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "cold_start.png")
    parser.add_argument("--from-json", type=Path, help="redraw table and PNG from a results file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.from_json:
            result = json.loads(args.from_json.read_text())
        else:
            result = run(args)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(result, indent=2))
    except (TrainingError, RecserveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
