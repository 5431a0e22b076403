"""A CTR head that reranks the retriever's candidates: its examples and its training.

    from training.ctr import CtrConfig, train_ctr_head
    from training.onnx_export import check_head_parity, export_ctr_head
    head, report = train_ctr_head(data, "models/bundle-x", CtrConfig(optimizer="adatask"))
    export_ctr_head(head, "ctr_head.onnx"); check_head_parity(head, "ctr_head.onnx")

``python -m training export --ctr-head adam|adatask`` adds a head to each retriever of a
bundle (``training.export.add_ctr_head``).

The benchmark ``bench/rerank_quality.py`` runs the whole comparison on a dataset.

No leakage. The retriever is trained on each user's events but the last two. The head is
trained on what the *exported* retriever (``service.encoder.OnnxUserEncoder`` +
``service.retrieval.ItemIndex``, exactly what the service runs) returns for the history
before the second-last (valid) event: the top-N retrieved items with the seen ones
removed, the true valid item labelled 1 when it is among them and every other candidate a
hard negative. Groups whose true item was not retrieved carry no reranking signal and are
left out of training (appending the true item would give it a rank and score that never
occur at serving time, a label leak). The head is evaluated on held-out users' valid
groups and, separately, on every user's last (test) event with candidates retrieved for
the test history. Features come from ``service.features``; item facts are taken from the
training events only, the item age as of the request time (the held-out event's time).

Subsampling: ``max_users`` draws a seeded subset of users (0: all), and ``negatives``
keeps, per training group and batch, the positive plus that many uniformly drawn
negatives (0: all). Evaluation always scores the full candidate lists.

The head itself (``CtrHeadModel``, a DCN-v2) is in ``training.models.ctr_head``. With a
second label (MovieLens: rating >= 4, "liked", beside "watched next") it has one output
tower per task, and ``CtrConfig(optimizer="adatask")`` trains it with ``AdaTaskAdam``
(``training.optimizers``), which keeps Adam's moments per task on every parameter.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from service.bundle import load_bundle
from service.features import HISTORY_WINDOW, ItemFeatures
from service.filters import drop_seen
from service.histories import left_padded_events, left_padded_window
from service.ranking import head_inputs
from training.data import SequenceData
from training.errors import CtrError
from training.evaluate import log_loss, metrics_from_ranks, roc_auc
from training.models.ctr_head import CtrHeadConfig, CtrHeadModel
from training.optimizers import build_optimizer, optimizer_step

LOG = logging.getLogger(__name__)

LIKED_THRESHOLD = 4.0
CUTOFF = 10


# --------------------------------------------------------------------------- config


@dataclass
class CtrConfig:
    """Examples, model and optimisation of the CTR head."""

    candidates: int = 200  # retrieval depth N for training and AUC evaluation
    encoder: str | None = None  # retriever of a bundle (None: the bundle's default)
    optimizer: str = "adam"  # "adam" (summed loss) or "adatask"
    epochs: int = 20
    batch_size: int = 32  # candidate groups (users) per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    interaction: int = 32
    cross_layers: int = 2
    deep: tuple[int, ...] = (64, 32)
    tower: int = 16
    dropout: float = 0.1
    holdout: float = 0.2  # share of users whose valid groups are only evaluated
    early_stopping: float = 0.1  # share of training users that picks the best epoch
    max_users: int = 0  # subsample users (0: all)
    negatives: int = 0  # negatives kept per training group and batch (0: all)
    encode_batch: int = 256
    seed: int = 0


@dataclass
class RetrieverParts:
    """What the service serves for one encoder: an ONNX user encoder and an item index."""

    encoder: object  # service.encoder.OnnxUserEncoder
    index: object  # service.retrieval.ItemIndex
    max_len: int


def resolve_retriever(source, encoder: str | None = None):
    """A bundle folder (str/Path) -> its retriever; anything with encoder/index/max_len as is."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        bundle = load_bundle(path.parent, path.name, device="cpu")
        name = encoder or bundle.default_encoder
        if name not in bundle.retrievers:
            raise CtrError(f"{path}: no retriever {name!r} (has {', '.join(bundle.retrievers)})")
        return bundle.retrievers[name], bundle.catalogue
    for attribute in ("encoder", "index", "max_len"):
        if not hasattr(source, attribute):
            raise CtrError(f"{type(source).__name__} is no retriever: it lacks {attribute!r}")
    return source, None


