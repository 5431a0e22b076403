"""Request filters in the catalogue and the serving kernel, on seeded synthetic catalogues.

The property tests draw many random filters (a seeded loop: hypothesis is not a
dependency) and check the kernel against brute force over the eligible items: on an
exact index the filtered top-k is exactly the brute-force top-k, and on any index a
request gets ``k`` items whenever ``k`` eligible ones exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import service.pipeline as pipeline
from service.bundle import Bundle, Retriever
from service.cache import CachedRetrieval
from service.catalogue import (
    Catalogue,
    ItemFilter,
    ItemRecord,
    TextAttribute,
    read_catalogue,
    write_items_table,
)
from service.errors import BundleError, InvalidField
from service.filters import drop_excluded, drop_seen, first_depth
from service.live_catalogue import ServedCatalogue
from service.pipeline import Query, compute_batch
from service.retrieval import IndexSpec, ItemIndex, search_among

N_ITEMS, DIM = 3000, 16
CATEGORIES = [f"c{i}" for i in range(20)]
COLOURS = ["red", "green", "blue", "black", "white"]


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    """Items with one or two of 20 categories, a colour (a tenth without), a price (a
    tenth without) and 5% unavailable."""
    rng = np.random.default_rng(0)
    ids = np.arange(N_ITEMS + 1)
    raw = np.array([""] + [f"item-{i}" for i in ids[1:]], dtype=object)
    first = rng.integers(0, len(CATEGORIES), N_ITEMS + 1)
    second = rng.integers(0, len(CATEGORIES), N_ITEMS + 1)
    both = rng.random(N_ITEMS + 1) < 0.3
    categories = {
        name: np.flatnonzero((ids > 0) & ((first == c) | (both & (second == c))))
        for c, name in enumerate(CATEGORIES)
    }
    colour = rng.integers(-1, len(COLOURS), N_ITEMS + 1).astype(np.int32)
    colour[0] = -1
    price = rng.uniform(0, 100, N_ITEMS + 1)
    price[(rng.random(N_ITEMS + 1) < 0.1) | (ids == 0)] = np.nan
    available = rng.random(N_ITEMS + 1) < 0.95
    available[0] = False
    return Catalogue(
        raw_ids=raw,
        popularity=rng.integers(0, 100, N_ITEMS + 1),
        lookup={r: i for i, r in enumerate(raw.tolist()) if i},
        categories=categories,
        text_attributes={"colour": TextAttribute(colour, {c: i for i, c in enumerate(COLOURS)})},
        number_attributes={"price": price},
        available=available,
    )


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(1)
    rows = np.zeros((N_ITEMS + 1, DIM), np.float32)
    rows[1:] = rng.standard_normal((N_ITEMS, DIM))
    return rows


def retriever_of(vectors: np.ndarray, spec: IndexSpec) -> Retriever:
    """A retriever with no encoder: the kernel's queries here carry their embeddings."""
    index = ItemIndex.build(vectors, spec)
    return Retriever(name="r", encoder=None, index=index, max_len=8, info={}, item_vectors=vectors)


@pytest.fixture(scope="module")
def exact(vectors) -> Retriever:
    return retriever_of(vectors, IndexSpec("Flat"))


@pytest.fixture(scope="module")
def approximate(vectors) -> Retriever:
    # Few lists probed: a selective filter finds too few eligible items in them.
    return retriever_of(vectors, IndexSpec("IVF32,Flat", nprobe=2, train_size=N_ITEMS))


def random_filter(rng: np.random.Generator, catalogue: Catalogue) -> ItemFilter:
    """A filter of random conditions: categories, colours, a price range, exclusions."""
    chosen = {}
    if rng.random() < 0.5:
        chosen["include_categories"] = tuple(rng.choice(CATEGORIES, rng.integers(1, 4)))
    if rng.random() < 0.3:
        chosen["exclude_categories"] = tuple(rng.choice(CATEGORIES, rng.integers(1, 6)))
    if rng.random() < 0.3:
        chosen["attributes"] = (("colour", str(rng.choice([*COLOURS, "purple"]))),)
    if rng.random() < 0.5:
        low, width = rng.uniform(0, 100), rng.choice([0.5, 2, 10, 50, 100])
        chosen["ranges"] = (("price", low, low + width),)
    if rng.random() < 0.3:
        picked = rng.choice(np.arange(1, N_ITEMS + 1), rng.integers(1, 40))
        chosen["exclude_items"] = tuple(catalogue.raw_ids[picked].tolist()) + ("no-such-item",)
    return ItemFilter(**chosen, available_only=bool(rng.random() < 0.8))


