"""``--data`` specs: the one place a dataset named on a command line becomes Interactions.

    ml-1m:PATH        directory or ratings.dat[.gz]   (movies.dat beside it adds metadata)
    ml-100k:PATH      directory or u.data             (u.item beside it adds metadata)
    amazon:PATH       directory with *_item.txt[.gz] and *_time.txt[.gz], or "ITEMS,TIMES"
    csv:PATH          header with user,item,timestamp[,rating]
    parquet:PATH      the same columns
    synthetic[:k=v,...]   the embedded generator, e.g. synthetic:users=500,seed=3

Kinds are case-insensitive (``ml-10m`` and ``movielens`` read like ``ml-1m``). The files are
read by the loaders of ``training.data``, the synthetic log made by ``training.synthetic``.
A spec that cannot be understood or points at nothing raises ``DataSpecError``; a
malformed file ``DataFormatError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from training.data import (
    Interactions,
    load_amazon_sequences,
    load_csv,
    load_movielens_1m,
    load_movielens_100k,
    load_parquet,
)
from training.errors import DataSpecError
from training.synthetic import SyntheticConfig, generate


def load_dataset(spec: str, skip_malformed: bool = False) -> Interactions:
    """Load interactions from a data spec such as ``ml-1m:/data/ml-1m`` or ``synthetic``."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "synthetic":
        return generate(synthetic_config(rest))
    if not rest:
        raise DataSpecError(f"data spec {spec!r} needs a path: KIND:PATH")
    if kind not in LOADERS:
        raise DataSpecError(
            f"unknown data kind {kind!r} in {spec!r}; "
            "use ml-1m, ml-100k, amazon, csv, parquet or synthetic"
        )
    return LOADERS[kind](Path(rest).expanduser(), skip_malformed)


def synthetic_config(options: str) -> SyntheticConfig:
    """Parse the options of a synthetic spec, ``users=100,items=50,seed=3`` (empty: defaults)."""
    known = {f.name: f.type for f in fields(SyntheticConfig)}
    values = {}
    for part in filter(None, (p.strip() for p in options.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise DataSpecError(
                f"synthetic option {part!r} not understood; known: {', '.join(known)}"
            )
        try:
            values[key] = float(value) if known[key] == "float" else int(value)
        except ValueError:
            raise DataSpecError(f"synthetic option {key} needs a number, got {value!r}") from None
    config = SyntheticConfig(**values)
    if config.users < 1 or config.items < 10:
        raise DataSpecError("synthetic data needs at least 1 user and 10 items")
    return config


def load_amazon(path: Path, skip_malformed: bool = False) -> Interactions:
    """The Amazon sequence files of a directory, or of an ``ITEMS,TIMES`` pair."""
    return load_amazon_sequences(*_amazon_files(path), skip_malformed=skip_malformed)


def _amazon_files(path: Path) -> tuple[Path, Path]:
    if "," in str(path):
        first, second = str(path).split(",", 1)
        for part in (first, second):
            if not Path(part).is_file():
                raise DataSpecError(f"{part}: no such file")
        return Path(first), Path(second)
    if not path.is_dir():
        raise DataSpecError(f"{path}: expected a directory or 'ITEMS,TIMES'")
    items = sorted(path.glob("*_item.txt*"))
    times = sorted(path.glob("*_time.txt*"))
    if len(items) != 1 or len(times) != 1:
        raise DataSpecError(f"{path}: expected one *_item.txt[.gz] and one *_time.txt[.gz]")
    return items[0], times[0]


# kind -> loader(path, skip_malformed)
LOADERS: dict[str, Callable[[Path, bool], Interactions]] = {
    "ml-1m": load_movielens_1m,
    "ml-10m": load_movielens_1m,
    "movielens": load_movielens_1m,
    "ml-100k": load_movielens_100k,
    "amazon": load_amazon,
    "csv": load_csv,
    "parquet": load_parquet,
}
