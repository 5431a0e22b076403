"""A bundle's index file: plain faiss reads it only where plain faiss searches it right."""

from __future__ import annotations

import numpy as np
import pytest

from service.retrieval import WRAPPED_MAGIC, IndexSpec, ItemIndex, exact_search
from tests.service.test_retrieval import norm_skewed_vectors, queries_around


def padded(queries: np.ndarray, width: int) -> np.ndarray:
    return np.hstack([queries, np.zeros((len(queries), width - queries.shape[1]), np.float32)])


def saved_wrapped(tmp_path, vectors: np.ndarray, spec: IndexSpec) -> tuple[ItemIndex, ItemIndex]:
    """The index built over ``vectors`` and its saved file read back; the file must be
    wrapped, so that faiss refuses it (its own search of the index would be wrong)."""
    import faiss

    built = ItemIndex.build(vectors, spec)
    path = tmp_path / "items.faiss"
    built.save(path)
    assert path.read_bytes().startswith(WRAPPED_MAGIC)
    with pytest.raises(RuntimeError):
        faiss.read_index(str(path))
    return built, ItemIndex.load(path, vectors, built.spec, device="cpu")


def test_an_l2_probed_ivf_file_is_refused_by_plain_faiss_and_read_by_item_index(tmp_path):
    vectors = norm_skewed_vectors(2_000, 16)
    spec = IndexSpec("IVF16,PQ10x4fs", nprobe=16, rescore=0, mips_to_l2=True)
    built, loaded = saved_wrapped(tmp_path, vectors, spec)
    queries = queries_around(vectors, 20)
    assert np.array_equal(loaded.search(queries, 10)[1], built.search(queries, 10)[1])
    # What plain faiss would have returned from the unwrapped index: far from exact.
    _, rows = built.index.search(padded(queries, built.index.d), 100)
    plain = rows + 1
    _, exact = exact_search(vectors, queries, 100)
    overlap = np.mean([len(set(p) & set(e)) / 100 for p, e in zip(plain, exact, strict=True)])
    assert overlap < 0.5, overlap


def test_other_index_files_stay_plain_faiss_and_search_right(tmp_path):
    import faiss

    vectors = norm_skewed_vectors(1_000, 12)
    built = ItemIndex.build(vectors, IndexSpec("Flat", mips_to_l2=True))
    path = tmp_path / "items.faiss"
    built.save(path)
    plain = faiss.read_index(str(path))
    queries = queries_around(vectors, 20)
    _, rows = plain.search(padded(queries, plain.d), 10)
    assert np.array_equal(rows + 1, exact_search(vectors, queries, 10)[1])  # row r: item r + 1


@pytest.mark.parametrize("factory", ["IVF16,RaBitQfs", "HNSW16,SQ4"])
def test_augmented_rabitq_and_sq_files_are_wrapped_and_read_back_by_item_index(factory, tmp_path):
    # Plain faiss would search these codes with the query off the items' sphere, where
    # their estimates are far from the inner products (see _searched_on_sphere).
    vectors = norm_skewed_vectors(2_000, 16)
    spec = IndexSpec(factory, nprobe=16, mips_to_l2=True)
    built, loaded = saved_wrapped(tmp_path, vectors, spec)
    queries = queries_around(vectors, 20)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # far from the sphere (M = 13)
    for got, want in zip(loaded.search(queries, 10), built.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    _, rows = built.index.search(padded(queries, built.index.d), 100)
    _, exact = exact_search(vectors, queries, 100)
    overlap = np.mean([len(set(p) & set(e)) / 100 for p, e in zip(rows + 1, exact, strict=True)])
    assert overlap < 0.5, overlap