def query_of(
    catalogue: Catalogue,
    embedding: np.ndarray,
    item_filter: ItemFilter | None,
    *,
    keep: int,
    seen: np.ndarray,
) -> Query:
    """A query as prepare_queries builds it, with its embedding already known."""
    excluded = catalogue.excluded(item_filter)
    eligible = catalogue.eligible(item_filter)
    return Query(
        window=np.zeros((1, 0), np.int64),
        deltas=np.zeros((1, 0), np.float32),
        depth=first_depth(keep + len(seen) + len(excluded), catalogue.n_items, eligible),
        history_ids=seen,
        history_ts=np.zeros(len(seen), np.int64),
        seen=seen,
        keep=keep,
        k=keep,
        rerank=False,
        request_time=0,
        embedding=embedding,
        item_filter=item_filter,
        excluded=excluded,
    )


def servable(catalogue: Catalogue, query: Query) -> np.ndarray:
    """Brute force: the bool mask of the items a query may be served."""
    eligible = catalogue.eligible(query.item_filter).mask
    allowed = np.ones(catalogue.n_items + 1, bool) if eligible is None else eligible.copy()
    allowed[0] = False
    allowed[query.seen] = False
    allowed[query.excluded] = False
    return allowed


def brute_force(vectors: np.ndarray, catalogue: Catalogue, query: Query) -> np.ndarray:
    """The ids of the best ``keep`` servable items by exact inner product."""
    allowed = servable(catalogue, query)
    scores = vectors @ query.embedding
    ids = np.flatnonzero(allowed)
    return ids[np.argsort(-scores[ids], kind="stable")][: query.keep]


def random_queries(rng, catalogue, count: int) -> list[Query]:
    return [
        query_of(
            catalogue,
            rng.standard_normal(DIM).astype(np.float32),
            random_filter(rng, catalogue),
            keep=int(rng.choice([1, 5, 10, 50, 200])),
            seen=np.unique(rng.integers(1, N_ITEMS + 1, rng.integers(0, 30))),
        )
        for _ in range(count)
    ]


# --------------------------------------------------------------------------- the catalogue


def test_the_items_table_carries_categories_attributes_and_availability(tmp_path):
    raw = ["", "a", "b", "c", "d"]
    write_items_table(
        tmp_path / "items.parquet",
        raw,
        np.array([0, 5, 4, 3, 2]),
        genres={"a": ["x", "y"], "b": ["y"], "d": ["z"]},
        attributes={
            "colour": np.array([None, "red", None, "blue", "red"], dtype=object),
            "price": np.array([np.nan, 1.0, np.nan, 3, 4]),
        },
        available=np.array([False, True, True, False, True]),
    )
    catalogue = read_catalogue(tmp_path / "items.parquet")
    assert {name: ids.tolist() for name, ids in catalogue.categories.items()} == {
        "x": [1],
        "y": [1, 2],
        "z": [4],
    }
    colour = catalogue.text_attributes["colour"]
    assert [colour.codes[i] == colour.values.get("red") for i in range(1, 5)] == [
        True,
        False,
        False,
        True,
    ]
    assert colour.codes[2] == -1  # no value
    np.testing.assert_array_equal(catalogue.number_attributes["price"][1:], [1, np.nan, 3, 4])
    assert catalogue.available.tolist() == [False, True, True, False, True]
    # What GET /items/{id} shows of them: only the values an item has.
    assert catalogue.describe(1) == {
        "item_id": "a",
        "title": None,
        "genres": ["x", "y"],
        "attributes": {"colour": "red"},
        "numbers": {"price": 1.0},
        "available": True,
        "popularity": 5,
        "added": False,
    }
    described = catalogue.describe(2)
    assert described["attributes"] == {} and described["numbers"] == {}
    assert catalogue.describe(3)["available"] is False


def test_an_attribute_column_of_another_kind_is_refused_naming_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "item_id": pa.array([1, 2], pa.int64()),
            "raw_id": ["a", "b"],
            "popularity": pa.array([1, 1], pa.int64()),
            "tags": pa.array([["x"], ["y"]]),
        }
    )
    pq.write_table(table, tmp_path / "items.parquet")
    with pytest.raises(
        BundleError, match="column .tags. is list<.*string>; an attribute column holds strings"
    ):
        read_catalogue(tmp_path / "items.parquet")


