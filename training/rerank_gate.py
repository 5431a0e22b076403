"""Whether a retriever's CTR head reranks by default: the gate, decided per bundle at export.

    from training.rerank_gate import GateConfig, gate_head
    gate = gate_head(served_head.score, prepared.holdout_valid(), vectors, depth=200)

``training.export.add_ctr_head`` runs it on every exported head and records the result as
the retriever's ``ctr_head.gate`` in the manifest; ``python -m training export
--rerank-default auto|on|off`` chooses between the gate's decision and a forced one. The
service reads the entry (``service.bundle.rerank_policy``): a request that does not say
``rerank`` gets the bundle's default, one that does gets what it asks.

What is measured. The exported head (the ONNX graph the service runs) reranks the
candidates the exported encoder and index retrieve, at the depth it serves, for the valid
event of the users ``training.ctr`` held out of the head's training and of its
early-stopping choice: users whose events the head never saw. Per user the difference
NDCG@10(reranked) - NDCG@10(retrieval order); a user whose true item was not retrieved
counts zero both ways, as the rerank cannot change that user's answer. The test split is
never read here.

The rule. Rerank by default only when the lower end of a paired bootstrap interval of the
mean difference (users resampled with replacement, ``resamples`` times, seeded; percentile
interval at ``confidence``) lies above zero: the head is shown to help on users it never
saw. Otherwise retrieval order is served by default. The burden of proof lies on the head
because a rerank that does not help costs every request its latency and, where it hurts,
serves a worse list; retrieval order is what the retriever was chosen on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from training.ctr import CUTOFF, CandidateSet, Scorer, first_match, rerank_ranks, score_set
from training.errors import ConfigError, CtrError

LOG = logging.getLogger(__name__)

RERANK_DEFAULTS = ("auto", "on", "off")
# The manifest's name for who decided: the measurement, or the exporting operator.
DECIDED_BY_GATE = "gate"
DECIDED_BY_EXPORT = "export option"


@dataclass(frozen=True)
class GateConfig:
    """How the gate measures and decides, and whether the export overrides it."""

    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95  # of the two-sided percentile interval
    cutoff: int = CUTOFF
    # "auto": the gate decides; "on"/"off": the export's operator does (the gate's
    # measurement is recorded all the same).
    rerank_default: str = "auto"

    def __post_init__(self) -> None:
        if self.rerank_default not in RERANK_DEFAULTS:
            raise ConfigError(
                f"rerank default {self.rerank_default!r}: use {', '.join(RERANK_DEFAULTS)}"
            )
        if self.resamples < 1:
            raise ConfigError(f"bootstrap resamples {self.resamples}: need at least 1")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence {self.confidence}: need a value between 0 and 1")


def ndcg_per_user(ranks: np.ndarray, cutoff: int = CUTOFF) -> np.ndarray:
    """NDCG@cutoff of each user from the 0-based rank of its one true item (a rank at or
    past the cut-off, a miss included, gives 0): ``training.evaluate.metrics_from_ranks``
    before its mean."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < cutoff
    return np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0.0) + 2.0), 0.0)


