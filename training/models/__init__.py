"""User encoders behind one interface (``training.models.base.UserEncoder``)."""

from __future__ import annotations

from dataclasses import asdict, fields

from training.errors import ConfigError
from training.models.base import UserEncoder
from training.models.hstu import HSTU, HSTUConfig
from training.models.nextitnet import NextItNet, NextItNetConfig
from training.models.sasrec import SASRec, SASRecConfig
from training.models.two_tower import TwoTower, TwoTowerConfig

ENCODERS: dict[str, tuple[type[UserEncoder], type]] = {
    "sasrec": (SASRec, SASRecConfig),
    "nextitnet": (NextItNet, NextItNetConfig),
    "two_tower": (TwoTower, TwoTowerConfig),
    "hstu": (HSTU, HSTUConfig),
}


def encoder_options(kind: str) -> set[str]:
    """The options an encoder of ``kind`` takes: its config's fields but ``n_items``."""
    if kind not in ENCODERS:
        raise ConfigError(f"unknown model {kind!r}; choose from {', '.join(ENCODERS)}")
    return {f.name for f in fields(ENCODERS[kind][1])} - {"n_items"}


def build_encoder(kind: str, n_items: int, **options) -> UserEncoder:
    """Build an encoder of ``kind`` for ``n_items``; options not in its config, or not a
    number where the config has one, are an error."""
    unknown = set(options) - encoder_options(kind)
    if unknown:
        raise ConfigError(f"{kind} has no option(s) {', '.join(sorted(unknown))}")
    model_cls, config_cls = ENCODERS[kind]
    numeric = {f.name: f.type for f in fields(config_cls) if f.type in NUMBERS}
    for key, value in options.items():
        if key in numeric and not _is_number(value, NUMBERS[numeric[key]]):
            raise ConfigError(
                f"{kind} option {key} must be a number ({numeric[key]}), not {value!r}"
            )
    return model_cls(config_cls(n_items=n_items, **options))


# The config fields' annotations (strings: the configs use postponed annotations).
NUMBERS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float)}


def _is_number(value, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def encoder_config(model: UserEncoder) -> dict:
    """The config dict a checkpoint stores so that ``build_encoder`` can rebuild the model."""
    return asdict(model.config)
