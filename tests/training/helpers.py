"""Small helpers shared by the training tests."""

from __future__ import annotations

from training.data import PAD, IdMap


def internal_ids(id_map: IdMap) -> dict[str, int]:
    """Raw id -> internal id of every real id (padding left out)."""
    return {raw: i for i, raw in enumerate(id_map.raw.tolist()) if i != PAD}