def paired_bootstrap(
    differences: np.ndarray, resamples: int, seed: int, confidence: float
) -> tuple[float, float]:
    """The percentile interval at ``confidence`` of the mean of ``differences`` (one per
    user, each user's two measurements already paired), users resampled with replacement.

    Drawn in blocks so that a large validation set does not hold ``resamples`` x users
    indices at once."""
    differences = np.asarray(differences, dtype=np.float64)
    n = len(differences)
    if n == 0:
        raise ValueError("no users to resample")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, (1 << 22) // n)  # about 32 MB of int64 indices per block
    for lo in range(0, resamples, block):
        count = min(block, resamples - lo)
        means[lo : lo + count] = differences[rng.integers(0, n, (count, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def decide(retrieval: np.ndarray, reranked: np.ndarray, config: GateConfig) -> dict:
    """The gate's manifest entry from per-user NDCG in retrieval order and reranked (the
    same users, in the same order): the numbers, the interval and the decision with its
    reason (see the module docstring for the rule)."""
    retrieval = np.asarray(retrieval, dtype=np.float64)
    reranked = np.asarray(reranked, dtype=np.float64)
    if retrieval.shape != reranked.shape or retrieval.ndim != 1:
        raise ValueError(f"unpaired NDCG arrays of shapes {retrieval.shape}, {reranked.shape}")
    n = len(retrieval)
    percent = f"{config.confidence:.0%}"
    metric = f"NDCG@{config.cutoff}"
    entry: dict = {
        "validation_users": int(n),
        "split": "valid",
        "cutoff": config.cutoff,
        "resamples": config.resamples,
        "seed": config.seed,
        "confidence": config.confidence,
        "rule": f"rerank by default when the {percent} paired bootstrap interval of the mean "
        f"per-user {metric} difference (reranked - retrieval order) lies above 0",
    }
    if n == 0:
        measured = False
        reason = "no validation users held out of the head's training: nothing shows it helps"
        entry.update(ndcg_retrieval=None, ndcg_reranked=None, delta=None, ci=None)
    else:
        differences = reranked - retrieval
        low, high = paired_bootstrap(differences, config.resamples, config.seed, config.confidence)
        entry.update(
            ndcg_retrieval=float(retrieval.mean()),
            ndcg_reranked=float(reranked.mean()),
            delta=float(differences.mean()),
            ci=[low, high],
        )
        measured = low > 0.0
        change = (
            f"{metric} {entry['ndcg_retrieval']:.4f} in retrieval order, "
            f"{entry['ndcg_reranked']:.4f} reranked on {n} validation users the head never "
            f"trained on (difference {entry['delta']:+.4f}, {percent} interval "
            f"[{low:+.4f}, {high:+.4f}])"
        )
        if measured:
            reason = f"{change}: the rerank helps, so it is on by default"
        elif high < 0.0:
            reason = f"{change}: the rerank hurts, so retrieval order is served by default"
        else:
            reason = f"{change}: no gain shown, so retrieval order is served by default"
    entry["gate_decision"] = measured
    if config.rerank_default == "auto":
        entry.update(rerank_by_default=measured, decided_by=DECIDED_BY_GATE, reason=reason)
    else:
        forced = config.rerank_default == "on"
        entry.update(
            rerank_by_default=forced,
            decided_by=DECIDED_BY_EXPORT,
            reason=f"set {config.rerank_default} at export (--rerank-default "
            f"{config.rerank_default}); the gate measured {reason}",
        )
    return entry


def per_user_ndcg(
    scorer: Scorer | Callable, candidates: CandidateSet, vectors: np.ndarray, cutoff: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user NDCG@cutoff of ``candidates`` in retrieval order and reordered by the
    served task's logits of ``scorer`` (ties keep retrieval order)."""
    logits = score_set(scorer, candidates, vectors)[..., 0]  # (g, c)
    retrieval = first_match(candidates.ids, candidates.targets)
    reranked = rerank_ranks(logits, candidates.ids, candidates.targets)
    return ndcg_per_user(retrieval, cutoff), ndcg_per_user(reranked, cutoff)


def gate_head(
    scorer: Scorer | Callable,
    validation: CandidateSet,
    vectors: np.ndarray,
    depth: int,
    config: GateConfig | None = None,
) -> dict:
    """Decide whether the head behind ``scorer`` reranks by default, from its effect on
    the first ``depth`` candidates of ``validation`` (the valid groups of users the head
    never trained on); the manifest's ``ctr_head.gate`` entry, ``depth`` included."""
    config = config or GateConfig()
    if validation.ids.shape[1] < depth:
        raise CtrError(
            f"the validation set holds {validation.ids.shape[1]} candidates, not {depth}"
        )
    retrieval, reranked = per_user_ndcg(scorer, validation.first(depth), vectors, config.cutoff)
    entry = {**decide(retrieval, reranked, config), "depth": int(depth)}
    LOG.info("rerank gate: %s", entry["reason"])
    return entry


def verdict_on_test(rerank_by_default: bool, test_delta: float, test_ci: list[float]) -> str:
    """Whether a gate's decision was right on the test events, for benchmarks (the gate
    itself never sees them): right when it reranks and the rerank raised test NDCG@10, or
    serves retrieval order and the rerank did not; "clearly" when the test's own interval
    excludes zero, "within noise" when it does not."""
    helped = test_delta > 0.0
    right = rerank_by_default == helped
    certain = test_ci[0] > 0.0 or test_ci[1] < 0.0
    return f"{'right' if right else 'wrong'} ({'clearly' if certain else 'within noise'})"
