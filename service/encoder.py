"""User encoding at serving time: an exported ONNX user encoder run by onnxruntime.

Inputs are ``item_ids`` int64 (b, L), left-padded with 0, and ``time_deltas`` float32
(b, L) in seconds (see ``service.histories``); the output is the L2-normalised
``user_embedding`` float32 (b, d).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from service.devices import onnx_session

LOG = logging.getLogger(__name__)


class OnnxUserEncoder:
    """One onnxruntime session over a user encoder graph."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 1):
        self.path = Path(path)
        self.session = onnx_session(path, device, threads)
        self.providers = self.session.get_providers()

    def encode(self, item_ids: np.ndarray, time_deltas: np.ndarray) -> np.ndarray:
        """User embeddings (b, d) for left-padded histories (b, L)."""
        (embedding,) = self.session.run(
            ["user_embedding"],
            {
                "item_ids": np.ascontiguousarray(item_ids, dtype=np.int64),
                "time_deltas": np.ascontiguousarray(time_deltas, dtype=np.float32),
            },
        )
        return embedding
