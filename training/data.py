"""Interaction logs in, chronological per-user sequences out.

Loaders read MovieLens (``ratings.dat`` with ``::``, ml-100k ``u.data``), the Amazon
sequence files (one line of items per user plus an aligned line of timestamps) and
generic CSV/Parquet tables with the columns ``user``, ``item``, ``timestamp`` and an
optional ``rating``. Every loader returns :class:`Interactions`; :func:`build_sequences`
turns those into :class:`SequenceData` (id maps, events sorted per user, the
leave-last-out split) which the trainer, the evaluator and the exporter share.

A malformed file raises :class:`DataFormatError` naming the file, the line and the
problem. With ``skip_malformed=True`` bad lines are skipped and counted in
``Interactions.skipped`` instead; nothing is ever dropped silently.

A ``--data`` spec names one of these loaders or the synthetic generator; it is resolved
by ``training.datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from service.histories import PAD, left_padded_window  # noqa: F401  (re-exported)
from training.errors import DataError, DataFormatError, DataSpecError

LOG = logging.getLogger(__name__)


@dataclass
class ItemMetadata:
    """Titles and genres keyed by raw item id (both optional per item)."""

    titles: dict[str, str] = field(default_factory=dict)
    genres: dict[str, list[str]] = field(default_factory=dict)

    def record(self, raw_id: str) -> dict:
        """One item's metadata as ``service.item_metadata`` reads it (title, genres)."""
        return {"title": self.titles.get(raw_id), "genres": self.genres.get(raw_id)}


@dataclass
class Interactions:
    """A raw interaction log in file order; ids are raw (strings or integers)."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray  # int64 seconds
    ratings: np.ndarray | None = None  # float32
    source: str = ""
    metadata: ItemMetadata | None = None
    skipped: int = 0

    def __post_init__(self) -> None:
        n = len(self.users)
        if len(self.items) != n or len(self.timestamps) != n:
            raise ValueError("users, items and timestamps must have the same length")
        if self.ratings is not None and len(self.ratings) != n:
            raise ValueError("ratings must have one value per interaction")
        if n == 0:
            raise DataError(f"{self.source or 'data'}: no interactions")

    def __len__(self) -> int:
        return len(self.users)


# --------------------------------------------------------------------------- parsing


def _open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _numbered_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its end); blank lines are skipped."""
    try:
        with _open_text(path, encoding) as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, f"not valid {encoding} text ({exc.reason})") from exc
    except (OSError, EOFError) as exc:
        raise DataFormatError(path, None, f"cannot be read ({exc})") from exc


