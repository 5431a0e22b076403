"""User encoders behind one interface (``training.models.base.UserEncoder``)."""

from __future__ import annotations

from dataclasses import asdict, fields

from training.errors import ConfigError
from training.models.base import UserEncoder
from training.models.nextitnet import NextItNet, NextItNetConfig
from training.models.sasrec import SASRec, SASRecConfig
from training.models.two_tower import TwoTower, TwoTowerConfig

ENCODERS: dict[str, tuple[type[UserEncoder], type]] = {
    "sasrec": (SASRec, SASRecConfig),
    "nextitnet": (NextItNet, NextItNetConfig),
    "two_tower": (TwoTower, TwoTowerConfig),
}


def encoder_options(kind: str) -> set[str]:
    """The options an encoder of ``kind`` takes: its config's fields but ``n_items``."""
    if kind not in ENCODERS:
        raise ConfigError(f"unknown model {kind!r}; choose from {', '.join(ENCODERS)}")
    return {f.name for f in fields(ENCODERS[kind][1])} - {"n_items"}


def build_encoder(kind: str, n_items: int, **options) -> UserEncoder:
    """Build an encoder of ``kind`` for ``n_items``; options not in its config are an error."""
    unknown = set(options) - encoder_options(kind)
    if unknown:
        raise ConfigError(f"{kind} has no option(s) {', '.join(sorted(unknown))}")
    model_cls, config_cls = ENCODERS[kind]
    try:
        return model_cls(config_cls(n_items=n_items, **options))
    except TypeError as exc:  # an option of the wrong type, e.g. a string for dim
        raise ConfigError(f"bad option for model {kind!r}: {exc}") from exc


def encoder_config(model: UserEncoder) -> dict:
    """The config dict a checkpoint stores so that ``build_encoder`` can rebuild the model."""
    return asdict(model.config)