# --------------------------------------------------------------------------- examples


def item_genres(data: SequenceData) -> list[list[str]] | None:
    """Genres per internal id (row 0 empty), or None when the data has no genres."""
    if data.metadata is None or not data.metadata.genres:
        return None
    genres = data.metadata.genres
    return [[], *(list(genres.get(raw, [])) for raw in data.item_map.raw[1:].tolist())]


def training_item_features(data: SequenceData) -> ItemFeatures:
    """Item facts from the training events only, with the point-in-time age index."""
    items, timestamps = data.training_events()
    return ItemFeatures.from_events(data.n_items, items, timestamps, item_genres(data))


def task_names(data: SequenceData) -> list[str]:
    return ["watched", "liked"] if data.ratings is not None else ["watched"]


@dataclass
class CandidateSet:
    """Retrieved candidates of a set of users' held-out events, with features and labels."""

    users: np.ndarray  # (g,) user indices
    targets: np.ndarray  # (g,) true item
    ids: np.ndarray  # (g, c) candidates in retrieval order, 0 = empty slot
    scores: np.ndarray  # (g, c) float32 retrieval scores (-inf in empty slots)
    user: np.ndarray  # (g, d) float32 user embeddings
    features: np.ndarray  # (g, c, f) float32
    labels: np.ndarray  # (g, c, t) float32
    feature_names: list[str]
    tasks: list[str]

    @property
    def hit(self) -> np.ndarray:
        """Groups whose true item was retrieved."""
        return (self.ids == self.targets[:, None]).any(axis=1)

    def take(self, rows: np.ndarray) -> CandidateSet:
        return replace(
            self,
            users=self.users[rows],
            targets=self.targets[rows],
            ids=self.ids[rows],
            scores=self.scores[rows],
            user=self.user[rows],
            features=self.features[rows],
            labels=self.labels[rows],
        )

    def first(self, n: int) -> CandidateSet:
        """The first ``n`` candidates of every group: exactly the set a depth-``n`` retrieval
        gives (every feature is per candidate; rank and gap only read earlier positions)."""
        return replace(
            self,
            ids=self.ids[:, :n],
            scores=self.scores[:, :n],
            features=self.features[:, :n],
            labels=self.labels[:, :n],
        )


