"""The flags that configure training, declared once for ``python -m training`` and the
benchmark scripts (``bench/train_quality.py``, ``rerank_quality.py``, ``make_perf_bundle.py``).

Four groups, each added by one function:

    data      --data, --skip-malformed
    model     --model, --max-len, --dim, --layers, --heads, --dropout, --no-time,
              --model-option
    training  --loss, --loss-option, --epochs, --batch-size, --lr, --weight-decay,
              --patience, --eval-every, --max-seconds, --windows, --window-stride,
              --width-groups, --seed, --device, --threads, --augment, --augment-option
    bundle    --models-dir, --index, --index-device, --nprobe, --rescore

A script adds a group whole, or names the flags of it that it takes (a benchmark suite
that picks the model itself leaves out ``--model``); it changes defaults with
``parser.set_defaults``. ``train_config``, ``model_options``, ``loss_options``,
``augment_options`` and ``index_options`` turn the parsed flags into what the trainer and
the exporter take.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from training.augment import AUGMENTATIONS
from training.errors import ConfigError
from training.losses import OBJECTIVES
from training.models import ENCODERS, encoder_options
from training.trainer import DEFAULT_WINDOWS, WINDOW_MODES, TrainConfig

DATA_FLAGS: dict[str, dict] = {
    "--data": dict(
        help="KIND:PATH with KIND in ml-1m, ml-100k, amazon, csv, parquet; or synthetic[:k=v,...]"
    ),
    "--skip-malformed": dict(
        action="store_true",
        help="skip malformed lines (their count is reported) instead of failing",
    ),
}

MODEL_FLAGS: dict[str, dict] = {
    "--model": dict(default="sasrec", help=f"encoder: {', '.join(ENCODERS)}"),
    "--max-len": dict(type=int, default=50, help="events of history the encoder reads"),
    "--dim": dict(type=int, default=64, help="embedding width"),
    # None: the model's own default; only SASRec and HSTU have layers and heads.
    "--layers": dict(type=int, default=None, help="sasrec, hstu: blocks (default 2)"),
    "--heads": dict(type=int, default=None, help="sasrec, hstu: heads (default 2)"),
    "--dropout": dict(type=float, default=0.2),
    "--no-time": dict(action="store_true", help="ignore time intervals"),
    "--model-option": dict(
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the model's config, e.g. --model-option n_stacks=3 (repeatable)",
    ),
}

TRAINING_FLAGS: dict[str, dict] = {
    "--loss": dict(default="full_softmax", help=f"objective: {', '.join(OBJECTIVES)}"),
    "--loss-option": dict(
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the loss, e.g. --loss-option temperature=0.1 (repeatable)",
    ),
    "--epochs": dict(type=int, default=20),
    "--batch-size": dict(type=int, default=128),
    "--lr": dict(type=float, default=1e-3),
    "--weight-decay": dict(type=float, default=0.0),
    "--patience": dict(
        type=int, default=5, help="evaluations without a better valid NDCG@10 before stopping"
    ),
    "--eval-every": dict(type=int, default=1, help="epochs between evaluations"),
    "--max-seconds": dict(
        type=float,
        default=0.0,
        help="stop after the epoch that passes this many seconds of training (0: no limit)",
    ),
    "--windows": dict(
        default=None,
        choices=WINDOW_MODES,
        help="which windows of each user's training events an epoch trains on: last (the "
        "newest max-len), crop (a random max-len of a longer history, new each epoch), "
        "sliding (every event a target once per epoch); default: "
        + ", ".join(f"{mode} for {model}" for model, mode in DEFAULT_WINDOWS.items())
        + ", last otherwise",
    ),
    "--window-stride": dict(
        type=int,
        default=0,
        help="sliding: new targets per window (0: max-len; less: the rest is context)",
    ),
    "--width-groups": dict(
        type=int,
        default=1,
        help="the encoder reads each batch in up to N groups of windows of similar width: "
        "the same batch and loss, less padding computed on short, uneven histories "
        "(1: one pass)",
    ),
    "--seed": dict(type=int, default=0),
    "--device": dict(default="cpu", help="torch device of training, e.g. cuda"),
    "--threads": dict(type=int, default=0, help="torch threads (0: torch's default)"),
    "--augment": dict(
        dest="augmentation",
        default=None,
        choices=AUGMENTATIONS,
        help="ticoserec: a contrastive term between two time-interval-aware augmented views "
        "of each window beside the next-item loss (default: none)",
    ),
    "--augment-option": dict(
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the augmentation, e.g. --augment-option weight=0.2 (repeatable): "
        "weight, temperature, rate, p_insert, p_replace, p_crop, p_reorder",
    ),
}

BUNDLE_FLAGS: dict[str, dict] = {
    "--models-dir": dict(type=Path, default=Path("models"), help="the folder of bundles"),
    "--index": dict(
        default="auto",
        help="auto, or a faiss factory string such as Flat, OPQ16,IVF1024,PQ16x8, HNSW32",
    ),
    "--index-device": dict(
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="where the service will search the index; auto: a GPU if faiss sees one here",
    ),
    "--nprobe": dict(type=int, default=None, help="IVF lists visited per query"),
    "--rescore": dict(type=int, default=None, help="shortlist re-scored exactly"),
}


def add_data_flags(
    parser: argparse.ArgumentParser,
    *flags: str,
    default: str | None = None,
    required: bool = True,
) -> None:
    """``--data`` (required unless a ``default`` spec is given or ``required`` is false: the
    command then checks it) and ``--skip-malformed``."""
    options = {"--data": {"required": required} if default is None else {"default": default}}
    _add_group(parser, "data", DATA_FLAGS, flags, options)


def add_model_flags(
    parser: argparse.ArgumentParser, *flags: str, models: tuple[str, ...] | None = None
) -> None:
    """The encoder and its size; ``models`` limits ``--model`` to those kinds."""
    options = {}
    if models:
        options["--model"] = {"choices": list(models), "help": f"encoder: {', '.join(models)}"}
    _add_group(parser, "model", MODEL_FLAGS, flags, options)


def add_training_flags(parser: argparse.ArgumentParser, *flags: str) -> None:
    """The objective and the optimisation: epochs, batches, learning rate, early stopping."""
    _add_group(parser, "training", TRAINING_FLAGS, flags)


def add_bundle_flags(parser: argparse.ArgumentParser, *flags: str) -> None:
    """Where bundles live and the index an export builds."""
    _add_group(parser, "bundle", BUNDLE_FLAGS, flags)


def _add_group(
    parser: argparse.ArgumentParser,
    title: str,
    group_flags: dict[str, dict],
    chosen: tuple[str, ...],
    overrides: dict[str, dict] | None = None,
) -> None:
    """Add ``chosen`` flags of a group (all of them when none is named)."""
    unknown = set(chosen) - set(group_flags)
    if unknown:
        raise ValueError(f"the {title} flags have no {', '.join(sorted(unknown))}")
    group = parser.add_argument_group(title)
    for name, options in group_flags.items():
        if not chosen or name in chosen:
            group.add_argument(name, **{**options, **(overrides or {}).get(name, {})})


# --------------------------------------------------------------------------- parsed flags

# TrainConfig fields set by flags of the model and training groups (named alike); a
# script's own flags must not use these names.
TRAIN_FIELDS = tuple(
    f.name
    for f in fields(TrainConfig)
    if f.name not in ("model_options", "loss_options", "augment_options")
)


def train_config(args: argparse.Namespace, **fixed) -> TrainConfig:
    """A TrainConfig from the flags the parser has; ``fixed`` sets fields a script decides
    itself (a suite's model, loss and seed). Fields without either keep their defaults.

    The model options are checked against the model first: a typo fails before any data
    is read.
    """
    values = {name: getattr(args, name) for name in TRAIN_FIELDS if hasattr(args, name)}
    values.update(fixed)
    model = values.get("model", TrainConfig.model)
    values.setdefault("model_options", model_options(args, model))
    values.setdefault("loss_options", loss_options(args))
    values.setdefault("augment_options", augment_options(args))
    return TrainConfig(**values)


def model_options(args: argparse.Namespace, model: str) -> dict:
    """The model options of the model flags the parser has; one ``model`` lacks is an error."""
    options = {}
    for flag, key in (("max_len", "max_len"), ("dim", "dim"), ("dropout", "dropout")):
        if hasattr(args, flag):
            options[key] = getattr(args, flag)
    if hasattr(args, "no_time"):
        options["use_time"] = not args.no_time
    for flag, key in (("layers", "n_layers"), ("heads", "n_heads")):
        if getattr(args, flag, None) is not None:
            options[key] = getattr(args, flag)
    options.update(key_values(getattr(args, "model_option", []), "--model-option"))
    unknown = set(options) - encoder_options(model)
    if unknown:
        raise ConfigError(f"--model {model} has no option(s) {', '.join(sorted(unknown))}")
    return options


def loss_options(args: argparse.Namespace) -> dict:
    """The ``--loss-option`` pairs (none when the parser has no such flag)."""
    return key_values(getattr(args, "loss_option", []), "--loss-option")


def augment_options(args: argparse.Namespace) -> dict:
    """The ``--augment-option`` pairs (none when the parser has no such flag)."""
    return key_values(getattr(args, "augment_option", []), "--augment-option")


def index_options(args: argparse.Namespace) -> dict:
    """Overrides of the index spec: ``--nprobe`` and ``--rescore`` where given."""
    return {
        key: getattr(args, key)
        for key in ("nprobe", "rescore")
        if getattr(args, key, None) is not None
    }


def key_values(pairs: list[str], flag: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` with numbers and booleans parsed."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = json.loads(value) if _is_json_scalar(value) else value
    return options


def _is_json_scalar(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (int, float, bool))
    except ValueError:
        return False
