"""Small helpers shared by the training tests."""

from __future__ import annotations

from training.data import PAD, IdMap
from training.trainer import sequence_loss


def internal_ids(id_map: IdMap) -> dict[str, int]:
    """Raw id -> internal id of every real id (padding left out)."""
    return {raw: i for i, raw in enumerate(id_map.raw.tolist()) if i != PAD}


def losses_of_steps(model, objective, batch: tuple, optimizer, steps: int) -> list[float]:
    """The sequence loss of ``steps`` optimizer steps on one batch, step by step."""
    losses = []
    for _ in range(steps):
        loss = sequence_loss(model, objective, *batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