def retrieve_candidates(
    data: SequenceData,
    retriever,
    items: ItemFeatures,
    split: str,
    n_candidates: int,
    *,
    users: np.ndarray | None = None,
    batch_size: int = 256,
) -> CandidateSet:
    """Candidates for ``split`` ("valid" or "test") of ``users`` (default: every eval user).

    Per user this does what ``service.recommender`` does per request: the encoder window,
    the ONNX embedding, an index search deep enough to survive the removal of seen items,
    the removal, the first N; then ``service.ranking.head_inputs``. The request time is the
    held-out event's time.
    """
    all_users, all_ends, all_targets = data.eval_examples(split)
    if users is None:
        rows = np.arange(len(all_users))
    else:
        position = {u: i for i, u in enumerate(all_users.tolist())}
        rows = np.array([position[u] for u in np.asarray(users).tolist()], dtype=np.int64)
    tasks = task_names(data)
    vectors = retriever.index.vectors
    parts: dict[str, list] = {k: [] for k in ("ids", "scores", "user", "features", "labels")}
    names: list[str] = items.names
    for lo in range(0, len(rows), batch_size):
        chosen = rows[lo : lo + batch_size]
        user_ids, ends, targets = all_users[chosen], all_ends[chosen], all_targets[chosen]
        starts = data.offsets[user_ids]
        window, deltas = left_padded_window(
            data.items, data.timestamps, starts, ends, retriever.max_len
        )
        embedding = retriever.encoder.encode(window, deltas)  # (b, d)
        seen = [np.unique(data.items[s:e]) for s, e in zip(starts, ends, strict=True)]
        depth = min(data.n_items, n_candidates + max(len(s) for s in seen))
        found_scores, found = retriever.index.search(embedding, depth)
        ids = np.zeros((len(chosen), n_candidates), dtype=np.int64)
        scores = np.full((len(chosen), n_candidates), -np.inf, dtype=np.float32)
        kept = drop_seen(list(found), list(found_scores), seen, [n_candidates] * len(seen))
        for row, (kept_ids, kept_scores) in enumerate(kept):
            ids[row, : len(kept_ids)] = kept_ids
            scores[row, : len(kept_ids)] = kept_scores
        history_ids, history_ts = left_padded_events(
            data.items, data.timestamps, starts, ends, HISTORY_WINDOW
        )
        inputs = head_inputs(
            embedding,
            ids,
            scores,
            vectors,
            history_ids=history_ids,
            history_ts=history_ts,
            request_time=data.timestamps[ends],
            items=items,
        )
        names = inputs.feature_names
        watched = (ids == targets[:, None]) & (ids > 0)
        labels = [watched]
        if data.ratings is not None:
            labels.append(watched & (data.ratings[ends] >= LIKED_THRESHOLD)[:, None])
        parts["ids"].append(ids)
        parts["scores"].append(scores)
        parts["user"].append(embedding.astype(np.float32))
        parts["features"].append(inputs.features)
        parts["labels"].append(np.stack(labels, axis=-1).astype(np.float32))
    dim = int(vectors.shape[1])
    empty = {
        "ids": np.zeros((0, n_candidates), np.int64),
        "scores": np.zeros((0, n_candidates), np.float32),
        "user": np.zeros((0, dim), np.float32),
        "features": np.zeros((0, n_candidates, len(names)), np.float32),
        "labels": np.zeros((0, n_candidates, len(tasks)), np.float32),
    }
    joined = {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}
    return CandidateSet(
        users=all_users[rows],
        targets=all_targets[rows],
        feature_names=names,
        tasks=tasks,
        **joined,
    )


# --------------------------------------------------------------------------- evaluation

# (user (b, d), candidates (b, c, d), features (b, c, f)) -> logits (b, c, t) or (b, c)
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def torch_scorer(head: CtrHeadModel) -> Scorer:
    """Score with the PyTorch head: all task logits (b, c, t)."""

    def score(user: np.ndarray, candidates: np.ndarray, features: np.ndarray) -> np.ndarray:
        head.eval()
        with torch.no_grad():
            out = head(
                torch.from_numpy(np.ascontiguousarray(user)),
                torch.from_numpy(np.ascontiguousarray(candidates)),
                torch.from_numpy(np.ascontiguousarray(features)),
            )
        return out.numpy()

    return score