def parse_timestamp(text: str) -> int:
    """Seconds since the epoch from an integer, a float or an ISO-8601 string."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"timestamp {text!r} is neither seconds nor ISO-8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return int(moment.timestamp())
    if not math.isfinite(value):
        raise ValueError(f"timestamp {text!r} is not finite")
    return int(value)


def _parse_rating(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"rating {text!r} is not finite")
    return value


class _Rows:
    """Collects parsed rows and enforces the skip-or-fail policy in one place."""

    def __init__(self, path: Path, skip_malformed: bool, with_ratings: bool):
        self.path = path
        self.skip_malformed = skip_malformed
        self.users: list = []
        self.items: list = []
        self.timestamps: list[int] = []
        self.ratings: list[float] | None = [] if with_ratings else None
        self.skipped = 0

    def bad(self, line: int, problem: str) -> None:
        if not self.skip_malformed:
            raise DataFormatError(self.path, line, problem)
        self.skipped += 1

    def add(self, line: int, user: str, item: str, ts: str, *, rating: str | None = None) -> None:
        user, item = user.strip(), item.strip()
        if not user:
            return self.bad(line, "empty user id")
        if not item:
            return self.bad(line, "empty item id")
        try:
            stamp = parse_timestamp(ts)
            value = _parse_rating(rating) if self.ratings is not None and rating else None
        except ValueError as exc:
            return self.bad(line, str(exc))
        if self.ratings is not None:
            if value is None:
                return self.bad(line, "missing rating")
            self.ratings.append(value)
        self.users.append(user)
        self.items.append(item)
        self.timestamps.append(stamp)

    def build(self, source: str, metadata: ItemMetadata | None = None) -> Interactions:
        if self.skipped:
            LOG.warning("%s: skipped %d malformed lines", self.path, self.skipped)
        if not self.users:
            raise DataFormatError(self.path, None, "no interactions in file")
        return Interactions(
            users=np.asarray(self.users),
            items=np.asarray(self.items),
            timestamps=np.asarray(self.timestamps, dtype=np.int64),
            ratings=None if self.ratings is None else np.asarray(self.ratings, np.float32),
            source=source,
            metadata=metadata,
            skipped=self.skipped,
        )


def _read_separated(path: Path, sep: str, rows: _Rows, encoding: str = "utf-8") -> None:
    """MovieLens layout: user, item, rating, timestamp."""
    for number, line in _numbered_lines(path, encoding):
        parts = line.split(sep)
        if len(parts) != 4:
            rows.bad(number, f"expected 4 fields separated by {sep!r}, got {len(parts)}")
            continue
        user, item, rating, ts = parts
        rows.add(number, user, item, ts, rating=rating)


# --------------------------------------------------------------------------- loaders


def _pick_file(path: Path, names: list[str], what: str) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise DataSpecError(f"{path}: no {what} file (looked for {', '.join(names)})")
    raise DataSpecError(f"{path}: no such file or directory")


def load_movielens_1m(path: str | Path, skip_malformed: bool = False) -> Interactions:
    """MovieLens-1M/10M ``UserID::MovieID::Rating::Timestamp`` (plain or gzipped).

    ``movies.dat`` beside the ratings (latin-1, ``MovieID::Title::Genres``) adds titles
    and genres.
    """
    ratings_path = _pick_file(Path(path), ["ratings.dat", "ratings.dat.gz"], "ratings")
    rows = _Rows(ratings_path, skip_malformed, with_ratings=True)
    _read_separated(ratings_path, "::", rows)
    metadata = _read_item_metadata(
        ratings_path.parent / "movies.dat",
        "::",
        n_fields=3,
        genres=lambda parts: [g for g in parts[2].split("|") if g],
    )
    return rows.build(f"ml-1m:{ratings_path}", metadata)


ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def load_movielens_100k(path: str | Path, skip_malformed: bool = False) -> Interactions:
    """MovieLens-100k ``u.data`` (tab-separated user, item, rating, timestamp).

    ``u.item`` beside it adds titles and the 19 genre flags.
    """
    data_path = _pick_file(Path(path), ["u.data"], "u.data")
    rows = _Rows(data_path, skip_malformed, with_ratings=True)
    _read_separated(data_path, "\t", rows)
    metadata = _read_item_metadata(
        data_path.parent / "u.item",
        "|",
        n_fields=5 + len(ML100K_GENRES),
        genres=lambda parts: [
            g for g, flag in zip(ML100K_GENRES, parts[5:], strict=True) if flag == "1"
        ],
    )
    return rows.build(f"ml-100k:{data_path}", metadata)


def _read_item_metadata(
    path: Path, sep: str, *, n_fields: int, genres: Callable[[list[str]], list[str]]
) -> ItemMetadata | None:
    """Titles and genres from a MovieLens item file (latin-1; id, title, ...), None if absent.

    ``genres`` picks an item's genres from its ``n_fields`` fields.
    """
    if not path.is_file():
        return None
    metadata = ItemMetadata()
    for number, line in _numbered_lines(path, encoding="latin-1"):
        parts = line.split(sep)
        if len(parts) != n_fields:
            raise DataFormatError(path, number, f"expected {n_fields} fields, got {len(parts)}")
        metadata.titles[parts[0]] = parts[1]
        metadata.genres[parts[0]] = genres(parts)
    return metadata


def load_amazon_sequences(
    items_path: str | Path, times_path: str | Path, skip_malformed: bool = False
) -> Interactions:
    """Per-user sequence files: ``user i1 i2 ...`` and, aligned line by line, ``user t1 t2 ...``."""
    items_path, times_path = Path(items_path), Path(times_path)
    rows = _Rows(items_path, skip_malformed, with_ratings=False)
    item_lines = _numbered_lines(items_path)
    time_lines = _numbered_lines(times_path)
    aligned = _zip_aligned(item_lines, time_lines, items_path, times_path)
    for (number, item_line), time_entry in aligned:
        time_number, time_line = time_entry
        items = item_line.split()
        times = time_line.split()
        if items[0] != times[0]:
            rows.bad(
                number,
                f"user {items[0]!r} does not match user {times[0]!r} on {times_path}:{time_number}",
            )
            continue
        if len(items) != len(times):
            rows.bad(
                number,
                f"{len(items) - 1} items but {len(times) - 1} timestamps on "
                f"{times_path}:{time_number}",
            )
            continue
        for item, ts in zip(items[1:], times[1:], strict=True):
            rows.add(number, items[0], item, ts)
    return rows.build(f"amazon:{items_path}")


def _zip_aligned(
    first: Iterator, second: Iterator, first_path: Path, second_path: Path
) -> Iterator:
    sentinel = object()
    while True:
        a = next(first, sentinel)
        b = next(second, sentinel)
        if a is sentinel and b is sentinel:
            return
        if a is sentinel or b is sentinel:
            # Name the file that has the extra line, at that line.
            path, number = (second_path, b[0]) if a is sentinel else (first_path, a[0])
            raise DataFormatError(
                path, number, "the item and timestamp files have different line counts"
            )
        yield a, b


def load_csv(path: str | Path, skip_malformed: bool = False) -> Interactions:
    """CSV (or TSV, sniffed) with a header naming user, item, timestamp and optionally rating."""
    path = Path(path)
    if not path.is_file():
        raise DataSpecError(f"{path}: no such file")
    with _open_text(path) as handle:
        try:
            sample = handle.read(4096)
        except UnicodeDecodeError as exc:
            raise DataFormatError(path, None, f"not valid utf-8 ({exc.reason})") from exc
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t;")
    except csv.Error:
        # A few malformed lines near the top defeat the sniffer's consistency check; the
        # header alone still shows the delimiter, so those lines are reported by number.
        header_line = sample.splitlines()[0] if sample else ""
        try:
            dialect = csv.Sniffer().sniff(header_line, delimiters=",\t;")
        except csv.Error:
            dialect = csv.excel
    with _open_text(path) as handle:
        reader = csv.reader(handle, dialect)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise DataFormatError(path, 1, "empty file, expected a header") from None
        except UnicodeDecodeError as exc:
            raise DataFormatError(path, 1, f"not valid utf-8 ({exc.reason})") from exc
        columns = _column_positions(path, header)
        rows = _Rows(path, skip_malformed, with_ratings="rating" in columns)
        try:
            for record in reader:
                number = reader.line_num
                if not record or not any(f.strip() for f in record):
                    continue
                if len(record) != len(header):
                    rows.bad(number, f"expected {len(header)} fields, got {len(record)}")
                    continue
                rating = record[columns["rating"]] if "rating" in columns else None
                rows.add(
                    number,
                    record[columns["user"]],
                    record[columns["item"]],
                    record[columns["timestamp"]],
                    rating=rating,
                )
        except UnicodeDecodeError as exc:
            raise DataFormatError(
                path, reader.line_num + 1, f"not valid utf-8 ({exc.reason})"
            ) from exc
        except csv.Error as exc:
            raise DataFormatError(path, reader.line_num, str(exc)) from exc
    return rows.build(f"csv:{path}")


def _column_positions(path: Path, header: list[str]) -> dict[str, int]:
    missing = [c for c in ("user", "item", "timestamp") if c not in header]
    if missing:
        raise DataFormatError(
            path, 1, f"missing column(s) {', '.join(missing)}; header is {', '.join(header)}"
        )
    return {c: header.index(c) for c in ("user", "item", "timestamp", "rating") if c in header}


def load_parquet(path: str | Path, skip_malformed: bool = False) -> Interactions:
    """Parquet with columns user, item, timestamp (integer seconds) and optionally rating."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import pyarrow.types as pat

    path = Path(path)
    if not path.is_file():
        raise DataSpecError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataFormatError(path, None, f"not a readable Parquet file ({exc})") from exc
    names = [n.lower() for n in table.column_names]
    columns = _column_positions(path, names)
    keep = np.ones(table.num_rows, dtype=bool)
    arrays = {}
    for name, index in columns.items():
        column = table.column(index)
        nulls = np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False))
        if nulls.any():
            first = int(np.flatnonzero(nulls)[0])
            if not skip_malformed:
                raise DataFormatError(path, None, f"row {first + 1}: column {name} is null")
            keep &= ~nulls
        arrays[name] = column
    skipped = int((~keep).sum())
    if skipped:
        # Drop the rows in Arrow: converting an integer column with nulls to numpy would
        # turn it into floats, and the raw ids of every other row into "1.0", "2.0", ...
        mask = pa.array(keep)
        arrays = {name: column.filter(mask) for name, column in arrays.items()}
    users = np.asarray(arrays["user"].to_numpy(zero_copy_only=False))
    items = np.asarray(arrays["item"].to_numpy(zero_copy_only=False))
    ts_column = arrays["timestamp"]
    if not (pat.is_integer(ts_column.type) or pat.is_floating(ts_column.type)):
        raise DataFormatError(
            path, None, f"column timestamp has type {ts_column.type}, expected integer seconds"
        )
    timestamps = np.asarray(ts_column.to_numpy(zero_copy_only=False)).astype(np.int64)
    ratings = None
    if "rating" in arrays:
        ratings = np.asarray(arrays["rating"].to_numpy(zero_copy_only=False))
        ratings = ratings.astype(np.float32)
    if skipped:
        LOG.warning("%s: skipped %d rows with nulls", path, skipped)
    return Interactions(users, items, timestamps, ratings, f"parquet:{path}", skipped=skipped)


