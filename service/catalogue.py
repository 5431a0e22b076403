"""The items of a bundle: the catalogue the service serves from, its table, and filters.

``items.parquet`` holds one row per internal id 1..N (the padding row 0 is not stored):
``item_id``, ``raw_id``, ``popularity`` (training counts), and when the data has them
``title``, ``genres`` (the item's categories), ``last_seen_ts`` (the item's latest
training interaction, which the CTR head's recency feature needs) and ``available``
(false: never served). Every other column is an item attribute that requests can filter
on: a string column by equality, a numeric one by range. :func:`write_items_table`
writes the table at export, :func:`read_catalogue` reads it into a :class:`Catalogue`
when a bundle is loaded.

A request's :class:`ItemFilter` is compiled against the catalogue into an
:class:`Eligible` (a boolean mask over internal ids and its count) by
:meth:`Catalogue.eligible`, once per distinct filter: the compiled masks of the latest
filters are kept, so a filter that many requests share costs one pass over the
catalogue. Per-request item exclusions are not part of the mask (every request would
compile its own): the serving kernel drops them beside the seen items.

The catalogue API's writes (``service.live_catalogue``) give a bundle's catalogue an
overlay: :meth:`Catalogue.with_overlay` builds the catalogue served meanwhile, the bundle's
items with the written ones' metadata and availability replacing theirs, and the items
added since the export behind them (internal ids N + 1, N + 2, ...; ``n_trained`` stays N:
only ids up to it have trained vectors and are read by the encoders). A written item is an
:class:`ItemRecord`; a withdrawn one is a record too, so that a withdrawal outlives a
reload to a bundle that still has the item.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from itertools import repeat
from pathlib import Path

import numpy as np

from service.errors import BundleError, InvalidField, excerpt

# Columns with a meaning of their own; every other column of items.parquet is an attribute.
RESERVED_COLUMNS = ("item_id", "raw_id", "popularity", "title", "genres", "last_seen_ts")
AVAILABLE = "available"
NO_ITEMS = np.zeros(0, dtype=np.int64)  # shared, so an unfiltered request allocates none
NO_ITEMS.flags.writeable = False
ELIGIBLE_CACHE = 32  # compiled filters kept per catalogue (a mask is N + 1 bytes)
NAMES_SHOWN = 20  # attribute names an error message lists at most


@dataclass(frozen=True)
class ItemFilter:
    """Which items a request may be served: every condition given must hold.

    The service's form of the API's ``filter`` (``service.api.schemas.Filter``), in a
    canonical order, so that equal filters are equal, hash alike and share a compiled
    mask. ``None`` in place of a filter means ``ItemFilter()``: available items only.
    """

    include_categories: tuple[str, ...] | None = None  # in at least one of them
    exclude_categories: tuple[str, ...] = ()  # in none of them
    exclude_items: tuple[str, ...] = ()  # raw item ids
    attributes: tuple[tuple[str, str], ...] = ()  # (name, value): the string attribute equals
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()  # (name, min, max), inclusive
    available_only: bool = True

    def __post_init__(self) -> None:
        if self.include_categories is not None:
            object.__setattr__(
                self, "include_categories", tuple(sorted(set(self.include_categories)))
            )
        for name in ("exclude_categories", "exclude_items"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name)))))
        # repr orders tuples that hold None beside numbers, which < cannot compare.
        for name in ("attributes", "ranges"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name)), key=repr)))

    def key(self) -> tuple:
        """The filter as plain tuples, strings, numbers and None (for a request digest)."""
        return (
            self.include_categories,
            self.exclude_categories,
            self.exclude_items,
            self.attributes,
            self.ranges,
            self.available_only,
        )


@dataclass(frozen=True)
class ItemRecord:
    """An item as the catalogue API last wrote it (``PUT /items/{item_id}``), or its
    withdrawal (``DELETE``): metadata, availability and optional ready vectors."""

    title: str | None = None
    genres: tuple[str, ...] = ()  # its categories
    attributes: tuple[tuple[str, str], ...] = ()  # string attributes, by name
    numbers: tuple[tuple[str, float], ...] = ()  # numeric attributes, by name
    available: bool = True
    year: int | None = None  # for the metadata encoder (else read from the title)
    # Vectors per retriever, supplied by the writer for bundle ``vectors_bundle`` only: a
    # newer bundle's item spaces are other spaces.
    vectors: tuple[tuple[str, np.ndarray], ...] = ()
    vectors_bundle: str | None = None
    withdrawn: bool = False

    @property
    def served(self) -> bool:
        """Whether the item may be served at all."""
        return self.available and not self.withdrawn

    def vector_for(self, bundle: str, retriever: str) -> np.ndarray | None:
        """The writer's own vector for ``retriever`` of bundle ``bundle`` (None: not given
        for that bundle's item space)."""
        if self.vectors_bundle != bundle:
            return None
        return dict(self.vectors).get(retriever)

    def metadata(self) -> dict:
        """What the metadata encoder reads (``service.item_metadata``)."""
        return {"title": self.title, "genres": list(self.genres), "year": self.year}