def score_set(
    scorer: Scorer, candidates: CandidateSet, vectors: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Logits (g, c, t) of every candidate (t = 1 for a single-output scorer such as ONNX)."""
    out = []
    for lo in range(0, len(candidates.ids), batch_size):
        ids = candidates.ids[lo : lo + batch_size]
        cand = candidate_vectors(vectors, ids)
        logits = scorer(
            candidates.user[lo : lo + batch_size], cand, candidates.features[lo : lo + batch_size]
        )
        out.append(logits if logits.ndim == 3 else logits[..., None])
    if not out:
        return np.zeros((0, candidates.ids.shape[1], 1), np.float32)
    return np.concatenate(out)


def candidate_vectors(vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The item vectors of candidate ids (b, c) as (b, c, d) float32, empty slots zero."""
    out = np.asarray(vectors[ids.ravel()], dtype=np.float32).reshape(*ids.shape, vectors.shape[1])
    out[ids == 0] = 0.0
    return out


def classification_report(scorer: Scorer, candidates: CandidateSet, vectors: np.ndarray) -> dict:
    """AUC and log loss per task over every real candidate of the groups whose true item
    was retrieved (the distribution trained on), beside the retrieval score's AUC."""
    hit = candidates.hit
    result: dict = {
        "groups": int(len(hit)),
        "hit_rate": float(hit.mean()) if len(hit) else float("nan"),
        "candidates": int(candidates.ids.shape[1]),
    }
    subset = candidates.take(np.flatnonzero(hit))
    logits = score_set(scorer, subset, vectors)
    real = subset.ids > 0
    for k, task in enumerate(subset.tasks):
        if k >= logits.shape[-1]:
            break
        labels = subset.labels[..., k][real]
        result[task] = {
            "auc": roc_auc(labels, logits[..., k][real]),
            "log_loss": log_loss(labels, logits[..., k][real]),
            "retrieval_auc": roc_auc(labels, subset.scores[real]),
            "positive_rate": float(labels.mean()) if len(labels) else float("nan"),
        }
    return result


def rerank_ranks(logits: np.ndarray, ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target after ordering by logits (ties: retrieval order)."""
    logits = np.where(ids > 0, logits, -np.inf)
    order = np.argsort(-logits, axis=1, kind="stable")
    reordered = np.take_along_axis(ids, order, axis=1)
    return first_match(reordered, targets)


def first_match(ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Position of each target in its row, ``ids.shape[1]`` (a miss) when absent."""
    match = ids == targets[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), ids.shape[1])


def rerank_quality(
    scorer: Scorer,
    test: CandidateSet,
    vectors: np.ndarray,
    depths: Sequence[int] = (100, 200),
    cutoff: int = CUTOFF,
) -> dict:
    """NDCG@10/Recall@10 on the test events: retrieval order vs reranked, at each depth.

    ``test`` holds at least ``max(depths)`` candidates per user with the seen items already
    removed; a depth's list is its first ``depth`` candidates.
    """
    if test.ids.shape[1] < max(depths):
        raise CtrError(f"the test set holds {test.ids.shape[1]} candidates, need {max(depths)}")
    logits = score_set(scorer, test.first(max(depths)), vectors)[..., 0]
    result: dict = {"users": int(len(test.ids))}
    for depth in depths:
        ids = test.ids[:, :depth]
        retrieval = first_match(ids, test.targets)
        reranked = rerank_ranks(logits[:, :depth], ids, test.targets)
        result[str(depth)] = {
            "retrieval": metrics_from_ranks(retrieval, (cutoff,), mrr=False),
            "reranked": metrics_from_ranks(reranked, (cutoff,), mrr=False),
            "recall@depth": float((retrieval < depth).mean()) if len(ids) else float("nan"),
        }
    return result


# --------------------------------------------------------------------------- training


@dataclass
class PreparedCtr:
    """Retrieval done once per dataset, shared by the optimisers being compared."""

    retriever: object
    items: ItemFeatures
    valid: CandidateSet  # candidates for the valid event of the chosen users
    test: CandidateSet  # candidates for the test event, depth max(candidates, test_depth)
    train_users: np.ndarray  # user indices whose valid groups train the head
    stop_users: np.ndarray  # ... that pick the best epoch
    holdout_users: np.ndarray  # ... that are only evaluated
    subsampled: bool

    def holdout_valid(self) -> CandidateSet:
        """The valid groups of the held-out users: neither trained on nor used to pick the
        epoch (what ``training.rerank_gate`` decides on)."""
        return self.valid.take(_rows_of(self.valid, self.holdout_users))


def prepare_ctr_data(
    data: SequenceData, retriever_source, config: CtrConfig, test_depth: int = 0
) -> PreparedCtr:
    """Retrieve the valid and test candidates of the (sub)sampled users and split them."""
    retriever, catalogue = resolve_retriever(retriever_source, config.encoder)
    if catalogue is not None and catalogue.raw_ids.tolist() != data.item_map.raw.tolist():
        raise CtrError("the bundle's items are not the items of the data given")
    users = data.eval_users()
    rng = np.random.default_rng(config.seed)
    subsampled = bool(config.max_users and config.max_users < len(users))
    if subsampled:
        users = np.sort(rng.choice(users, config.max_users, replace=False))
    if len(users) < 3:
        raise CtrError("fewer than three evaluation users: nothing to train a head on")
    items = training_item_features(data)
    started = time.perf_counter()
    batch = config.encode_batch
    valid = retrieve_candidates(
        data, retriever, items, "valid", config.candidates, users=users, batch_size=batch
    )
    depth = max(config.candidates, test_depth)
    test = retrieve_candidates(data, retriever, items, "test", depth, users=users, batch_size=batch)
    LOG.info(
        "retrieved candidates for %d users in %.1fs", len(users), time.perf_counter() - started
    )
    shuffled = rng.permutation(users)
    n_holdout = max(1, int(round(config.holdout * len(users))))
    holdout, rest = shuffled[:n_holdout], shuffled[n_holdout:]
    n_stop = int(round(config.early_stopping * len(rest)))
    stop, train = rest[:n_stop], rest[n_stop:]
    return PreparedCtr(
        retriever=retriever,
        items=items,
        valid=valid,
        test=test,
        train_users=np.sort(train),
        stop_users=np.sort(stop),
        holdout_users=np.sort(holdout),
        subsampled=subsampled,
    )


def _rows_of(candidates: CandidateSet, users: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(candidates.users, users))


class HeadBatch(NamedTuple):
    """One training step's candidate groups as tensors."""

    user: torch.Tensor  # (b, d)
    candidates: torch.Tensor  # (b, c, d) item vectors, zero in empty slots
    features: torch.Tensor  # (b, c, f)
    labels: torch.Tensor  # (b, c, t)
    real: torch.Tensor  # (b, c) 1.0 where a slot holds a candidate


def _batch_tensors(
    candidates: CandidateSet,
    rows: np.ndarray,
    vectors: np.ndarray,
    negatives: int,
    rng: np.random.Generator,
) -> HeadBatch:
    ids = candidates.ids[rows]
    features = candidates.features[rows]
    labels = candidates.labels[rows]
    if negatives and negatives + 1 < ids.shape[1]:
        # Keep the positive and `negatives` random negatives per group.
        keys = rng.random(ids.shape)
        keys[labels[..., 0] > 0] = -1.0
        keys[ids == 0] = 2.0
        columns = np.sort(np.argsort(keys, axis=1)[:, : negatives + 1], axis=1)
        ids = np.take_along_axis(ids, columns, axis=1)
        features = np.take_along_axis(features, columns[..., None], axis=1)
        labels = np.take_along_axis(labels, columns[..., None], axis=1)
    return HeadBatch(
        user=torch.from_numpy(candidates.user[rows]),
        candidates=torch.from_numpy(candidate_vectors(vectors, ids)),
        features=torch.from_numpy(np.ascontiguousarray(features)),
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
        real=torch.from_numpy(ids > 0).float(),
    )


def task_losses(head: CtrHeadModel, batch: HeadBatch) -> list[torch.Tensor]:
    """Binary cross-entropy per task over the real candidate slots."""
    logits = head(batch.user, batch.candidates, batch.features)  # (b, c, t)
    count = batch.real.sum().clamp(min=1.0)
    return [
        (
            F.binary_cross_entropy_with_logits(
                logits[..., k], batch.labels[..., k], reduction="none"
            )
            * batch.real
        ).sum()
        / count
        for k in range(logits.shape[-1])
    ]


def fit_head(
    train: CandidateSet, stop: CandidateSet | None, vectors: np.ndarray, config: CtrConfig
) -> tuple[CtrHeadModel, list[dict], int]:
    """Train on the groups of ``train`` whose true item was retrieved; keep the epoch with
    the lowest mean task log loss on ``stop`` (the last epoch without one)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train = train.take(np.flatnonzero(train.hit))
    if len(train.ids) == 0:
        raise CtrError("no training group has its true item among the candidates")
    real = train.ids > 0
    rows = train.features[real]  # (m, f)
    head = CtrHeadModel(
        CtrHeadConfig(
            dim=int(vectors.shape[1]),
            feature_names=list(train.feature_names),
            tasks=list(train.tasks),
            interaction=config.interaction,
            cross_layers=config.cross_layers,
            deep=tuple(config.deep),
            tower=config.tower,
            dropout=config.dropout,
        )
    )
    head.set_feature_stats(rows.mean(axis=0), rows.std(axis=0))
    head.set_base_rates(train.labels[real].mean(axis=0))
    optimizer = build_optimizer(
        config.optimizer,
        head.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        n_tasks=len(head.config.tasks),
    )
    stop = stop.take(np.flatnonzero(stop.hit)) if stop is not None else None
    history: list[dict] = []
    best = (math.inf, 0, None)
    for epoch in range(1, config.epochs + 1):
        head.train()
        order = rng.permutation(len(train.ids))
        totals = np.zeros(len(train.tasks))
        steps = 0
        for lo in range(0, len(order), config.batch_size):
            batch = _batch_tensors(
                train, order[lo : lo + config.batch_size], vectors, config.negatives, rng
            )
            losses = task_losses(head, batch)
            optimizer_step(optimizer, losses)
            totals += [loss.item() for loss in losses]
            steps += 1
        record = {
            "epoch": epoch,
            "loss": dict(zip(train.tasks, (totals / steps).tolist(), strict=True)),
        }
        if stop is not None and len(stop.ids):
            logits = score_set(torch_scorer(head), stop, vectors)
            real_stop = stop.ids > 0
            stop_loss = float(
                np.mean(
                    [
                        log_loss(stop.labels[..., k][real_stop], logits[..., k][real_stop])
                        for k in range(len(stop.tasks))
                    ]
                )
            )
            record["stop_log_loss"] = stop_loss
        else:
            stop_loss = -epoch  # no early-stopping set: the last epoch wins
        if stop_loss < best[0]:
            best = (stop_loss, epoch, copy.deepcopy(head.state_dict()))
        history.append(record)
        LOG.info("ctr epoch %d %s", epoch, record)
    head.load_state_dict(best[2])
    head.eval()
    return head, history, best[1]


def train_ctr_head(
    data: SequenceData,
    retriever_source,
    config: CtrConfig | None = None,
    prepared: PreparedCtr | None = None,
) -> tuple[CtrHeadModel, dict]:
    """Train a head on the valid groups of the training users; evaluate it.

    ``retriever_source``: a bundle folder, a ``service.bundle.Retriever`` or
    ``RetrieverParts``. ``prepared`` reuses the retrieval of an earlier call (same data).
    The report holds AUC and log loss per task on the held-out users' valid groups and on
    every chosen user's test event, each beside the retrieval score's own AUC.
    """
    config = config or CtrConfig()
    prepared = prepared or prepare_ctr_data(data, retriever_source, config)
    vectors = prepared.retriever.index.vectors
    valid = prepared.valid.first(config.candidates)
    train = valid.take(_rows_of(valid, prepared.train_users))
    stop = valid.take(_rows_of(valid, prepared.stop_users)) if len(prepared.stop_users) else None
    holdout = valid.take(_rows_of(valid, prepared.holdout_users))
    started = time.perf_counter()
    head, history, best_epoch = fit_head(train, stop, vectors, config)
    seconds = time.perf_counter() - started
    scorer = torch_scorer(head)
    test = prepared.test.first(config.candidates)
    report = {
        "config": asdict(config),
        "tasks": list(valid.tasks),
        "features": list(valid.feature_names),
        "served_task": valid.tasks[0],
        "users": {
            "train": int(len(prepared.train_users)),
            "early_stopping": int(len(prepared.stop_users)),
            "holdout": int(len(prepared.holdout_users)),
            "subsampled": prepared.subsampled,
        },
        "train_groups": int(train.hit.sum()),
        "train_candidates": int((train.ids[train.hit] > 0).sum()),
        "best_epoch": best_epoch,
        "train_seconds": seconds,
        "history": history,
        "holdout_valid": classification_report(scorer, holdout, vectors),
        "test": classification_report(scorer, test, vectors),
        "test_holdout_users": classification_report(
            scorer, test.take(_rows_of(test, prepared.holdout_users)), vectors
        ),
    }
    return head, report
