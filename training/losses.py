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
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


# name -> factory(item_counts [N + 1], **options)
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "full_softmax": lambda item_counts: FullSoftmax(),
}


def build_objective(name: str, item_counts: np.ndarray, **options) -> Objective:
    """The objective ``name``; ``item_counts`` are training counts per item id ([N + 1])."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](item_counts, **options)
    except TypeError as exc:
        raise ValueError(f"bad option for loss {name!r}: {exc}") from exc
