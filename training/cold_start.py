"""Cold start: fit a retriever's item-metadata encoder, and measure it on items it never saw.

    from training.cold_start import ColdStartConfig, catalogue_metadata, fit_metadata_encoder
    metadata = catalogue_metadata(data)            # vocabulary and inputs of every item
    fit = fit_metadata_encoder(vectors, metadata, trained, queries=users, config=ColdStartConfig())

``training.export`` does this for every retriever of a bundle whose data has metadata
(``add_metadata_encoder``); ``bench/cold_start.py`` measures the result on MovieLens-1M
items held out of training altogether.

Targets are the retriever's vectors of the items it trained on (at least one training
event) that have metadata. A seeded share of them (``holdout_share``) is left out of the
fit entirely (not even as negatives) and the shipped encoder is measured on those
(:func:`item_space_quality`): where the true item ranks among all trained items by cosine
to the predicted vector, and how many of its ten nearest neighbours the prediction finds.

The loss is ranking-aware: a softmax over the fitted items of cosine(prediction, item
vector) / ``temperature``, labelled with the item itself, so the prediction must pick its
own item out of the catalogue rather than merely lie near it in squared error; plus
``length_weight`` times the squared relative error of its length, because the service
scores items by inner product with unit-length user embeddings, so a new item's length
sets how high it ranks against the trained ones.

That length is also how widely a new item is shown: a prediction is less specific than
the vector the item would have learned, so at the same length it reaches more users than
its audience, and the catalogue's other items lose some of theirs. ``queries`` (user
embeddings) measure this: the quality report gives the prediction's score bias over them.
Losses that matched those users' scores instead (squared error in their metric, or the
retriever's softmax over the catalogue) put new items almost never in anyone's top ten;
docs/BENCHMARKS.md, "Cold start", measures the trade-off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from service.item_metadata import MetadataVocabulary
from training.data import SequenceData
from training.errors import ConfigError
from training.evaluate import metrics_from_ranks
from training.models.metadata_encoder import MetadataEncoderConfig, MetadataEncoderModel

LOG = logging.getLogger(__name__)

NEIGHBOURS = 10
QUALITY_CUTOFFS = (10, 50)


@dataclass(frozen=True)
class ColdStartConfig:
    """The metadata encoder's vocabulary, size and fit.

    Small and briefly fitted on purpose: metadata says little about an item that a large
    model could learn, and longer fits and wider models placed held-out items worse among
    the catalogue's vectors, not better (docs/BENCHMARKS.md, "Cold start", the settings'
    search with bench/cold_start_settings.py).
    """

    min_count: int = 2  # a genre or title word in fewer items maps to its field's <unk>
    hidden: int = 64
    dropout: float = 0.3
    epochs: int = 10
    min_steps: int = 100  # a small catalogue still gets this many optimiser steps
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    length_weight: float = 1.0
    negatives: int = 4096  # fitted items each step ranks against (the batch's own included)
    holdout_share: float = 0.1  # of the trained items, measured on and never fitted
    seed: int = 0


@dataclass
class CatalogueMetadata:
    """Every item's metadata as the encoder's inputs, by internal id (row 0 = padding)."""

    vocabulary: MetadataVocabulary
    token_ids: np.ndarray  # (N + 1, T) int64
    token_weights: np.ndarray  # (N + 1, T) float32
    described: np.ndarray  # (N + 1,) bool: the item has a title or genres


@dataclass
class MetadataFit:
    model: MetadataEncoderModel
    report: dict
    held_out: np.ndarray  # the ids measured on and never fitted


def has_metadata(data: SequenceData) -> bool:
    """Whether any item of ``data`` has a title or genres."""
    return data.metadata is not None and bool(data.metadata.titles or data.metadata.genres)


def catalogue_metadata(data: SequenceData, min_count: int = 2) -> CatalogueMetadata:
    """The vocabulary fitted on every item's metadata, and every item featurized with it.

    The vocabulary sees all items, trained or not: tokens carry no training signal by
    themselves, and a new item's words should be known where any catalogue item had them.
    """
    if not has_metadata(data):
        raise ConfigError(f"{data.source or 'the data'} has no item metadata (titles, genres)")
    records = [data.metadata.record(raw) for raw in data.item_map.raw.tolist()]
    records[0] = {}  # the padding row
    vocabulary = MetadataVocabulary.fit(records[1:], min_count=min_count)
    token_ids, token_weights = vocabulary.featurize(records)
    described = np.array([bool(r.get("title") or r.get("genres")) for r in records])
    return CatalogueMetadata(vocabulary, token_ids, token_weights, described)


def split_rows(rows: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fitted, held out): a seeded ``share`` of ``rows`` held out, both sorted."""
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(rows, size=int(round(share * len(rows))), replace=False))
    return np.setdiff1d(rows, held), held


