"""The catalogue a worker serves while the catalogue API writes to it: the bundle's items
with the written ones' metadata, availability and vectors.

What lives where (docs/ARCHITECTURE.md, "The living catalogue"):

- the bundle holds the items it was exported with, their trained vectors and index;
- Redis holds every write of the catalogue API since (``service.catalogue_store``): one
  :class:`~service.catalogue.ItemRecord` per written item, a version counter, and a
  channel that announces each new version;
- each process that serves builds a :class:`ServedCatalogue` from both: the catalogue
  with the records applied (``Catalogue.with_overlay``), the CTR head's item features
  with rows for the added items, and per retriever the added items' vectors (the writer's
  own, when it supplied them for the served bundle; else the retriever's metadata encoder
  embeds the item's metadata, scaled by ``RECSERVE_COLD_START_EXPOSURE``) and the ones it
  searches (every one with a vector; withdrawn ones have none, unavailable ones are
  filtered like any other).

The worker owns the internal ids of added items (the bundle's N, then N + 1, ... in the
order their writes arrived, never reused while the bundle serves) and hands them with
every change to its compute process, so both sides always agree on what an id means;
the behaviour cache holds only the bundle index's results, so those ids never leave the
worker. The added items are searched exactly beside the bundle's index on every request
(``service.pipeline``), so a cached retrieval never hides an item added after it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from service.bundle import Bundle, Retriever
from service.catalogue import Catalogue, ItemRecord
from service.errors import InvalidField, excerpt
from service.features import ItemFeatures

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogueChange:
    """Records written since a version, with the internal ids the worker gave the added
    ones: what the worker applies and sends to its compute process."""

    version: int
    records: dict[str, ItemRecord]
    added: dict[str, int] = field(default_factory=dict)  # raw id -> internal id, new ones


class ItemVectors:
    """A retriever's item vectors: the bundle's (N + 1, d), memory-mapped, then the added
    items' rows. Reads as the array does where the kernel reads it (``take`` of rows,
    an item's row, ``shape``)."""

    def __init__(self, trained: np.ndarray, added: np.ndarray):
        self.trained = trained
        self.added = added  # (m, d) float32: row j is internal id N + 1 + j
        self.n_trained = len(trained) - 1
        self.shape = (len(trained) + len(added), trained.shape[1])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, ids, axis: int = 0) -> np.ndarray:
        """Rows ``ids`` (any shape of internal ids), as ``np.take(vectors, ids, axis=0)``."""
        ids = np.asarray(ids, dtype=np.int64)
        if axis != 0:
            raise ValueError("item vectors are taken by rows")
        if ids.size == 0 or ids.max() <= self.n_trained:  # the usual case: no added item
            return np.take(self.trained, ids, axis=0)
        out = np.empty((*ids.shape, self.shape[1]), dtype=np.float32)
        mine = ids <= self.n_trained
        out[mine] = np.take(self.trained, ids[mine], axis=0)
        out[~mine] = self.added[ids[~mine] - self.n_trained - 1]
        return out

    def __getitem__(self, item):
        if isinstance(item, (int, np.integer)):
            return self.take(np.array([item]))[0]
        return self.take(item)


@dataclass
class AddedItems:
    """The added items one retriever searches beside its index: internal ids, vectors."""

    ids: np.ndarray  # (m,) int64
    vectors: np.ndarray  # (m, d) float32

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Exact inner products (q, m) of the queries with every added item."""
        return np.asarray(queries, dtype=np.float32) @ self.vectors.T


NO_ADDED = AddedItems(np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.float32))


@dataclass
class ServedCatalogue:
    """What serving reads of the items at one catalogue version (see the module docstring)."""

    version: int
    catalogue: Catalogue
    item_features: ItemFeatures | None
    vectors: dict[str, np.ndarray | ItemVectors]  # per retriever
    added: dict[str, AddedItems]  # per retriever: what it searches beside its index
    records: dict[str, ItemRecord] = field(default_factory=dict)  # every write applied
    # The added items' vectors per retriever, raw id -> vector (None: it has none).
    embedded: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        catalogue: Catalogue,
        retrievers: Iterable[Retriever],
        item_features: ItemFeatures | None = None,
    ) -> ServedCatalogue:
        """A catalogue and its retrievers' vectors as they are, before any write."""
        retrievers = list(retrievers)
        return cls(
            version=0,
            catalogue=catalogue,
            item_features=item_features,
            vectors={r.name: r.item_vectors for r in retrievers},
            added={r.name: NO_ADDED for r in retrievers},
        )

    @classmethod
    def of_bundle(cls, bundle: Bundle) -> ServedCatalogue:
        """The bundle's own items, before any write (version 0)."""
        return cls.of(bundle.catalogue, bundle.retrievers.values(), bundle.item_features)

    @classmethod
    def of_records(
        cls,
        bundle: Bundle,
        version: int,
        records: dict[str, ItemRecord],
        *,
        embed: bool,
        exposure: float = 1.0,
    ) -> ServedCatalogue:
        """The bundle's items with every record applied (as a process that starts serves)."""
        start = cls.of_bundle(bundle)
        change = CatalogueChange(version, records, start.assign(bundle, records))
        return start.applied(bundle, change, embed=embed, exposure=exposure)

    def assign(self, bundle: Bundle, raw_ids) -> dict[str, int]:
        """Internal ids for the items among ``raw_ids`` that neither the bundle nor an
        earlier write has, in the order given, after the ids already taken."""
        catalogue = self.catalogue
        taken = catalogue.n_items
        new = {}
        for raw in raw_ids:
            if raw not in bundle.catalogue.lookup and raw not in catalogue.added_lookup:
                if raw not in new:
                    taken += 1
                    new[raw] = taken
        return new

    def applied(
        self, bundle: Bundle, change: CatalogueChange, *, embed: bool, exposure: float = 1.0
    ) -> ServedCatalogue:
        """The served catalogue after ``change``; with ``embed`` (where the models are
        loaded) the vectors of the added items it wrote, for every retriever."""
        records = {**self.records, **change.records}
        added = {**self.catalogue.added_lookup, **change.added}
        catalogue = bundle.catalogue.with_overlay(records, added)
        order = sorted(added, key=added.__getitem__)
        features = bundle.item_features
        if features is not None and order:
            features = features.with_added([list(records[raw].genres) for raw in order])
        served = ServedCatalogue.of(catalogue, bundle.retrievers.values(), features)
        served.version, served.records = change.version, records
        if not embed or not order:
            return served
        rewritten = [raw for raw in change.records if raw in added]
        for name, retriever in bundle.retrievers.items():
            embedded = dict(self.embedded.get(name, {}))
            embedded.update(
                embed_records(bundle, name, [(raw, records[raw]) for raw in rewritten], exposure)
            )
            dim = retriever.item_vectors.shape[1]
            rows = np.zeros((len(order), dim), dtype=np.float32)
            searchable = []
            for row, raw in enumerate(order):
                vector = embedded.get(raw)
                if vector is not None:  # withdrawn items have none
                    rows[row] = vector
                    searchable.append(row)
            served.embedded[name] = embedded
            served.vectors[name] = ItemVectors(retriever.item_vectors, rows)
            ids = np.array([added[order[row]] for row in searchable], dtype=np.int64)
            served.added[name] = AddedItems(ids, rows[searchable]) if len(ids) else NO_ADDED
        return served