@dataclass
class Eligible:
    """The items a filter keeps, compiled against one catalogue (exclusions of single
    items aside)."""

    mask: np.ndarray | None  # (N + 1,) bool, read-only, row 0 False; None: every item
    count: int  # items kept

    @cached_property
    def ids(self) -> np.ndarray:
        """The internal ids kept, ascending."""
        return np.flatnonzero(self.mask)


@dataclass
class TextAttribute:
    """A string attribute of every item, dictionary-encoded."""

    codes: np.ndarray  # (N + 1,) int32, -1 = no value (row 0 included)
    values: dict[str, int]  # value -> code

    @cached_property
    def by_code(self) -> list[str]:
        """The values in code order (code -> value)."""
        names = [""] * len(self.values)
        for value, code in self.values.items():
            names[code] = value
        return names


@dataclass
class Catalogue:
    """The items of a bundle: raw ids, popularity and optional metadata, by internal id."""

    raw_ids: np.ndarray  # (N + 1,) str, row 0 = ""
    popularity: np.ndarray  # (N + 1,) int64 training counts
    titles: list[str | None] | None = None
    genres: list[list[str]] | None = None
    lookup: dict[str, int] = field(default_factory=dict)
    last_seen: np.ndarray | None = None  # (N + 1,) int64, -1 = never
    # What filters read: each category's items (internal ids, ascending; from the genres),
    # string and numeric attributes by name, and which items may be served at all.
    categories: dict[str, np.ndarray] = field(default_factory=dict)
    text_attributes: dict[str, TextAttribute] = field(default_factory=dict)
    number_attributes: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) NaN: none
    available: np.ndarray | None = None  # (N + 1,) bool, row 0 False; None: every item is
    # The overlay of the catalogue API (see the module docstring): items added since the
    # export (raw id -> internal id > n_trained) and the withdrawn items' internal ids.
    added_lookup: dict[str, int] = field(default_factory=dict)
    withdrawn: frozenset[int] = frozenset()
    trained: int | None = None  # items with trained vectors (None: all of them)

    @property
    def n_items(self) -> int:
        return len(self.raw_ids) - 1

    @property
    def n_trained(self) -> int:
        """Items 1..n_trained are the bundle's, with trained vectors; the rest were added."""
        return self.n_items if self.trained is None else self.trained

    def internal_id(self, raw: str) -> int | None:
        """The internal id of raw id ``raw`` (None: not in the catalogue, or withdrawn)."""
        internal = self.lookup.get(raw)
        if internal is None:
            internal = self.added_lookup.get(raw)
        return None if internal is None or internal in self.withdrawn else internal

    def eligible(self, item_filter: ItemFilter | None) -> Eligible:
        """The items ``item_filter`` keeps (None: available items only), compiled once per
        distinct filter; its ``exclude_items`` are not applied here (see the module
        docstring). InvalidField naming the field for an attribute the catalogue lacks."""
        if item_filter is None:
            return self._unfiltered
        if item_filter.exclude_items:  # the mask is shared by every list of exclusions
            item_filter = replace(item_filter, exclude_items=())
        return self._compiled(item_filter)

    def describe(self, item: int) -> dict:
        """What the catalogue holds of internal id ``item``: its id, title, categories,
        attributes, availability and training popularity."""
        text = {
            name: attribute.by_code[code]
            for name, attribute in self.text_attributes.items()
            if (code := int(attribute.codes[item])) >= 0
        }
        numbers = {
            name: float(values[item])
            for name, values in self.number_attributes.items()
            if not np.isnan(values[item])
        }
        return {
            "item_id": str(self.raw_ids[item]),
            "title": self.titles[item] if self.titles else None,
            "genres": list(self.genres[item]) if self.genres else [],
            "attributes": text,
            "numbers": numbers,
            "available": bool(self.available[item]) if self.available is not None else True,
            "popularity": int(self.popularity[item]),
            "added": item > self.n_trained,
        }

    def excluded(self, item_filter: ItemFilter | None) -> np.ndarray:
        """The internal ids of the filter's ``exclude_items`` that the catalogue has,
        ascending (unknown ids exclude nothing)."""
        if item_filter is None or not item_filter.exclude_items:
            return NO_ITEMS
        ids = self.internal_ids(list(item_filter.exclude_items))
        return np.unique(ids[ids > 0])

    @cached_property
    def _unfiltered(self) -> Eligible:
        return self._compile(ItemFilter())

    @cached_property
    def _compiled(self):
        # Per catalogue, so that a reloaded bundle starts with no masks of the old one.
        return lru_cache(maxsize=ELIGIBLE_CACHE)(self._compile)

    def _compile(self, item_filter: ItemFilter) -> Eligible:
        self._check(item_filter)
        masks = []
        if item_filter.available_only and self.available is not None:
            masks.append(self.available)
        elif self.withdrawn:  # not even available_only=false brings a withdrawn item back
            present = np.ones(self.n_items + 1, dtype=bool)
            present[list(self.withdrawn)] = False
            masks.append(present)
        if item_filter.include_categories is not None:
            masks.append(self._in_categories(item_filter.include_categories))
        if item_filter.exclude_categories:
            masks.append(~self._in_categories(item_filter.exclude_categories))
        for name, value in item_filter.attributes:
            attribute = self.text_attributes[name]
            masks.append(attribute.codes == attribute.values.get(value, -2))
        for name, low, high in item_filter.ranges:
            values = self.number_attributes[name]
            # NaN (no value) fails both comparisons: an item without the attribute is out.
            within = np.ones(len(values), dtype=bool) if low is None else values >= low
            if high is not None:
                within &= values <= high
            masks.append(within)
        if not masks:
            return Eligible(None, self.n_items)
        mask = np.logical_and.reduce(masks) if len(masks) > 1 else masks[0].copy()
        mask[0] = False
        mask.flags.writeable = False
        return Eligible(mask, int(np.count_nonzero(mask)))

    def _in_categories(self, names: tuple[str, ...]) -> np.ndarray:
        inside = np.zeros(self.n_items + 1, dtype=bool)
        for name in names:
            inside[self.categories.get(name, [])] = True
        return inside

    def _check(self, item_filter: ItemFilter) -> None:
        """InvalidField for an attribute the catalogue does not have (an unknown category
        or value is no error: no item has it)."""
        self.check_attributes(
            [name for name, _ in item_filter.attributes],
            [name for name, _, _ in item_filter.ranges],
            strings="filter.attributes",
            numbers="filter.ranges",
        )

    def check_attributes(self, text: list[str], numeric: list[str], *, strings: str, numbers: str):
        """InvalidField located under ``strings`` (or ``numbers``) for a name of ``text``
        (``numeric``) that is not a string (numeric) attribute of the catalogue; what a
        filter names and what a catalogue write gives are checked alike."""
        for names, known, kind, located, other in (
            (text, self.text_attributes, "string", strings, numbers),
            (numeric, self.number_attributes, "numeric", numbers, strings),
        ):
            for name in names:
                if name not in known:
                    raise InvalidField(
                        f"{located}.{excerpt(name, quote=False)}: "
                        + self.no_attribute(name, kind, other)
                    )

    def no_attribute(self, name: str, kind: str, other: str) -> str:
        """Why ``name`` is not a ``kind`` ("string" or "numeric") attribute of the catalogue,
        pointing to ``other`` (where it would be given) when it is the other kind."""
        ours = self.text_attributes if kind == "string" else self.number_attributes
        theirs = self.number_attributes if kind == "string" else self.text_attributes
        if name in theirs:
            return f"not a {kind} attribute of the catalogue; filter it with {other}"
        names = sorted(ours)
        listed = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
        return f"the catalogue has no {kind} attribute of that name (it has: {listed or 'none'})"

    def internal_ids(self, raw: list[str]) -> np.ndarray:
        """Internal ids for raw ids; unknown ids map to 0 (padding)."""
        # map() over the dict's own get: faster than a generator for a request's ids.
        ids = np.array(list(map(self.lookup.get, raw, repeat(0, len(raw)))), dtype=np.int64)
        if self.added_lookup:
            for i in np.flatnonzero(ids == 0).tolist():
                ids[i] = self.added_lookup.get(raw[i], 0)
        return ids

    @cached_property
    def popularity_order(self) -> np.ndarray:
        """Internal ids, most popular first (ties: lower id first), padding excluded."""
        counts = self.popularity.astype(np.float64)
        counts[0] = -np.inf
        return np.argsort(-counts, kind="stable")[:-1]

    @cached_property
    def _folded_titles(self) -> list[str]:
        return [(title or "").casefold() for title in self.titles or ()]

    def search(self, text: str, limit: int) -> tuple[np.ndarray, int]:
        """Up to ``limit`` internal ids for ``text`` and how many matched in all: the item
        whose raw id is ``text``, then items whose title contains it (case-insensitive),
        most popular first; for blank ``text``, the most popular items."""
        text = text.strip()
        if not text:
            order = self.popularity_order
            if self.withdrawn:
                order = order[~np.isin(order, list(self.withdrawn))]
            return order[:limit], len(order)
        needle = text.casefold()
        titled = np.fromiter(
            (
                i
                for i, title in enumerate(self._folded_titles)
                if needle in title and i not in self.withdrawn
            ),
            np.int64,
        )
        titled = titled[np.argsort(-self.popularity[titled], kind="stable")]
        exact = self.internal_id(text)
        if exact is not None:
            titled = np.concatenate([[exact], titled[titled != exact]])
        return titled[:limit], len(titled)

    def with_overlay(self, records: dict[str, ItemRecord], added: dict[str, int]) -> Catalogue:
        """The catalogue served beside the catalogue API's ``records``: this (a bundle's)
        catalogue with each written item's metadata and availability in place of its own
        (a write replaces the item's metadata whole), and the ``added`` items (raw id ->
        internal id, exactly n_items + 1, n_items + 2, ...) behind it. Its training
        popularity and last-seen times stay the bundle's (added items: none); attributes
        the bundle lacks are not read (the API refuses them). One pass over the arrays:
        the overlay is rebuilt whole from the bundle's catalogue at each change."""
        n = self.n_items
        order = sorted(added, key=added.__getitem__)
        if [added[raw] for raw in order] != list(range(n + 1, n + 1 + len(order))):
            raise ValueError("added items must take the internal ids after the bundle's")
        m = len(order)
        total = n + m + 1
        written = {}
        for raw, record in records.items():
            internal = self.lookup.get(raw) or added.get(raw)
            if internal is not None:
                written[internal] = record

        def grown(values: np.ndarray, fill) -> np.ndarray:
            return np.concatenate([values, np.full(m, fill, dtype=values.dtype)])

        raw_ids = np.concatenate([self.raw_ids, np.array(order, dtype=object)])
        titles = genres = None
        if self.titles is not None or any(r.title for r in written.values()):
            titles = [*(self.titles or [None] * (n + 1)), *([None] * m)]
        if self.genres is not None or any(r.genres for r in written.values()):
            genres = [*(self.genres or [[]] * (n + 1)), *([[]] * m)]
        # A catalogue where every item may be served keeps no mask (the unfiltered path then
        # compiles to none), until a write makes one unavailable or withdraws it.
        available = None
        if self.available is not None or not all(r.served for r in written.values()):
            available = np.ones(n + 1, dtype=bool) if self.available is None else self.available
            available = np.concatenate([available, np.ones(m, dtype=bool)])
        text = {
            name: TextAttribute(grown(attribute.codes, -1), dict(attribute.values))
            for name, attribute in self.text_attributes.items()
        }
        numbers = {name: grown(values, np.nan) for name, values in self.number_attributes.items()}
        rewritten = np.zeros(total, dtype=bool)
        joined: dict[str, list[int]] = {}
        for internal, record in written.items():
            rewritten[internal] = True
            if available is not None:
                available[internal] = record.served
            if titles is not None:
                titles[internal] = record.title
            if genres is not None:
                genres[internal] = list(record.genres)
            for genre in record.genres:
                joined.setdefault(genre, []).append(internal)
            given = dict(record.attributes)
            for name, attribute in text.items():
                value = given.get(name)
                attribute.codes[internal] = (
                    -1
                    if value is None
                    else attribute.values.setdefault(value, len(attribute.values))
                )
            given = dict(record.numbers)
            for name, values in numbers.items():
                values[internal] = given.get(name, np.nan)
        if available is not None:
            available[0] = False
        categories = {}
        for name in self.categories.keys() | joined.keys():
            ids = self.categories.get(name, NO_ITEMS)
            if written:
                ids = ids[~rewritten[ids]]
            if name in joined:
                ids = np.union1d(ids, joined[name])
            if len(ids):
                categories[name] = ids
        catalogue = Catalogue(
            raw_ids,
            grown(self.popularity, 0),
            titles,
            genres,
            self.lookup,  # shared: the bundle's ids never change
            None if self.last_seen is None else grown(self.last_seen, -1),
            categories=categories,
            text_attributes=text,
            number_attributes=numbers,
            available=available,
            added_lookup=dict(added),
            withdrawn=frozenset(i for i, r in written.items() if r.withdrawn),
            trained=n,
        )
        # Added items have no training events: last in the popularity order, by id.
        catalogue.__dict__["popularity_order"] = np.concatenate(
            [self.popularity_order, np.arange(n + 1, n + 1 + m)]
        )
        return catalogue