def fit_metadata_encoder(
    vectors: np.ndarray,
    metadata: CatalogueMetadata,
    trained: np.ndarray,
    *,
    queries: np.ndarray | None = None,
    config: ColdStartConfig | None = None,
) -> MetadataFit:
    """Fit an encoder from ``metadata`` to ``vectors`` (N + 1, d) on the ``trained`` (N + 1,
    bool) items that have metadata, holding ``config.holdout_share`` of them out and
    measuring it there (with ``queries``, (q, d) user embeddings, the score bias too).
    The returned model is the one measured (eval mode)."""
    config = config or ColdStartConfig()
    rows = np.flatnonzero(np.asarray(trained, bool) & metadata.described)
    rows = rows[rows > 0]
    fitted, held = split_rows(rows, config.holdout_share, config.seed)
    if len(fitted) < 2:
        raise ConfigError(f"{len(fitted)} trained items with metadata: too few to fit an encoder")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 1)
    table = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    unit = F.normalize(table, dim=-1)
    lengths = table.norm(dim=-1)
    mean_length = float(lengths[fitted].mean()) or 1.0
    model = MetadataEncoderModel(
        MetadataEncoderConfig(
            n_tokens=metadata.vocabulary.size,
            dim=int(vectors.shape[1]),
            hidden=config.hidden,
            dropout=config.dropout,
            scale=mean_length,
        )
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    ids = torch.from_numpy(metadata.token_ids)
    weights = torch.from_numpy(metadata.token_weights)

    per_epoch = max(1, len(fitted) // config.batch_size)
    steps = max(config.min_steps, config.epochs * per_epoch)
    started = time.perf_counter()
    losses = []
    model.train()
    for _, batch in zip(range(steps), shuffled_batches(fitted, per_epoch, rng), strict=False):
        candidates = fitted
        if len(fitted) > config.negatives:
            drawn = rng.choice(fitted, size=config.negatives, replace=False)
            candidates = np.union1d(batch, drawn)
        labels = torch.from_numpy(np.searchsorted(candidates, batch))
        rows_t = torch.from_numpy(batch)
        predicted = model(ids[rows_t], weights[rows_t])  # (b, d)
        logits = F.normalize(predicted, dim=-1) @ unit[candidates].T / config.temperature
        length_error = (predicted.norm(dim=-1) - lengths[rows_t]) / mean_length
        loss = F.cross_entropy(logits, labels) + config.length_weight * length_error.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    seconds = time.perf_counter() - started

    predicted = embed_rows(model, metadata, held)
    mean_vector = np.repeat(vectors[fitted].mean(axis=0, keepdims=True), len(held), axis=0)
    report = {
        "items": {"fitted": int(len(fitted)), "held_out": int(len(held))},
        "quality_held_out": {
            "encoder": item_space_quality(predicted, held, vectors, rows, queries=queries),
            "mean_vector": item_space_quality(mean_vector, held, vectors, rows, queries=queries),
        },
        # Mean loss over the first and the last epoch's worth of steps.
        "loss": {
            "first": float(np.mean(losses[:per_epoch])),
            "last": float(np.mean(losses[-per_epoch:])),
        },
        "steps": steps,
        "fit_seconds": seconds,
        "config": asdict(config),
    }
    LOG.info(
        "metadata encoder: %d items fitted in %.1fs, held-out %s",
        len(fitted),
        seconds,
        {k: round(v, 4) for k, v in report["quality_held_out"]["encoder"].items()},
    )
    return MetadataFit(model, report, held)


def shuffled_batches(rows: np.ndarray, per_epoch: int, rng: np.random.Generator):
    """Endless epochs over ``rows``, each shuffled and cut into ``per_epoch`` batches."""
    while True:
        yield from np.array_split(rng.permutation(rows), per_epoch)


def embed_rows(
    model: MetadataEncoderModel, metadata: CatalogueMetadata, rows: np.ndarray
) -> np.ndarray:
    """The model's vectors (len(rows), d) for catalogue rows, without gradients."""
    rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    with torch.no_grad():
        return model(
            torch.from_numpy(metadata.token_ids)[rows_t],
            torch.from_numpy(metadata.token_weights)[rows_t],
        ).numpy()


def item_space_quality(
    predicted: np.ndarray,
    rows: np.ndarray,
    vectors: np.ndarray,
    candidates: np.ndarray,
    *,
    queries: np.ndarray | None = None,
) -> dict[str, float]:
    """How well ``predicted`` (h, d) stands in for the vectors of ``rows`` (h,):

    - ``recall@K`` / ``ndcg@K`` / ``mrr``: the rank of each true item among ``candidates``
      (ids into ``vectors``, the true items among them) by cosine to its prediction, ties
      counted against it;
    - ``neighbours@10``: the share of the true vector's ten nearest candidates by cosine
      (itself left out) that are among the prediction's ten nearest (itself left out);
    - ``length_ratio``: the mean of |prediction| / |true vector|;
    - with ``queries`` (user embeddings), ``score_bias`` and ``score_rmse``: the mean and
      the root mean square of (query . prediction - query . true vector), in units of each
      query's standard deviation of scores over the candidates (a bias of 1 lifts a new
      item by a standard deviation of the catalogue's scores for everyone).
    """
    if len(rows) == 0:
        return {}
    unit = (
        vectors[candidates]
        / np.maximum(np.linalg.norm(vectors[candidates], axis=1), 1e-12)[:, None]
    )
    predicted_unit = predicted / np.maximum(np.linalg.norm(predicted, axis=1), 1e-12)[:, None]
    true = vectors[rows]
    true_unit = true / np.maximum(np.linalg.norm(true, axis=1), 1e-12)[:, None]
    position = np.searchsorted(candidates, rows)  # candidates are sorted ids
    scores = predicted_unit @ unit.T  # (h, c)
    target = scores[np.arange(len(rows)), position]
    ranks = (scores >= target[:, None]).sum(axis=1) - 1
    result = metrics_from_ranks(ranks, QUALITY_CUTOFFS)

    itself = np.zeros_like(scores, dtype=bool)
    itself[np.arange(len(rows)), position] = True
    true_scores = np.where(itself, -np.inf, true_unit @ unit.T)
    found_scores = np.where(itself, -np.inf, scores)
    k = min(NEIGHBOURS, len(candidates) - 1)
    true_top = np.argsort(-true_scores, axis=1, kind="stable")[:, :k]
    found_top = np.argsort(-found_scores, axis=1, kind="stable")[:, :k]
    shared = [len(np.intersect1d(a, b)) for a, b in zip(true_top, found_top, strict=True)]
    result[f"neighbours@{NEIGHBOURS}"] = float(np.mean(shared) / max(k, 1))
    ratio = np.linalg.norm(predicted, axis=1) / np.maximum(np.linalg.norm(true, axis=1), 1e-12)
    result["length_ratio"] = float(ratio.mean())
    if queries is not None and len(queries):
        spread = np.maximum((queries @ vectors[candidates].T).std(axis=1), 1e-12)  # (q,)
        shift = (queries @ (predicted - true).T) / spread[:, None]  # (q, h)
        result["score_bias"] = float(shift.mean())
        result["score_rmse"] = float(np.sqrt((shift**2).mean()))
    return result
