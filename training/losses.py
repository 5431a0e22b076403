"""Training objectives for user encoders.

Every loss takes the user states at the positions that have a target, ``(p, d)``, the
target item ids ``(p,)`` and the item embedding table ``(N + 1, d)`` (row 0 = padding).

- ``full_softmax_loss``: cross-entropy over every item; the reference where the catalogue
  is small enough to score all items at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax_loss(
    states: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` against all items; padding is never a class."""
    logits = states @ item_table[1:].T  # (p, N)
    return F.cross_entropy(logits, targets - 1)
