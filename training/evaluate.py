"""Full-ranking evaluation: every item is scored, the user's earlier items are masked.

For each evaluated user the target is the held-out next event (valid: second last,
test: last) and the history is everything before it. The rank of the target counts the
items scored at least as high (ties count against the model), so Recall@K is the hit rate
and NDCG@K is ``1 / log2(rank + 2)`` inside the cut-off. MRR is over the full ranking.

The popularity baseline (training-event counts) goes through the same code. The CTR head's
metrics live here too: AUC and log loss of its logits, and the same ranking metrics for
its reranked candidate lists (``training.ctr.rerank_quality``).
Run from the CLI: ``python -m training evaluate --checkpoint runs/x/checkpoint.pt --data ...``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from training.data import SequenceData, left_padded_window

LOG = logging.getLogger(__name__)

CUTOFFS = (10, 20)

# (item_ids (b, L), time_deltas (b, L)) -> scores (b, N + 1)
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target: how many other items score at least as high."""
    target_scores = scores.gather(1, targets[:, None])
    return (scores >= target_scores).sum(dim=1) - 1


def metrics_from_ranks(
    ranks: np.ndarray, cutoffs: tuple[int, ...] = CUTOFFS, *, mrr: bool = True
) -> dict[str, float]:
    """Recall@K and NDCG@K for each cut-off, and MRR, from 0-based target ranks.

    The one ranking metric of the project: the encoders' full ranking and the CTR head's
    reranking of a candidate list both report through it. A target missing from a
    truncated list may be given any rank past the cut-offs (the list's length, say);
    ``mrr=False`` leaves MRR out where such ranks would make it meaningless.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    result: dict[str, float] = {}
    for k in cutoffs:
        hit = ranks < k
        result[f"recall@{k}"] = float(hit.mean())
        # log2 only of the ranks inside the cut-off; the others count zero.
        gain = 1.0 / np.log2(np.where(hit, ranks, 0.0) + 2.0)
        result[f"ndcg@{k}"] = float(np.where(hit, gain, 0.0).mean())
    if mrr:
        result["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return result


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by rank statistics (Mann-Whitney U; ties get mean ranks).

    NaN when only one class is present.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first
    ranks = (first + (counts - 1) / 2.0)[inverse.ravel()]
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits), computed stably from logits."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def mask_seen(
    scores: torch.Tensor, data: SequenceData, starts: np.ndarray, ends: np.ndarray
) -> torch.Tensor:
    """Set the scores of padding and of every item in ``items[start:end]`` to -inf, in place."""
    lengths = ends - starts
    rows = np.repeat(np.arange(len(starts)), lengths)
    positions = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    seen = data.items[np.repeat(starts, lengths) + positions]
    scores[:, 0] = float("-inf")
    scores[torch.from_numpy(rows), torch.from_numpy(seen)] = float("-inf")
    return scores


def ranked_scores(
    scorer: Scorer,
    data: SequenceData,
    users: np.ndarray,
    history_end: np.ndarray,
    max_len: int,
    *,
    device: str = "cpu",
) -> torch.Tensor:
    """Masked scores (b, N + 1) for the histories ``items[offsets[u]:history_end]``."""
    starts = data.offsets[users]
    item_ids, deltas = left_padded_window(data.items, data.timestamps, starts, history_end, max_len)
    with torch.no_grad():
        scores = (
            scorer(torch.from_numpy(item_ids).to(device), torch.from_numpy(deltas).to(device))
            .float()
            .cpu()
        )
    return mask_seen(scores, data, starts, history_end)


def evaluate(
    scorer: Scorer,
    data: SequenceData,
    split: str = "test",
    max_len: int = 50,
    *,
    batch_size: int = 512,
    device: str = "cpu",
    cutoffs: tuple[int, ...] = CUTOFFS,
) -> dict[str, float]:
    """Full-ranking metrics of ``scorer`` on ``split`` ("valid" or "test")."""
    users, history_end, targets = data.eval_examples(split)
    ranks = []
    for lo in range(0, len(users), batch_size):
        rows = slice(lo, lo + batch_size)
        scores = ranked_scores(scorer, data, users[rows], history_end[rows], max_len, device=device)
        ranks.append(target_ranks(scores, torch.from_numpy(targets[rows])).numpy())
    result = metrics_from_ranks(np.concatenate(ranks) if ranks else np.zeros(0), cutoffs)
    result["users"] = int(len(users))
    return result


def popularity_scorer(data: SequenceData) -> Scorer:
    """Score every item by its training-event count, the same for every user."""
    counts = torch.from_numpy(data.train_item_counts().astype(np.float32))

    def score(item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        return counts[None].expand(item_ids.shape[0], -1).clone()

    return score


def model_scorer(model: torch.nn.Module) -> Scorer:
    """Inner products of the encoder's user embeddings with every item embedding."""

    def score(item_ids: torch.Tensor, time_deltas: torch.Tensor) -> torch.Tensor:
        users = model.encode_user(item_ids, time_deltas)
        return users @ model.all_item_embeddings().T

    return score
