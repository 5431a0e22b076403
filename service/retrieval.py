"""Candidate retrieval: maximum-inner-product search over item vectors with faiss.

``ItemIndex`` wraps one faiss index over items 1..N (internal ids; 0 is padding and never
returned). Small catalogues use an exact ``Flat`` index; large ones a compressed index
(IVF-PQ, optionally behind an OPQ rotation) whose shortlist is re-scored exactly against
the float32 item vectors, read from a memory-mapped ``.npy`` so that only the compressed
codes need to stay resident. HNSW is available as an option.

With ``mips_to_l2`` the index lives in an augmented space where maximum inner product
becomes nearest neighbour in L2 (Bachrach et al., RecSys'14): each item x gets an extra
coordinate sqrt(M^2 - |x|^2), M the largest item norm, and each query a 0, so
|q - x'|^2 = |q|^2 + M^2 - 2 q.x. An IVF index then clusters and probes by L2, which keeps
the long item vectors that win inner products together instead of scattering them over
directions (a fraction of the scan for the same recall, docs/BENCHMARKS.md), while its codes
are scored by inner product: the query's 0 makes the extra coordinate drop out of every
score, so the codes spend no precision on it, and an inner-product lookup table is built
once per query rather than once per visited list. Flat and HNSW indexes use plain L2 in
the augmented space. RaBitQ and scalar-quantizer codes (faiss's newer kinds, compared in
docs/BENCHMARKS.md) are searched with the query moved onto the items' sphere, where their
estimates track inner products (see ``_searched_on_sphere``).

The same class builds the index at export time and serves it in the service, so the
recall measured at export is the recall served. An L2-probed IVF (and an augmented RaBitQ
or scalar-quantizer index) can only be searched through it: faiss's own ``search`` of that
index is wrong, so its file is wrapped
(``WRAPPED_MAGIC``) and ``faiss.read_index`` refuses it; ``ItemIndex.load`` reads it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from service.devices import faiss_gpus

LOG = logging.getLogger(__name__)

# What an L2-probed IVF's file starts with, so that faiss.read_index refuses it: faiss's
# own search of that index adds the L2 quantizer's distance to inner-product codes as if
# it were an inner product, and returns wrong neighbours (recall@100 near 0.02); only
# ItemIndex.search (its own probes and coarse terms) is right. Augmented RaBitQ and
# scalar-quantizer indexes are wrapped too: plain faiss searches them with the query off
# the items' sphere (see _searched_on_sphere), far from right. Other kinds stay plain
# faiss files, whose plain search is right (queries zero-padded to the index's width in
# the augmented space; row r is internal item r + 1). Files written before the wrapper
# load as they are.
WRAPPED_MAGIC = b"recserve-l2-probed-ivf\x00v1\x00"
ADD_CHUNK = 100_000  # items augmented and added at a time (bounds the temporary copy)
EXACT_LIMIT = 200_000  # catalogues up to this size are searched exactly by default
IVF_PROBE_SHARE = 5 / 32  # share of its IVF lists the auto index visits per query (see auto)
IVF_TRAIN_PER_LIST = 40  # training vectors per IVF list (faiss asks for at least 39)
RESCORE_DEPTH = 1000  # shortlist the auto index re-scores exactly
# On a GPU, exact search wins the batches the service forms over the IVF-PQ below (whose
# exact re-score runs on the CPU) until its cost, linear in the items, reaches the IVF's:
# measured on an H200 at about twice the 1M-item perf bundle (docs/BENCHMARKS.md, GPU path).
GPU_EXACT_LIMIT = 2_000_000
GPU_IVF_PROBE_SHARE = 1 / 4  # inner-product IVF (the GPU has no L2-probed search)
GPU_MAX_NPROBE = 2048  # faiss's GPU IVF visits at most this many lists per query
GPU_MAX_K = 2048  # faiss's GPU searches return at most this many results per query


@dataclass
class IndexSpec:
    """How to index: a faiss factory string and its search parameters."""

    factory: str = "Flat"
    nprobe: int = 32  # IVF lists visited per query
    ef_search: int = 128  # HNSW candidate list size
    rescore: int = 0  # shortlist size re-scored exactly (0: no re-scoring)
    train_size: int = 100_000  # vectors used to train IVF / PQ / OPQ
    mips_to_l2: bool = False  # index the L2-augmented vectors (see the module docstring)
    max_norm: float = 0.0  # M of the augmentation, set by ItemIndex.build

    @classmethod
    def auto(cls, n_items: int, dim: int, gpu: bool = False) -> IndexSpec:
        """Exact for small catalogues; for large ones IVF with 4-bit fast-scan PQ codes,
        partitioned in the L2-augmented space, with exact re-scoring. With ``gpu`` (the
        index will be searched by faiss on a GPU): exact up to ``GPU_EXACT_LIMIT`` items,
        then an inner-product IVF with 8-bit PQ codes, the kinds faiss's GPU searches."""
        if gpu:
            return cls._auto_gpu(n_items, dim)
        if n_items <= EXACT_LIMIT:
            return cls(factory="Flat")
        sub = augmented_dim(dim) // 2
        lists = ivf_lists(n_items)
        # An inner-product IVF partitions by direction (spherical k-means), while the top
        # items by inner product of a dot-product model are its long vectors over a wide
        # cone of directions, so it has to visit many of its lists for a high recall@100;
        # partitioned by L2 in the augmented space, IVF_PROBE_SHARE of the lists reach the
        # export's recall target on the perf bundle (docs/BENCHMARKS.md). Fast-scan codes (two
        # dimensions per 4-bit code, scanned with SIMD shuffles) cost a third of 8-bit PQ's
        # scan at the same shortlist quality once re-scored. OPQ is left out: after the
        # exact re-score it added nothing measurable to 8-bit PQ there.
        return cls(
            factory=f"IVF{lists},PQ{sub}x4fs",
            nprobe=max(1, round(lists * IVF_PROBE_SHARE)),
            rescore=RESCORE_DEPTH,
            train_size=cls.ivf_train_size(lists),
            mips_to_l2=True,
        )

    @classmethod
    def _auto_gpu(cls, n_items: int, dim: int) -> IndexSpec:
        if n_items <= GPU_EXACT_LIMIT:
            return cls(factory="Flat")
        lists = ivf_lists(n_items)
        # Fast-scan codes and the L2-probed partition have no GPU kernels; a plain
        # inner-product IVF-PQ with re-scoring reached recall@100 0.976 at a quarter of its
        # lists on the perf bundle, searched on an H200 (docs/BENCHMARKS.md).
        return cls(
            factory=f"IVF{lists},PQ{pq_subquantizers(dim)}",
            nprobe=min(GPU_MAX_NPROBE, max(1, round(lists * GPU_IVF_PROBE_SHARE))),
            rescore=RESCORE_DEPTH,
            train_size=cls.ivf_train_size(lists),
        )

    @classmethod
    def ivf_train_size(cls, lists: int) -> int:
        """Vectors to train an IVF of ``lists`` lists on: enough for faiss's k-means."""
        return max(cls.train_size, IVF_TRAIN_PER_LIST * lists)

    @property
    def exact(self) -> bool:
        return self.factory.strip().lower() == "flat"

    def to_dict(self) -> dict:
        return asdict(self)