def read_catalogue(path: Path) -> Catalogue:
    """items.parquet into a Catalogue. The id map must be whole: ids exactly 1..N in order,
    every raw id a distinct non-null string, counts and times without gaps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise BundleError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = table.column_names
    for required in ("item_id", "raw_id", "popularity"):
        if required not in names:
            raise BundleError(f"{path}: no {required!r} column")
    if table.num_rows == 0:
        raise BundleError(f"{path}: no items")
    for column in ("item_id", "raw_id", "popularity", "last_seen_ts"):
        if column in names and table.column(column).null_count:
            raise BundleError(f"{path}: {column} has {table.column(column).null_count} nulls")
    for column in ("item_id", "popularity", "last_seen_ts"):
        if column in names and not pa.types.is_integer(table.column(column).type):
            raise BundleError(f"{path}: {column} is {table.column(column).type}, not integers")
    if not pa.types.is_string(table.column("raw_id").type) and not pa.types.is_large_string(
        table.column("raw_id").type
    ):
        raise BundleError(f"{path}: raw_id is {table.column('raw_id').type}, not strings")
    ids = table.column("item_id").to_numpy()
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
        raise BundleError(f"{path}: item_id must run 1..N in order")
    raw = np.concatenate([[""], np.asarray(table.column("raw_id").to_pylist(), dtype=object)])
    popularity = np.concatenate([[0], table.column("popularity").to_numpy()]).astype(np.int64)
    titles = [None, *table.column("title").to_pylist()] if "title" in names else None
    genres = [[], *table.column("genres").to_pylist()] if "genres" in names else None
    lookup = {r: i for i, r in enumerate(raw.tolist()) if i}
    if len(lookup) != len(ids):
        twice = next(r for r, n in Counter(raw[1:].tolist()).items() if n > 1)
        raise BundleError(f"{path}: raw_id {twice!r} names more than one item")
    last_seen = None
    if "last_seen_ts" in names:
        last_seen = np.concatenate([[-1], table.column("last_seen_ts").to_numpy()])
        last_seen = last_seen.astype(np.int64)
    catalogue = Catalogue(raw, popularity, titles, genres, lookup, last_seen)
    if "genres" in names:
        catalogue.categories = category_index(table.column("genres"))
    for name in names:
        if name not in RESERVED_COLUMNS:
            read_attribute(path, catalogue, name, table.column(name))
    return catalogue


def category_index(genres) -> dict[str, np.ndarray]:
    """Each category's items (internal ids, ascending) from the genres column."""
    import pyarrow.compute as pc

    lists = genres.combine_chunks()
    encoded = pc.list_flatten(lists).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    owners = pc.list_parent_indices(lists).to_numpy() + 1  # row i is internal id i + 1
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    return {
        name: np.unique(owners[order[lo:hi]])
        for name, lo, hi in zip(
            encoded.dictionary.to_pylist(), bounds[:-1], bounds[1:], strict=True
        )
    }