def embed_records(
    bundle: Bundle, retriever: str, records: list[tuple[str, ItemRecord]], exposure: float
) -> dict[str, np.ndarray | None]:
    """Each added item's vector in ``retriever``'s space: the writer's own for this bundle,
    else its metadata through the retriever's metadata encoder times ``exposure`` (None:
    withdrawn, or neither is there)."""
    vectors: dict[str, np.ndarray | None] = {}
    derived = []
    for raw, record in records:
        given = record.vector_for(bundle.name, retriever)
        if record.withdrawn:
            vectors[raw] = None
        elif given is not None:
            vectors[raw] = np.asarray(given, dtype=np.float32)
        else:
            vectors[raw] = None
            derived.append((raw, record))
    encoder = bundle.retrievers[retriever].metadata_encoder
    if derived and encoder is not None:
        embedded = encoder.embed([record.metadata() for _, record in derived]) * exposure
        for (raw, _), vector in zip(derived, embedded.astype(np.float32), strict=True):
            vectors[raw] = vector
    elif derived:
        LOG.warning(
            "%d added item(s) have no vector for retriever %s (no metadata encoder in bundle "
            "%s): it cannot retrieve them",
            len(derived),
            retriever,
            bundle.name,
        )
    return vectors


def checked_record(
    bundle: Bundle,
    catalogue: Catalogue,
    item_id: str,
    *,
    where: str,
    title: str | None = None,
    genres: Iterable[str] = (),
    attributes: dict[str, str] | None = None,
    numbers: dict[str, float] | None = None,
    available: bool = True,
    year: int | None = None,
    embeddings: dict[str, list[float]] | None = None,
) -> ItemRecord:
    """The record of a catalogue write, checked against the served bundle; InvalidField
    naming the field (``where`` locates the item, e.g. ``body.put[3]``) for an attribute
    the catalogue lacks or of the other kind, a vector for an unknown retriever, of the
    wrong width, or for an item the bundle has, and for an added item that some retriever
    could not retrieve (no vector given and no metadata encoder to derive one)."""
    catalogue.check_attributes(
        list(attributes or {}),
        list(numbers or {}),
        strings=f"{where}.attributes",
        numbers=f"{where}.numbers",
    )
    in_bundle = item_id in bundle.catalogue.lookup
    vectors = []
    if embeddings:
        if in_bundle:
            raise InvalidField(
                f"{where}.embeddings: item {excerpt(item_id)} is in bundle {bundle.name}, "
                "whose trained vectors are served; give vectors for added items only"
            )
        for name, values in embeddings.items():
            retriever = bundle.retrievers.get(name)
            if retriever is None:
                raise InvalidField(
                    f"{where}.embeddings.{excerpt(name, quote=False)}: no such retriever in "
                    f"bundle {bundle.name} (it has: {', '.join(bundle.retrievers)})"
                )
            width = retriever.item_vectors.shape[1]
            if len(values) != width:
                raise InvalidField(
                    f"{where}.embeddings.{name}: {len(values)} values; retriever {name!r} "
                    f"has {width}-dimensional item vectors"
                )
            vectors.append((name, np.asarray(values, dtype=np.float32)))
    if not in_bundle:
        for name, retriever in bundle.retrievers.items():
            if name not in (embeddings or {}) and "metadata_encoder" not in retriever.paths:
                raise InvalidField(
                    f"{where}.embeddings.{name}: required: bundle {bundle.name} has no "
                    f"metadata encoder for retriever {name!r} to derive a vector from"
                )
    return ItemRecord(
        title=title,
        genres=tuple(dict.fromkeys(genres)),
        attributes=tuple(sorted((attributes or {}).items())),
        numbers=tuple(sorted((numbers or {}).items())),
        available=available,
        year=year,
        vectors=tuple(vectors),
        vectors_bundle=bundle.name if vectors else None,
    )