def ivf_lists(n_items: int) -> int:
    """IVF lists for a catalogue: the power of two nearest 4 sqrt(N)."""
    return int(2 ** round(np.log2(4 * np.sqrt(n_items))))


def augmented_dim(dim: int) -> int:
    """Width of the MIPS->L2 space: one extra coordinate, zero-padded to a multiple of 4 so
    that PQ's sub-quantizers divide it as they divide the usual embedding sizes."""
    return 4 * -(-(dim + 1) // 4)


def pq_subquantizers(dim: int) -> int:
    # 4 dimensions per byte keeps PQ error low enough for re-scoring to recover the rest.
    for sub in (dim // 4, dim // 2, dim):
        if sub and dim % sub == 0:
            return sub
    return dim


class ItemIndex:
    """Top-k items by inner product for a batch of query vectors."""

    def __init__(self, index, vectors: np.ndarray, spec: IndexSpec, gpus: int = 0):

        self.index = index
        self.vectors = vectors  # (N + 1, d) float32, row 0 = padding; may be a memmap
        self.spec = spec
        self.gpus = gpus
        # faiss's GPU indexes are not thread-safe even to search (their resources object
        # hands every search the same scratch memory), while a worker computing in threads
        # (RECSERVE_COMPUTE=thread) may search from several at once: one at a time on a GPU.
        # CPU indexes are searched concurrently.
        self._searching = threading.Lock() if gpus else contextlib.nullcontext()
        self._index_dim = int(index.d)
        self._apply_search_params(index)
        # An inner-product IVF behind an L2 quantizer is searched with its own probes (the
        # IVF would take the quantizer's L2 distances for inner products of the centroids).
        self._l2_probed = _l2_probed(index, spec)
        self._on_sphere = _searched_on_sphere(index, spec)
        if self._l2_probed:
            self._transforms, self._ivf = _split_pretransform(index)
            self._centroids = self._ivf.quantizer.reconstruct_n(0, self._ivf.nlist)
            self._centroid_norms = (self._centroids**2).sum(1, dtype=np.float64).astype(np.float32)

    @property
    def n_items(self) -> int:
        return int(self.vectors.shape[0] - 1)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def max_depth(self) -> int:
        """The deepest search this index answers: the catalogue, or faiss's GPU limit."""
        return min(self.n_items, GPU_MAX_K) if self.gpus else self.n_items

    @classmethod
    def build(cls, vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> ItemIndex:
        """Index rows 1..N of ``vectors``; trains the quantisers on a seeded sample."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        items = vectors[1:]
        dim = items.shape[1]
        if spec.mips_to_l2:
            max_norm = float(np.sqrt(max((items.astype(np.float64) ** 2).sum(1).max(), 0.0)))
            spec = replace(spec, max_norm=max_norm)
            probe = faiss.index_factory(augmented_dim(dim), spec.factory, faiss.METRIC_L2)
            # An IVF is rebuilt with inner-product codes behind an L2 quantizer (see the
            # module docstring); Flat and HNSW stay L2.
            index = (
                faiss.index_factory(augmented_dim(dim), spec.factory, faiss.METRIC_INNER_PRODUCT)
                if _is_ivf(probe)
                else probe
            )
        else:
            index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        _skip_polysemous_training(index)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            size = min(len(items), spec.train_size)
            sample = _augment_items(
                items[np.sort(rng.choice(len(items), size, replace=False))], spec
            )
            if spec.mips_to_l2 and _is_ivf(index):
                _train_l2_partitioned(index, sample, seed)
            else:
                index.train(sample)
        for lo in range(0, len(items), ADD_CHUNK):
            index.add(_augment_items(items[lo : lo + ADD_CHUNK], spec))
        return cls(index, vectors, spec)

    def _apply_search_params(self, index) -> None:
        import faiss

        if self.gpus:
            # faiss's IVF helpers do not reach into GPU indexes; its GPU parameter space
            # does (and into every replica when the index spans several GPUs).
            if "ivf" in self.spec.factory.lower():
                nprobe = min(self.spec.nprobe, GPU_MAX_NPROBE)
                if nprobe < self.spec.nprobe:
                    LOG.warning(
                        "nprobe %d is over faiss's GPU limit: %d lists visited per query",
                        self.spec.nprobe,
                        nprobe,
                    )
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
            return
        try:
            faiss.extract_index_ivf(index).nprobe = self.spec.nprobe
        except RuntimeError:
            pass  # not an IVF index
        hnsw = getattr(faiss.downcast_index(_base_index(index)), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = self.spec.ef_search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and internal ids (b, k), best first; missing slots have id 0, score -inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.n_items))
        depth = max(k, min(self.spec.rescore, self.n_items)) if self.spec.rescore else k
        # In the augmented space every item lies on the sphere of radius M while a query sits
        # near the origin, where RaBitQ's and scalar quantizers' estimates are wrong by tens
        # of times the inner products they rank (on seeded data; see _searched_on_sphere).
        # Their codes are searched with the query moved onto that sphere, s q with
        # s = M / |q| (a positive scale leaves every order unchanged), and the scores are
        # divided by s again.
        scale = self._sphere_scale(queries) if self._on_sphere else None
        searched = queries if scale is None else queries * scale[:, None]
        if self._l2_probed:
            scores, labels = self._search_l2_probed(self._pad(searched), depth)
        elif self.spec.mips_to_l2:
            with self._searching:
                distances, labels = self.index.search(self._pad(searched), depth)
            # |q - x'|^2 = |q|^2 + M^2 - 2 q.x, so the inner product is recovered exactly.
            norms = (searched.astype(np.float64) ** 2).sum(1, keepdims=True)
            scores = ((norms + self.spec.max_norm**2 - distances) / 2).astype(np.float32)
        else:
            with self._searching:
                scores, labels = self.index.search(searched, depth)
        if scale is not None:
            scores = (scores / scale[:, None]).astype(np.float32)
        ids = np.where(labels >= 0, labels + 1, 0)
        if self.spec.rescore:
            scores, ids = self._rescore(queries, ids, k)
        scores = np.where(ids > 0, scores, -np.inf).astype(np.float32)
        return scores[:, :k], ids[:, :k]

    def _sphere_scale(self, queries: np.ndarray) -> np.ndarray:
        """Per query, the s that puts s q on the augmented items' sphere of radius M."""
        norms = np.linalg.norm(queries, axis=1)
        return (self.spec.max_norm / np.maximum(norms, 1e-12)).astype(np.float32)

    def _pad(self, queries: np.ndarray) -> np.ndarray:
        """Queries in the augmented space: zeros in the extra coordinates."""
        padded = np.zeros((len(queries), self._index_dim), dtype=np.float32)
        padded[:, : queries.shape[1]] = queries
        return padded

    def _search_l2_probed(self, padded: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        for transform in self._transforms:
            padded = transform.apply(padded)
        nprobe = min(self.spec.nprobe, self._ivf.nlist)
        self._ivf.nprobe = nprobe
        # Probes are the lists nearest to the query moved onto the sphere of radius M where
        # every augmented item lies, s q with s = M / |q| (a positive scale leaves the
        # items' order unchanged). With the query left at its own length the centroids'
        # norms decide instead: on seeded data with M = 21 and unit queries, recall@100 at
        # a quarter of the lists fell from 0.94 to 0.71; on the perf bundle (M = 1.8) the
        # two are within 0.001.
        # One product with the centroids gives both the probe order (|s q - c|^2 ranks
        # lists as 2 s q.c - |c|^2 does) and q.c, the term the IVF adds to the residual
        # codes' q.(x - c) per list. numpy's product and partial sort beat faiss's flat
        # quantizer search, whose heap of hundreds of probes dominated; float32, in place,
        # and the largest selected without negating cut it further (docs/BENCHMARKS.md).
        products = padded @ self._centroids.T  # (b, lists)
        closeness = products * (2 * self._sphere_scale(padded))[:, None]
        closeness -= self._centroid_norms
        first = self._ivf.nlist - nprobe
        lists = np.argpartition(closeness, first, axis=1)[:, first:]
        coarse = np.take_along_axis(products, lists, axis=1)
        return self._ivf.search_preassigned(padded, depth, lists, coarse)

    def _rescore(
        self, queries: np.ndarray, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        # Exact inner products for the shortlist, reading only those rows of the memory-mapped
        # vectors (np.take gathers rows several times faster than fancy indexing).
        rows = np.asarray(np.take(self.vectors, ids, axis=0))  # (b, depth, d)
        # A batched matrix-vector product (BLAS): faster than the same einsum.
        exact = np.matmul(rows, queries[:, :, None])[..., 0]  # (b, depth)
        exact = np.where(ids > 0, exact, -np.inf)
        if k < exact.shape[1]:
            # The best k, then their order (ties in shortlist order): a full sort of the
            # shortlist cost as much as the exact scoring itself.
            best = np.sort(np.argpartition(-exact, k - 1, axis=1)[:, :k], axis=1)
            exact, ids = np.take_along_axis(exact, best, 1), np.take_along_axis(ids, best, 1)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k against the float32 vectors: the ground truth for recall."""
        return exact_search(self.vectors, queries, k)

    def memory_bytes(self) -> int:
        """Size of the index structure itself (the float32 vectors stay memory-mapped)."""
        import faiss

        return int(faiss.serialize_index(self._cpu_index()).nbytes)

    def _cpu_index(self):
        import faiss

        return faiss.index_gpu_to_cpu(self.index) if self.gpus else self.index

    def save(self, path: str | Path) -> None:
        """Write the index; one that plain faiss searches wrong behind ``WRAPPED_MAGIC``."""
        import faiss

        index = self._cpu_index()
        if _l2_probed(index, self.spec) or _searched_on_sphere(index, self.spec):
            Path(path).write_bytes(WRAPPED_MAGIC + faiss.serialize_index(index).tobytes())
        else:
            faiss.write_index(index, str(path))

    @classmethod
    def load(
        cls, path: str | Path, vectors: np.ndarray, spec: IndexSpec, device: str = "auto"
    ) -> ItemIndex:
        """Read an index; with a GPU (``device`` auto or gpu) search moves onto it when
        faiss can search that kind of index there, and stays on the CPU otherwise."""
        import faiss

        with open(path, "rb") as file:
            wrapped = file.read(len(WRAPPED_MAGIC)) == WRAPPED_MAGIC
        if wrapped:
            raw = np.fromfile(path, dtype=np.uint8, offset=len(WRAPPED_MAGIC))
            index = faiss.deserialize_index(raw)
        else:
            index = faiss.read_index(str(path))
        gpus = faiss_gpus(device)
        if gpus and _l2_probed(index, spec):
            # Searched with probes and coarse terms of our own (search_preassigned), which
            # faiss's GPU indexes do not take; its 4-bit fast-scan codes have no GPU kernel.
            LOG.warning("faiss index %s is searched on the CPU (L2-probed IVF)", path)
            gpus = 0
        elif gpus:
            try:
                index = faiss.index_cpu_to_all_gpus(index)
                LOG.info("faiss index %s searched on %d GPU(s)", path, gpus)
            except RuntimeError as exc:
                LOG.warning("faiss index %s is searched on the CPU: %s", path, exc)
                gpus = 0
        return cls(index, vectors, spec, gpus=gpus)


def _l2_probed(index, spec: IndexSpec) -> bool:
    """An inner-product IVF behind an L2 quantizer in the augmented space (see build)."""
    import faiss

    return (
        spec.mips_to_l2
        and _is_ivf(index)
        and _base_index(index).metric_type == faiss.METRIC_INNER_PRODUCT
    )


def _searched_on_sphere(index, spec: IndexSpec) -> bool:
    """An augmented index of RaBitQ or scalar-quantizer codes (flat, IVF, fast-scan or under
    HNSW): searched with the query moved onto the items' sphere (see ItemIndex.search).

    Their estimates of a query near the origin are wrong by far more than the inner
    products they rank (RaBitQ's error grows with |q - c|; a scalar quantizer's L2 carries
    the error of the large extra coordinate, |x'|^2 - |x|^2, in full). The kinds served
    before (Flat, PQ, HNSW over floats) are left as they were.
    """
    import faiss

    if not spec.mips_to_l2:
        return False
    base = _base_index(index)
    storage = getattr(base, "storage", None)  # an HNSW's codes
    kinds = (
        faiss.IndexRaBitQ,
        faiss.IndexRaBitQFastScan,
        faiss.IndexIVFRaBitQ,
        faiss.IndexIVFRaBitQFastScan,
        faiss.IndexScalarQuantizer,
        faiss.IndexIVFScalarQuantizer,
    )
    return isinstance(base, kinds) or (
        storage is not None and isinstance(faiss.downcast_index(storage), kinds)
    )


def _is_ivf(index) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def _split_pretransform(index) -> tuple[list, object]:
    """(the vector transforms in front of an IVF, the IVF itself)."""
    import faiss

    index = faiss.downcast_index(index)
    transforms = []
    if isinstance(index, faiss.IndexPreTransform):
        transforms = [
            faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())
        ]
    return transforms, faiss.extract_index_ivf(index)


def _train_l2_partitioned(index, sample: np.ndarray, seed: int) -> None:
    """Train an inner-product IVF whose lists come from L2 k-means in the augmented space.

    faiss trains an inner-product IVF with spherical k-means and assigns and probes by inner
    product; here the transforms in front of it are trained first, then L2 k-means on the
    transformed sample fills an L2 quantizer that assigns items and picks probes, and the
    codes (residuals from those centroids) are trained as usual.
    """
    import faiss

    transforms, ivf = _split_pretransform(index)
    for transform in transforms:
        transform.train(sample)
        sample = transform.apply(sample)
    kmeans = faiss.Kmeans(ivf.d, ivf.nlist, niter=20, seed=seed)
    kmeans.train(sample)
    quantizer = faiss.IndexFlatL2(ivf.d)
    quantizer.add(kmeans.centroids)
    ivf.quantizer = quantizer
    ivf.own_fields = True
    quantizer.this.disown()  # the IVF frees it
    if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQFastScan):
        # The factory's fast-scan PQ encodes raw vectors; residuals from the centroids were
        # needed for recall@100 0.95 on the perf bundle (0.86 without, same scan).
        ivf.by_residual = True
    ivf.train(sample)
    index.is_trained = True


def _skip_polysemous_training(index) -> None:
    """faiss's factory turns on polysemous training for 8-bit PQ codes: simulated annealing
    that renumbers each sub-quantizer's centroids so that Hamming distances between codes
    track real ones. Only polysemous search (``polysemous_ht``) uses that order, and the
    service never searches that way; the renumbering leaves every score and result as it
    was, yet it cost seconds per sub-quantizer, most of an 8-bit PQ's training time: 13.5 s
    against 0.2 s without it for IVF16,PQ4x8 on 2,000 vectors, 67 s against 5 s for
    IVF32,PQ20x8 on 4,000, on one core."""
    base = _base_index(index)
    if hasattr(base, "do_polysemous_training"):
        base.do_polysemous_training = False


def _augment_items(items: np.ndarray, spec: IndexSpec) -> np.ndarray:
    """Items as the faiss index stores them: unchanged, or in the MIPS->L2 space."""
    items = np.ascontiguousarray(items, dtype=np.float32)
    if not spec.mips_to_l2:
        return items
    out = np.zeros((len(items), augmented_dim(items.shape[1])), dtype=np.float32)
    out[:, : items.shape[1]] = items
    squared = (items.astype(np.float64) ** 2).sum(1)
    # Rounding can push the largest norms a hair past M; clip so the root stays real.
    out[:, items.shape[1]] = np.sqrt(np.clip(spec.max_norm**2 - squared, 0.0, None))
    return out


def _base_index(index):
    import faiss

    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product over rows 1..N of ``vectors`` (row 0 = padding):
    scores and internal ids (q, k), id 0 where there are fewer than k items."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, labels = faiss.knn(
        queries, np.ascontiguousarray(vectors[1:]), k, metric=faiss.METRIC_INNER_PRODUCT
    )
    return scores, np.where(labels >= 0, labels + 1, 0)


def search_among(
    vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product among the items ``ids`` only (internal ids, rows of
    ``vectors``): scores and ids (q, min(k, len(ids))), best first, ties in ``ids`` order.
    What a filter that keeps few items is searched with: its cost grows with the items
    kept, not with the catalogue."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(ids))
    rows = vectors.take(ids, axis=0)  # (e, d); take: see _rescore (also ItemVectors')
    scores = queries @ rows.T  # (q, e)
    if k < len(ids):
        best = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
    else:
        best = np.broadcast_to(np.arange(len(ids)), scores.shape)
    scores = np.take_along_axis(scores, best, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), ids[np.take_along_axis(best, order, axis=1)]


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """|approximate top-k ∩ exact top-k| / k averaged over queries; the padding id 0 (a
    slot the index left empty) is never a hit."""
    hits = [
        len(np.intersect1d(a[:k][a[:k] > 0], e[:k]))
        for a, e in zip(approx_ids, exact_ids, strict=True)
    ]
    return float(np.mean(hits) / k) if hits else float("nan")


def measure_recall(
    index: ItemIndex,
    queries: np.ndarray,
    ks: tuple[int, ...] = (10, 100),
    *,
    exact_ids: np.ndarray | None = None,
    latency_queries: int = 200,
) -> dict[str, float]:
    """Recall@k against exact search for each k, plus single-query latency (p50, p99 ms)
    over the first ``latency_queries`` queries. ``exact_ids`` (q, max(ks)) spares the
    exact search when the caller measures several indexes against the same truth."""
    top = max(ks)
    if exact_ids is None:
        exact_ids = exact_search(index.vectors, queries, top)[1]
    _, approx_ids = index.search(queries, top)
    result = {f"recall@{k}": recall_at(approx_ids, exact_ids, k) for k in ks}
    index.search(queries[:1], top)  # warm-up: the first search pays for lazy set-up
    timings = []
    for query in queries[: min(len(queries), latency_queries)]:
        started = time.perf_counter()
        index.search(query[None], top)
        timings.append((time.perf_counter() - started) * 1000)
    result["query_ms_p50"] = float(np.median(timings))
    result["query_ms_p99"] = float(np.percentile(timings, 99))
    return result