def read_attribute(path: Path, catalogue: Catalogue, name: str, column) -> None:
    """One column of items.parquet beyond the reserved ones into ``catalogue``: the
    ``available`` flags, a string attribute or a numeric one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if name == AVAILABLE:
        if not pa.types.is_boolean(kind) or column.null_count:
            raise BundleError(f"{path}: {AVAILABLE} must be booleans without nulls, not {kind}")
        catalogue.available = np.concatenate([[False], column.to_numpy()]).astype(bool)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        encoded = column.combine_chunks().dictionary_encode()
        codes = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int32)
        catalogue.text_attributes[name] = TextAttribute(
            codes=np.concatenate([np.array([-1], np.int32), codes]),
            values={value: code for code, value in enumerate(encoded.dictionary.to_pylist())},
        )
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = pc.cast(column, pa.float64()).to_numpy()
        catalogue.number_attributes[name] = np.concatenate([[np.nan], values])
    else:
        raise BundleError(
            f"{path}: column {excerpt(name)} is {kind}; an attribute column holds strings "
            "(filtered by equality) or numbers (filtered by range)"
        )


def write_items_table(
    path: Path,
    raw_ids: list[str],
    popularity: np.ndarray,
    *,
    titles: dict[str, str] | None = None,
    genres: dict[str, list[str]] | None = None,
    last_seen: np.ndarray | None = None,
    attributes: dict[str, np.ndarray] | None = None,
    available: np.ndarray | None = None,
) -> None:
    """items.parquet: one row per internal id 1..N (padding row 0 is not stored).

    ``last_seen`` (N + 1,) holds each item's latest training interaction (-1: never), which
    the CTR head's recency feature needs at serving time. ``attributes`` are (N + 1,)
    arrays by name, strings (None: no value) or numbers (NaN: no value), that requests
    filter on; ``available`` (N + 1,) bool says which items may be served at all.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = list(raw_ids[1:])
    columns = {
        "item_id": pa.array(np.arange(1, len(raw_ids), dtype=np.int64)),
        "raw_id": pa.array(raw, pa.string()),
        "popularity": pa.array(np.asarray(popularity[1:], dtype=np.int64)),
    }
    if titles:
        columns["title"] = pa.array([titles.get(r) for r in raw], pa.string())
    if genres:
        columns["genres"] = pa.array([genres.get(r, []) for r in raw], pa.list_(pa.string()))
    if last_seen is not None:
        columns["last_seen_ts"] = pa.array(np.asarray(last_seen[1:], dtype=np.int64))
    for name, values in (attributes or {}).items():
        if name in RESERVED_COLUMNS or name == AVAILABLE:
            raise ValueError(f"attribute {name!r} would replace the items table's own column")
        values = np.asarray(values)
        numeric = np.issubdtype(values.dtype, np.number)
        columns[name] = pa.array(
            values[1:], pa.float64() if numeric else pa.string(), from_pandas=numeric
        )
    if available is not None:
        columns[AVAILABLE] = pa.array(np.asarray(available[1:], dtype=bool))
    pq.write_table(pa.table(columns), path)