# --------------------------------------------------------------------------- sequences


@dataclass
class IdMap:
    """Raw id <-> contiguous internal id; internal 0 is padding, raw ids are strings."""

    raw: np.ndarray  # raw[i] is the raw id of internal id i; raw[0] == "" (padding)

    @classmethod
    def fit(cls, raw_ids: np.ndarray) -> tuple[IdMap, np.ndarray]:
        """Map ``raw_ids`` to internal ids 1..N (sorted raw order); return the map and ids."""
        unique, inverse = np.unique(raw_ids, return_inverse=True)
        raw = np.concatenate([np.array([""]), unique.astype(str)])
        return cls(raw=raw), inverse.astype(np.int64) + 1

    def __len__(self) -> int:
        """Number of real ids, padding excluded."""
        return len(self.raw) - 1


@dataclass
class SequenceData:
    """Events grouped per user in chronological order, with the leave-last-out split.

    Events of user ``u`` are ``items[offsets[u]:offsets[u + 1]]``. Ties in time keep file
    order. The last event of each user with at least three events is the test target, the
    second last the validation target; everything before is training data.
    """

    user_map: IdMap
    item_map: IdMap
    offsets: np.ndarray  # int64 [U + 1]
    items: np.ndarray  # int64 [E], internal ids 1..N
    timestamps: np.ndarray  # int64 [E]
    ratings: np.ndarray | None
    source: str = ""
    metadata: ItemMetadata | None = None

    MIN_EVENTS_FOR_EVAL = 3

    @property
    def n_items(self) -> int:
        return len(self.item_map)

    @property
    def n_users(self) -> int:
        return len(self.user_map)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def eval_users(self) -> np.ndarray:
        """Users that have a validation and a test event."""
        return np.flatnonzero(self.lengths >= self.MIN_EVENTS_FOR_EVAL)

    def train_end(self) -> np.ndarray:
        """Per user, the end (exclusive, into ``items``) of the training events."""
        held_out = np.where(self.lengths >= self.MIN_EVENTS_FOR_EVAL, 2, 0)
        return self.offsets[1:] - held_out

    def eval_examples(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, history_end, target) for ``split`` in {"valid", "test"}.

        The history of a user is ``items[offsets[u]:history_end]``; the target is the next event.
        """
        users = self.eval_users()
        ends = self.offsets[users + 1]
        if split == "test":
            history_end = ends - 1
        elif split == "valid":
            history_end = ends - 2
        else:
            raise ValueError(f"split must be 'valid' or 'test', not {split!r}")
        return users, history_end, self.items[history_end]

    def train_mask(self) -> np.ndarray:
        """Whether each event is a training event ([E] bool): all but evaluated users' last two."""
        starts, ends = self.offsets[:-1], self.train_end()
        # A difference array marks each user's training range without a Python loop.
        marks = np.zeros(len(self.items) + 1, dtype=np.int64)
        np.add.at(marks, starts, 1)
        np.add.at(marks, ends, -1)
        return np.cumsum(marks[:-1]) > 0

    def training_events(self) -> tuple[np.ndarray, np.ndarray]:
        """Item ids and timestamps of the training events, in event order."""
        mask = self.train_mask()
        return self.items[mask], self.timestamps[mask]

    def train_item_counts(self) -> np.ndarray:
        """Interaction count per internal item id over training events only ([N + 1])."""
        return np.bincount(self.items[self.train_mask()], minlength=self.n_items + 1)

    def summary(self) -> dict:
        """Counts and ranges for reports and the bundle manifest."""
        lengths = self.lengths
        return {
            "source": self.source,
            "users": int(self.n_users),
            "items": int(self.n_items),
            "interactions": int(len(self.items)),
            "eval_users": int(len(self.eval_users())),
            "density": float(len(self.items) / max(1, self.n_users * self.n_items)),
            "median_length": float(np.median(lengths)),
            "max_length": int(lengths.max()),
            "first_timestamp": int(self.timestamps.min()),
            "last_timestamp": int(self.timestamps.max()),
            "has_ratings": self.ratings is not None,
            "has_metadata": self.metadata is not None,
        }


def build_sequences(interactions: Interactions) -> SequenceData:
    """Map ids and sort events per user by time, ties kept in file order."""
    user_map, users = IdMap.fit(interactions.users)
    item_map, items = IdMap.fit(interactions.items)
    users -= 1  # users are indexed 0..U-1; only items need a padding id
    order = np.lexsort((np.arange(len(users)), interactions.timestamps, users))
    counts = np.bincount(users, minlength=len(user_map))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ratings = interactions.ratings[order] if interactions.ratings is not None else None
    return SequenceData(
        user_map=user_map,
        item_map=item_map,
        offsets=offsets,
        items=items[order],
        timestamps=interactions.timestamps[order].astype(np.int64),
        ratings=ratings,
        source=interactions.source,
        metadata=interactions.metadata,
    )
