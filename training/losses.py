"""Training objectives for user encoders.

An objective scores user states against items and returns a scalar loss. It is called
with the states at the positions that have a target, ``(p, d)``, the target item ids
``(p,)`` and the raw item embedding table ``(N + 1, d)`` (row 0 = padding). Objectives
are modules because some keep state between batches (the cross-batch memory); ``reset``
clears that state.

``cosine`` tells whether the objective scores by cosine similarity: the exported item
vectors are then L2-normalised so that retrieval ranks as training scored.

- ``full_softmax``: cross-entropy over every item; the reference where the catalogue is
  small enough to score all items at every step.
- ``sampled_softmax``: cross-entropy over the batch's own targets as negatives, with the
  logQ correction for their popularity-biased sampling (Yi et al., RecSys'19).
- ``cbns_softmax``: the same plus a FIFO memory of item vectors from recent batches as
  extra negatives (cross-batch negative sampling, Wang et al., SIGIR'21).
- ``ccl``: SimpleX's cosine contrastive loss with many uniform negatives (Mao et al.,
  CIKM'21).

Choose one with ``python -m training train --loss NAME --loss-option KEY=VALUE ...``.

``nt_xent_loss`` is not a next-item objective: it is the contrastive term between two
augmented views of each sequence that ``--augment`` adds beside one (``training.augment``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.errors import ConfigError


class Objective(nn.Module):
    """Base class; subclasses implement ``forward(states, targets, item_table)``."""

    cosine: bool = False

    def reset(self) -> None:
        """Forget state carried between batches (none by default)."""


class FullSoftmax(Objective):
    """Mean cross-entropy of the targets against all items; padding is never a class."""

    def forward(
        self, states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor
    ) -> torch.Tensor:
        logits = states @ item_table[1:].T  # (p, N)
        return F.cross_entropy(logits, targets - 1)


def log_sampling_probabilities(item_counts: np.ndarray) -> torch.Tensor:
    """log Q(i) for ids 0..N, Q proportional to the training count of item i.

    In-batch negatives are the batch's targets, so an item turns up as a negative in
    proportion to its count. An item with no training count cannot turn up, but it counts
    as seen once so that the table holds no -inf (padding row 0 included).
    """
    counts = np.maximum(np.asarray(item_counts, dtype=np.float64), 1.0)
    return torch.from_numpy(np.log(counts / counts[1:].sum())).float()


class CrossBatchNegatives:
    """A FIFO memory of item ids, and their vectors, from recent batches (Wang et al., SIGIR'21).

    ``push`` appends a batch's item vectors (stored detached: the memory is a constant for
    later batches, no gradient reaches it) and drops the oldest entries beyond
    ``memory_size``. ``negatives`` returns the stored entries once ``warmup_steps`` pushes
    have been made, and None before: early in training the item vectors move so fast that
    stored ones would be misleading negatives (the "embedding drift" of the paper).

    ``max_age`` bounds that drift in steps: an entry pushed more than ``max_age`` pushes
    ago is no longer returned (1: only the previous batch's). ``refresh`` keeps the ids
    only and reads their vectors from the current item table at each use, with the
    gradient, as for in-batch negatives: an encoder whose item vectors are rows of a table
    pays a gather for that, not an item tower's forward pass (what the paper's memory
    saves), and gets negatives that are neither stale nor cut off from the gradient, so
    they push the items down as well as the states away.
    """

    def __init__(
        self,
        memory_size: int,
        warmup_steps: int,
        *,
        max_age: int | None = None,
        refresh: bool = False,
    ):
        check_count("memory_size", memory_size, minimum=1)
        check_count("warmup_steps", warmup_steps, minimum=0)
        if max_age is not None:
            check_count("max_age", max_age, minimum=1)
        check_flag("refresh", refresh)
        self.memory_size = memory_size
        self.warmup_steps = warmup_steps
        self.max_age = max_age
        self.refresh = refresh
        self.reset()

    def reset(self) -> None:
        """Empty the memory and start the warm-up again."""
        self.steps = 0
        self.vectors: torch.Tensor | None = None  # (m, d), oldest first; None with refresh
        self.ids: torch.Tensor | None = None  # (m,)
        self.pushed_at: torch.Tensor | None = None  # (m,) the step each entry came in

    def __len__(self) -> int:
        return 0 if self.ids is None else len(self.ids)

    def push(self, vectors: torch.Tensor, ids: torch.Tensor) -> None:
        """Append one batch's (n, d) vectors and (n,) ids; count one step."""
        ids = ids.detach()
        pushed_at = torch.full_like(ids, self.steps)
        if self.ids is not None:
            ids = torch.cat([self.ids, ids])
            pushed_at = torch.cat([self.pushed_at, pushed_at])
        self.ids = ids[-self.memory_size :]
        self.pushed_at = pushed_at[-self.memory_size :]
        if not self.refresh:
            vectors = vectors.detach()
            if self.vectors is not None:
                vectors = torch.cat([self.vectors, vectors])
            self.vectors = vectors[-self.memory_size :]
        self.steps += 1

    def negatives(self, item_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (vectors (m, d), ids (m,)) to use now; None during the warm-up or when empty.

        ``item_table`` is the current table: with ``refresh`` the vectors are its rows.
        """
        if self.steps < self.warmup_steps or self.ids is None:
            return None
        ids = self.ids
        keep = None
        if self.max_age is not None:
            # The previous push has age 1 now: self.steps counts the pushes made so far.
            keep = self.steps - self.pushed_at <= self.max_age
            ids = ids[keep]
            if len(ids) == 0:
                return None
        if self.refresh:
            return item_table[ids], ids
        return (self.vectors if keep is None else self.vectors[keep]), ids


def is_count(value, minimum: int) -> bool:
    """Whether ``value`` is an integer (a bool is not) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_count(name: str, value, *, minimum: int) -> None:
    """Refuse a count option below ``minimum`` or not an integer, naming the option."""
    if not is_count(value, minimum):
        raise ConfigError(
            f"{name} (--loss-option {name}=N) must be an integer of at least {minimum}, "
            f"not {value!r}"
        )


def check_flag(name: str, value) -> None:
    """Refuse a yes/no option that is not a boolean, naming the option."""
    if not isinstance(value, bool):
        raise ConfigError(
            f"{name} (--loss-option {name}=true|false) must be a boolean, not {value!r}"
        )


class SampledSoftmax(Objective):
    """Softmax over in-batch (and optionally cross-batch) negatives with logQ correction.

    For a position with state u and target y, negatives j drawn from the batch's targets
    (up to ``max_negatives`` of them, picked uniformly among the p positions) and, with a
    memory, the stored items of recent batches::

        s(j) = u . v_j / temperature - log Q(j)        (- log Q(j) only with ``logq``)
        loss = -log( exp(s(y)) / (exp(s(y)) + sum_{j != y} exp(s(j))) )

    averaged over positions. Negatives with the same id as the position's target (the same
    item as another position's target, or in the memory) are left out of its sum. Repeats
    of other items are kept on purpose: the batch draws items with probability Q, and
    exp(s - log Q) summed over such draws estimates the full softmax's denominator, which
    de-duplicating would bias towards rare items.

    ``temperature`` 1.0: the logits are dot products whose scale the model learns (item
    norms are free), so another constant would only be absorbed by the weights; 1.0 keeps
    the logits on ``full_softmax``'s scale, so switching objectives changes nothing else.
    ``max_negatives`` 1024 bounds the (p, n) logits (p is every position of the batch,
    6400 at batch 128 and length 50) while still drawing many samples from Q.
    ``memory_logq`` false leaves the memory's columns without the ``- log Q`` term
    (``cross_batch_softmax``); an option of a memory only.
    """

    def __init__(
        self,
        item_counts: np.ndarray,
        *,
        temperature: float = 1.0,
        logq: bool = True,
        max_negatives: int = 1024,
        memory: CrossBatchNegatives | None = None,
        memory_logq: bool = True,
    ):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, not {temperature}")
        self.temperature = temperature
        self.logq = logq
        self.max_negatives = max_negatives
        self.memory = memory
        check_flag("memory_logq", memory_logq)
        if memory is None and not memory_logq:
            raise ConfigError("memory_logq applies to the memory of cbns_softmax only")
        self.memory_logq = memory_logq
        self.register_buffer("log_q", log_sampling_probabilities(item_counts), persistent=False)

    def reset(self) -> None:
        if self.memory is not None:
            self.memory.reset()

    def logits(
        self, states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (p, 1 + n + m) logits, target first, then the n in-batch negatives and the m
        memory ones; with the n in-batch (vectors, ids) to push."""
        batch_ids = targets
        if len(targets) > self.max_negatives:
            # A uniform pick of positions is still a draw from Q, so logQ stays right.
            pick = torch.randperm(len(targets), device=targets.device)[: self.max_negatives]
            batch_ids = targets[pick]
        batch_vectors = item_table[batch_ids]  # (n, d)
        ids, vectors = batch_ids, batch_vectors
        stored = self.memory.negatives(item_table) if self.memory is not None else None
        if stored is not None:
            vectors = torch.cat([vectors, stored[0]])  # (n + m, d)
            ids = torch.cat([ids, stored[1]])
        positive = (states * item_table[targets]).sum(-1) / self.temperature  # (p,)
        negative = states @ vectors.T / self.temperature  # (p, n + m)
        if self.logq:
            positive = positive - self.log_q[targets]
            log_q = self.log_q[ids]
            if not self.memory_logq:
                log_q = log_q.clone()
                log_q[len(batch_ids) :] = 0.0  # the memory's columns go uncorrected
            negative = negative - log_q
        # An accidental hit (the row's own target among the negatives, in the batch or in
        # the memory) is not a negative.
        negative = negative.masked_fill(ids[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([positive[:, None], negative], dim=1)  # (p, 1 + n + m)
        return logits, batch_vectors, batch_ids

    def forward(
        self, states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor
    ) -> torch.Tensor:
        logits, batch_vectors, batch_ids = self.logits(states, targets, item_table)
        loss = F.cross_entropy(logits, torch.zeros_like(targets))
        if self.memory is not None and self.training:
            self.memory.push(batch_vectors, batch_ids)
        return loss


# The next-item probability above which CCL lifts an item past the margin (see
# CosineContrastiveLoss): below the probability a trained encoder gives its likelier next
# items on MovieLens, so that those are ranked; a smaller one lets a state pull up so many
# items that their order is lost again (measured in docs/BENCHMARKS.md, CCL).
CCL_ITEM_WEIGHT = 0.003


class CosineContrastiveLoss(Objective):
    """SimpleX's cosine contrastive loss (CCL), Mao et al., CIKM'21, set for next-item targets.

    With cos the cosine similarity of the state u with an item vector::

        loss = (1 - cos(u, v_y)) + w * mean_j max(0, cos(u, v_j) - margin)

    averaged over positions, over ``n_negatives`` items drawn uniformly from the catalogue
    (shared by the positions of a batch; a draw equal to a position's target is left out of
    its mean), plus the batch's targets with ``in_batch``. Uniform as in SimpleX: only
    negatives already closer than the margin count, so the loss itself picks the hard ones
    out of many cheap uniform draws, and tail items get pushed away as often as popular
    ones.

    Why the defaults are not SimpleX's (margin 0.9, weight 150). In expectation over the
    uniform draws the hinge weighs every item of the catalogue by ``w / N`` for every state
    (the number of draws only sets the variance), while the positive term weighs an item
    by its probability of being the state's next item. So for one state and one item the
    loss is lowest with the item at cosine 1 when that probability exceeds ``w / N``, and
    at exactly the margin when it is positive but below: the loss ranks nothing below the
    threshold. SimpleX's weight was tuned for collaborative filtering on catalogues of
    tens of thousands of items, where each of a user's items is a likely positive. A next
    item is far less certain, and at ``w / N`` of that size no item clears the threshold
    for any history: every item is then held at the margin for every state, which an encoder meets
    most cheaply by giving every history the same state, with the items on a cone around
    it (a high margin makes that cone narrow). ``bench/ccl_diagnostics.py`` shows the
    collapse; docs/BENCHMARKS.md has the measurements.

    Hence ``negative_weight`` defaults to ``item_weight * N``: the next-item probability
    above which an item is lifted past the margin stays ``item_weight`` whatever the size
    of the catalogue. The margin defaults to 0, so that the items held at it lie
    orthogonal to a state rather than on a cone around it. ``negative_weight`` set
    explicitly keeps SimpleX's meaning (the weight of the mean over the draws).
    """

    cosine = True

    def __init__(
        self,
        n_items: int,
        *,
        margin: float = 0.0,
        negative_weight: float | None = None,
        item_weight: float = CCL_ITEM_WEIGHT,
        n_negatives: int = 1000,
        in_batch: bool = False,
    ):
        super().__init__()
        if not -1.0 < margin < 1.0:
            raise ConfigError(f"margin must lie in (-1, 1), not {margin}")
        if negative_weight is None:
            if item_weight <= 0:
                raise ConfigError(f"item_weight must be positive, not {item_weight}")
            negative_weight = item_weight * n_items
        self.n_items = n_items
        self.margin = margin
        self.negative_weight = negative_weight
        self.n_negatives = n_negatives
        self.in_batch = in_batch

    def forward(
        self,
        states: torch.Tensor,
        targets: torch.Tensor,
        item_table: torch.Tensor,
        negative_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``negative_ids`` (n,) replaces the uniform draw (tests fix the negatives with it)."""
        if negative_ids is None:
            negative_ids = torch.randint(
                1, self.n_items + 1, (self.n_negatives,), device=targets.device
            )
        if self.in_batch:
            negative_ids = torch.cat([negative_ids, targets])
        users = F.normalize(states, dim=-1)  # (p, d)
        positive = (users * F.normalize(item_table[targets], dim=-1)).sum(-1)  # (p,)
        negative = users @ F.normalize(item_table[negative_ids], dim=-1).T  # (p, n)
        keep = (negative_ids[None, :] != targets[:, None]).to(negative.dtype)  # (p, n)
        hinge = F.relu(negative - self.margin) * keep
        mean_hinge = hinge.sum(-1) / keep.sum(-1).clamp(min=1.0)  # (p,)
        return (1.0 - positive + self.negative_weight * mean_hinge).mean()


def nt_xent_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between two views of a batch (NT-Xent, Chen et al., ICML'20): ``first`` and
    ``second`` (b, d) are states of the same b sequences. Each of the 2b states scores every
    other by cosine similarity over ``temperature``; its positive is the other view of its
    sequence, the other 2b - 2 states are its negatives. Mean cross-entropy over the 2b."""
    states = F.normalize(torch.cat([first, second]), dim=-1)  # (2b, d)
    logits = states @ states.T / temperature  # (2b, 2b)
    self_pair = torch.eye(len(states), dtype=torch.bool, device=states.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    b = len(first)
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(states.device)
    return F.cross_entropy(logits, positive)


def cross_batch_softmax(
    item_counts: np.ndarray,
    memory_size: int = 4096,
    warmup_steps: int = 100,
    max_age: int | None = None,
    refresh: bool = False,
    **options,
) -> SampledSoftmax:
    """``SampledSoftmax`` (same options) with a ``CrossBatchNegatives`` memory.

    4096 entries hold the negatives of the last four batches at the default
    ``max_negatives``: several times the in-batch count, while entries stay recent enough
    that their vectors have not drifted far. 100 warm-up steps are about two epochs of
    MovieLens-1M at batch 128, past the steepest drift of the first updates. ``max_age``
    and ``refresh`` bound or remove the drift (``CrossBatchNegatives``); ``memory_logq``
    false leaves the memory's logits uncorrected (they are drawn from the batches, so by
    the same Q as the in-batch ones, and corrected like them by default).
    """
    memory = CrossBatchNegatives(memory_size, warmup_steps, max_age=max_age, refresh=refresh)
    return SampledSoftmax(item_counts, memory=memory, **options)


# name -> factory(item_counts [N + 1], **options)
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "full_softmax": lambda item_counts: FullSoftmax(),
    "sampled_softmax": SampledSoftmax,
    "cbns_softmax": cross_batch_softmax,
    "ccl": lambda item_counts, **options: CosineContrastiveLoss(len(item_counts) - 1, **options),
}


def build_objective(name: str, item_counts: np.ndarray, **options) -> Objective:
    """The objective ``name``; ``item_counts`` are training counts per item id ([N + 1])."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown loss {name!r}; choose from {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](item_counts, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for loss {name!r}: {exc}") from exc