def test_a_bundle_without_attributes_keeps_every_item_unfiltered(catalogue):
    plain = Catalogue(catalogue.raw_ids, catalogue.popularity, lookup=catalogue.lookup)
    assert plain.eligible(None).mask is None and plain.eligible(None).count == N_ITEMS
    assert plain.eligible(ItemFilter(exclude_items=("item-3",))).mask is None
    assert plain.excluded(ItemFilter(exclude_items=("item-3", "nope"))).tolist() == [3]


@pytest.mark.parametrize(
    "item_filter, keeps",
    [
        (None, lambda c, i: c.available[i]),
        (ItemFilter(available_only=False), lambda c, i: i > 0),
        (
            ItemFilter(include_categories=("c1", "c2"), available_only=False),
            lambda c, i: i in c.categories["c1"] or i in c.categories["c2"],
        ),
        (
            ItemFilter(exclude_categories=("c1",)),
            lambda c, i: c.available[i] and i not in c.categories["c1"],
        ),
        (
            ItemFilter(attributes=(("colour", "red"),), available_only=False),
            lambda c, i: c.text_attributes["colour"].codes[i] == 0,
        ),
        (
            ItemFilter(ranges=(("price", 10.0, 20.0),), available_only=False),
            lambda c, i: 10 <= c.number_attributes["price"][i] <= 20,
        ),
        (
            ItemFilter(ranges=(("price", None, 5.0),)),
            lambda c, i: c.number_attributes["price"][i] <= 5 and c.available[i],
        ),
        (ItemFilter(include_categories=("no-such-category",)), lambda c, i: False),
        (ItemFilter(attributes=(("colour", "purple"),)), lambda c, i: False),
    ],
)
def test_a_filter_compiles_to_the_items_it_describes(catalogue, item_filter, keeps):
    eligible = catalogue.eligible(item_filter)
    expected = [i for i in range(N_ITEMS + 1) if i > 0 and keeps(catalogue, i)]
    if eligible.mask is None:  # a filter that keeps every item filters nothing
        assert eligible.count == len(expected) == N_ITEMS
    else:
        assert np.flatnonzero(eligible.mask).tolist() == expected
        assert eligible.count == len(expected) and eligible.ids.tolist() == expected


def test_equal_filters_share_one_compiled_mask_whatever_their_order(catalogue):
    one = ItemFilter(include_categories=("c3", "c1"), exclude_items=("item-1",))
    other = ItemFilter(include_categories=("c1", "c3", "c1"), exclude_items=("item-2",))
    assert one.include_categories == other.include_categories == ("c1", "c3")
    assert catalogue.eligible(one) is catalogue.eligible(other)  # exclusions aside
    assert catalogue.eligible(one).mask.flags.writeable is False


@pytest.mark.parametrize(
    "item_filter, field, hint",
    [
        (ItemFilter(attributes=(("size", "L"),)), "filter.attributes.size", "has: colour"),
        (ItemFilter(attributes=(("price", "3"),)), "filter.attributes.price", "filter.ranges"),
        (ItemFilter(ranges=(("colour", 1.0, 2.0),)), "filter.ranges.colour", "filter.attributes"),
        (ItemFilter(ranges=(("weight", 1.0, None),)), "filter.ranges.weight", "has: price"),
    ],
)
def test_a_filter_on_an_attribute_the_catalogue_lacks_names_the_field(
    catalogue, item_filter, field, hint
):
    with pytest.raises(InvalidField, match=f"^{field}: .*{hint}"):
        catalogue.eligible(item_filter)


# --------------------------------------------------------------------------- dropping


def test_the_filter_count_stops_at_the_last_candidate_kept():
    ids = [np.array([5, 1, 6, 2, 7, 3, 8])]
    mask = np.zeros(10, bool)
    mask[[1, 2, 3]] = True
    (kept,), (removed,) = drop_excluded(ids, ids, [np.array([2])], [2], masks=[mask])
    assert kept[0].tolist() == [1, 3] and removed == 3  # 5, 6, 7 lay ahead of 3; 8 did not
    (kept,), (removed,) = drop_excluded(ids, ids, [np.array([])], [5], masks=[mask])
    assert kept[0].tolist() == [1, 2, 3] and removed == 4  # too few: every one removed
    (kept,), (removed,) = drop_excluded(ids, ids, [np.array([])], [2], excluded=[np.array([1])])
    assert kept[0].tolist() == [5, 6] and removed == 1


