"""User encoders behind one interface (``training.models.base.UserEncoder``)."""

from __future__ import annotations

from dataclasses import asdict, fields

from training.models.base import UserEncoder
from training.models.sasrec import SASRec, SASRecConfig

ENCODERS: dict[str, tuple[type[UserEncoder], type]] = {
    "sasrec": (SASRec, SASRecConfig),
}


def build_encoder(kind: str, n_items: int, **options) -> UserEncoder:
    """Build an encoder of ``kind`` for ``n_items``; options not in its config are an error."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown model {kind!r}; choose from {', '.join(ENCODERS)}")
    model_cls, config_cls = ENCODERS[kind]
    known = {f.name for f in fields(config_cls)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"{kind} has no option(s) {', '.join(sorted(unknown))}")
    return model_cls(config_cls(n_items=n_items, **options))


def encoder_config(model: UserEncoder) -> dict:
    """The config dict a checkpoint stores so that ``build_encoder`` can rebuild the model."""
    return asdict(model.config)