def test_without_a_filter_only_padding_and_seen_items_go(catalogue):
    ids = [np.array([0, 4, 9, 2]), np.array([3, 0, 1])]
    assert [k.tolist() for k, _ in drop_seen(ids, ids, [np.array([9]), np.array([])], [9, 1])] == [
        [4, 2],
        [3],
    ]


def test_search_among_is_exact_search_over_those_items(vectors):
    from service.retrieval import exact_search

    rng = np.random.default_rng(2)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    ids = np.sort(rng.choice(np.arange(1, N_ITEMS + 1), 300, replace=False))
    subset = np.zeros_like(vectors)
    subset[ids] = vectors[ids]
    scores, found = search_among(vectors, queries, ids, 20)
    expected_scores, expected = exact_search(subset, queries, 20)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert search_among(vectors, queries, ids[:5], 20)[1].shape == (3, 5)


# --------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("subset_limit", [pipeline.SUBSET_LIMIT, 0], ids=["subset", "deepen"])
def test_on_an_exact_index_the_filtered_top_k_is_the_brute_force_top_k(
    catalogue, exact, vectors, monkeypatch, subset_limit
):
    """Whether the eligible items are searched among themselves or the index deeper."""
    monkeypatch.setattr(pipeline, "SUBSET_LIMIT", subset_limit)
    rng = np.random.default_rng(3)
    for _ in range(25):
        queries = random_queries(rng, catalogue, 8)
        for query, ranked in zip(
            queries,
            compute_batch(exact, ServedCatalogue.of(catalogue, [exact]), queries),
            strict=True,
        ):
            expected = brute_force(vectors, catalogue, query)
            assert ranked.ids.tolist() == expected.tolist(), query.item_filter
            np.testing.assert_allclose(
                ranked.scores, vectors[expected] @ query.embedding, rtol=1e-5, atol=1e-5
            )


def overlaid(catalogue: Catalogue, retriever: Retriever, seed: int) -> ServedCatalogue:
    """The catalogue after writes: 300 items added (random metadata and vectors a little
    longer than the bundle's, so they compete), 100 bundle items withdrawn and 50 given new
    categories, colours and prices."""
    rng = np.random.default_rng(seed)
    bundle = Bundle("b", Path("b"), {}, catalogue, {retriever.name: retriever})

    def record(vector=None) -> ItemRecord:
        return ItemRecord(
            genres=tuple(rng.choice(CATEGORIES, rng.integers(0, 3), replace=False)),
            attributes=(("colour", str(rng.choice(COLOURS))),) if rng.random() < 0.9 else (),
            numbers=(("price", float(rng.uniform(0, 100))),) if rng.random() < 0.9 else (),
            available=bool(rng.random() < 0.9),
            vectors=() if vector is None else ((retriever.name, vector),),
            vectors_bundle=None if vector is None else "b",
        )

    records = {
        f"new-{i}": record(rng.standard_normal(DIM).astype(np.float32) * 1.2) for i in range(300)
    }
    for item in rng.choice(np.arange(1, N_ITEMS + 1), 150, replace=False)[:100]:
        records[str(catalogue.raw_ids[item])] = ItemRecord(available=False, withdrawn=True)
    for item in rng.choice(np.arange(1, N_ITEMS + 1), 50, replace=False):
        records.setdefault(str(catalogue.raw_ids[item]), record())
    return ServedCatalogue.of_records(bundle, 1, records, embed=True)


@pytest.mark.parametrize("subset_limit", [pipeline.SUBSET_LIMIT, 0], ids=["subset", "deepen"])
def test_with_items_added_changed_and_withdrawn_the_top_k_is_still_the_brute_force_top_k(
    catalogue, exact, monkeypatch, subset_limit
):
    """The added items are searched beside the index and merged, on the first search and
    on the deeper ones; every write's metadata and availability is what filters read."""
    monkeypatch.setattr(pipeline, "SUBSET_LIMIT", subset_limit)
    served = overlaid(catalogue, exact, seed=8)
    live = served.catalogue
    assert live.n_items == N_ITEMS + 300 and len(live.withdrawn) == 100
    every = served.vectors[exact.name].take(np.arange(live.n_items + 1))
    rng = np.random.default_rng(9)
    added_served = 0
    for _ in range(25):
        queries = random_queries(rng, live, 8)
        for query, ranked in zip(queries, compute_batch(exact, served, queries), strict=True):
            expected = brute_force(every, live, query)
            assert ranked.ids.tolist() == expected.tolist(), query.item_filter
            assert not set(ranked.ids.tolist()) & live.withdrawn
            added_served += int((ranked.ids > N_ITEMS).sum())
    assert added_served > 0


@pytest.mark.parametrize("subset_limit", [pipeline.SUBSET_LIMIT, 0], ids=["subset", "deepen"])
def test_on_an_approximate_index_k_eligible_items_come_whenever_k_exist(
    catalogue, approximate, monkeypatch, subset_limit
):
    """Deepened, its few probed lists run out: the eligible items are searched instead."""
    monkeypatch.setattr(pipeline, "SUBSET_LIMIT", subset_limit)
    rng = np.random.default_rng(4)
    for _ in range(25):
        queries = random_queries(rng, catalogue, 8)
        for query, ranked in zip(
            queries,
            compute_batch(approximate, ServedCatalogue.of(catalogue, [approximate]), queries),
            strict=True,
        ):
            allowed = servable(catalogue, query)
            assert allowed[ranked.ids].all()
            assert len(ranked.ids) == min(query.keep, np.count_nonzero(allowed))
            assert len(set(ranked.ids.tolist())) == len(ranked.ids)


@pytest.mark.parametrize("retriever", ["exact", "approximate"])
def test_a_filter_keeping_one_percent_still_gives_k_items(catalogue, request, retriever):
    searched = request.getfixturevalue(retriever)
    item_filter = ItemFilter(ranges=(("price", 40.0, 41.0),), available_only=False)
    assert 0.005 < catalogue.eligible(item_filter).count / N_ITEMS < 0.015
    rng = np.random.default_rng(5)
    queries = [
        query_of(
            catalogue,
            rng.standard_normal(DIM).astype(np.float32),
            item_filter,
            keep=10,
            seen=np.zeros(0, np.int64),
        )  # fmt: skip
        for _ in range(16)
    ]
    for ranked in compute_batch(searched, ServedCatalogue.of(catalogue, [searched]), queries):
        assert len(ranked.ids) == 10
        assert (np.abs(catalogue.number_attributes["price"][ranked.ids] - 40.5) <= 0.5).all()
        assert ranked.filtered > 0


def test_a_cached_retrieval_is_filtered_like_a_fresh_one(catalogue, exact):
    """The cache holds the unfiltered retrieval: a hit too shallow for a selective filter
    is searched again, and answers exactly what a miss answers."""
    rng = np.random.default_rng(6)
    for _ in range(10):
        fresh = random_queries(rng, catalogue, 4)
        misses = compute_batch(exact, ServedCatalogue.of(catalogue, [exact]), fresh)
        hits = []
        for query, ranked in zip(fresh, misses, strict=True):
            assert isinstance(ranked.retrieval, CachedRetrieval)
            hits.append(replace_query(query, cached=ranked.retrieval, embedding=None))
        for miss, hit in zip(
            misses, compute_batch(exact, ServedCatalogue.of(catalogue, [exact]), hits), strict=True
        ):
            assert hit.ids.tolist() == miss.ids.tolist()
            assert hit.filtered == miss.filtered and hit.retrieval is None


def replace_query(query: Query, **changes) -> Query:
    from dataclasses import replace

    return replace(query, **changes)


def test_an_unfiltered_query_is_served_as_before_filters_existed(catalogue, exact, vectors):
    """With nothing to filter the first search is all there is, as deep as ever."""
    plain = Catalogue(raw_ids=catalogue.raw_ids, popularity=catalogue.popularity)
    rng = np.random.default_rng(7)
    seen = np.array([1, 2, 3])
    query = query_of(plain, rng.standard_normal(DIM).astype(np.float32), None, keep=10, seen=seen)
    assert query.depth == 13 and query.excluded.size == 0
    (ranked,) = compute_batch(exact, ServedCatalogue.of(plain, [exact]), [query])
    assert ranked.filtered == 0
    assert ranked.ids.tolist() == brute_force(vectors, plain, query).tolist()
