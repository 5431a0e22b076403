"""Compare faiss indexes over the same item vectors: build time, size, latency, recall.

    .venv/bin/python -m bench.make_perf_bundle            # first: models/perf-1m
    .venv/bin/python -m bench.index --bundle models/perf-1m \
        --queries runs/perf-1m/heldout_queries.npy --coarse-study --markdown

(from the repository root; how long it runs: docs/BENCHMARKS.md, section 2). Without a
bundle, ``--synthetic 1000000`` indexes seeded clustered vectors instead (queries near
items).

Every index is searched through ``service.retrieval.ItemIndex``, the class the service
serves with, so "re-score" is the service's exact re-scoring of the shortlist against the
float32 vectors (memory-mapped from the bundle). Indexes, for N items of dimension d and
the lists / sub-quantisers / shortlist that ``IndexSpec.auto`` picks for N:

- Flat: exact inner-product search, the ground truth;
- IVF-PQ: ``IVF{lists},PQ{m}x8`` ranked by its PQ scores alone;
- IVF-PQ + re-score: the same index, its top ``rescore`` re-scored exactly;
- OPQ + IVF-PQ + re-score: ``OPQ{m},IVF{lists},PQ{m}x8`` over inner product;
- MIPS->L2 IVF-PQ + re-score: lists from L2 k-means in the augmented space (one extra
  coordinate per item, ``mips_to_l2``), probed by L2 there, 8-bit PQ codes of the
  residuals scored by inner product;
- MIPS->L2 IVF-PQ fast-scan + re-score: the same partition with 4-bit fast-scan codes (two
  dimensions per code), what ``IndexSpec.auto`` builds;
- HNSW32: a graph over the float32 vectors.

For each, over a sweep of nprobe (IVF) or efSearch (HNSW): recall@10 and recall@100
against exact search (the service's ``ItemIndex.exact_search``, searched once for all
indexes), single-query latency (median and p99, top-100) and the latency of a batch of
64 queries; per built index its build time and bytes per vector (the serialised index,
which for IVF-PQ excludes the memory-mapped float32 vectors). Writes a table to stdout,
``docs/index_bench.json`` and ``docs/index_recall_latency.png``.

``--kinds new`` compares the auto index with faiss's newer kinds instead (RaBitQ, its
fast-scan, IVF-SQ4, HNSW over RaBitQ or SQ4 codes: ``new_kind_cases``) and prints each
index's cheapest point at recall@100 >= 0.95 (``operating_points``).

``--coarse-study`` adds what limits IVF recall on inner-product data: the share of the
exact top-100 that lies in the visited lists, for faiss's spherical partition (what is
served) and two alternatives (see ``coarse_coverage``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from service.bundle import read_manifest
from service.devices import faiss_gpus
from service.retrieval import (
    EXACT_LIMIT,
    IndexSpec,
    ItemIndex,
    augmented_dim,
    exact_search,
    ivf_lists,
    measure_recall,
    pq_subquantizers,
)

LOG = logging.getLogger("bench.index")

TOP = 100  # every search asks for the top 100; recall@10 is read from its first 10
PROBE_SHARES = (1 / 128, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # nprobe sweep, share of lists
EF_SEARCHES = (16, 32, 64, 128, 256, 512)
# HNSW over codes is re-scored like the served index, and faiss's HNSW keeps at least k
# candidates, so only an efSearch above the re-score depth changes anything.
EF_OVER_RESCORE = (1, 1.5, 2, 3)  # efSearch sweep, multiples of the re-score depth
HNSW_LINKS = (8, 16, 32)  # M of the HNSW-over-codes cases (bytes/vector grow with it)
DEEP_RESCORE = 4  # a RaBitQ case re-scores this many times the auto depth
TARGET_RECALL = 0.95  # recall@100 of the operating points compared (serving-speed issue)


@dataclass
class IndexCase:
    """One index type: how to build it and which search parameter to sweep."""

    label: str
    factory: str
    rescore: int = 0
    sweep: str = ""  # "nprobe", "ef_search" or "" (no parameter)
    values: tuple[int, ...] = ()
    _: KW_ONLY
    shares: str = ""  # label of a case whose built index this one searches
    train_size: int = 100_000
    mips_to_l2: bool = False
    # faiss search settings of the index itself (e.g. RaBitQ's query bits ``qb``), set on
    # the built (or shared) index before this case searches it
    options: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Point:
    """One operating point of one index."""

    label: str
    param: str
    value: int | None
    recall_at_10: float
    recall_at_100: float
    query_ms_p50: float
    query_ms_p99: float
    batch64_ms_p50: float


@dataclass
class Built:
    """What building one index cost."""

    label: str
    factory: str
    build_seconds: float
    bytes_per_vector: float
    compression: float
    _: KW_ONLY
    points: list[Point] = field(default_factory=list)


def index_shape(n_items: int, dim: int) -> tuple[int, int, int, int, int]:
    """(lists, PQ sub-quantisers of the augmented space, re-score depth, nprobe, train
    size) as ``IndexSpec.auto``.

    Below ``EXACT_LIMIT`` auto picks Flat, so the compressed spec for a catalogue just
    above it is scaled down to ``n_items`` (about 4 sqrt(N) lists, the same share of them
    visited) for small test runs.
    """
    spec = IndexSpec.auto(max(n_items, EXACT_LIMIT + 1), dim)
    found = re.search(r"IVF(\d+),PQ(\d+)x", spec.factory)
    if not found:
        raise ValueError(f"IndexSpec.auto gave {spec.factory!r}; expected an IVF-PQ factory")
    lists, sub = int(found.group(1)), int(found.group(2))
    nprobe = spec.nprobe
    if n_items <= EXACT_LIMIT:
        small = ivf_lists(n_items)
        lists, nprobe = small, max(1, round(nprobe * small / lists))
    return lists, sub, spec.rescore, nprobe, min(spec.train_size, n_items)


def default_cases(
    n_items: int, dim: int, train_size: int = 0, hnsw: bool = True, gpu: bool = False
) -> list[IndexCase]:
    """The five index types; ``train_size`` 0 trains on what ``IndexSpec.auto`` uses. With
    ``gpu``, the three that faiss searches on a GPU (no OPQ, L2-probed lists, fast-scan
    codes or HNSW there)."""
    lists, fast_sub, rescore, nprobe, auto_train = index_shape(n_items, dim)
    sub = pq_subquantizers(dim)
    augmented_sub = pq_subquantizers(augmented_dim(dim))
    train_size = train_size or auto_train
    nprobes = tuple(sorted({max(1, round(lists * s)) for s in PROBE_SHARES} | {nprobe}))
    ivfpq = f"IVF{lists},PQ{sub}x8"
    cases = [
        IndexCase("Flat", "Flat"),
        IndexCase("IVF-PQ", ivfpq, 0, "nprobe", nprobes, train_size=train_size),
        IndexCase("IVF-PQ + re-score", ivfpq, rescore, "nprobe", nprobes, shares="IVF-PQ"),
        IndexCase(
            "OPQ + IVF-PQ + re-score",
            f"OPQ{sub},{ivfpq}",
            rescore,
            "nprobe",
            nprobes,
            train_size=train_size,
        ),
        IndexCase(
            "MIPS->L2 IVF-PQ + re-score",
            f"IVF{lists},PQ{augmented_sub}x8",
            rescore,
            "nprobe",
            nprobes,
            train_size=train_size,
            mips_to_l2=True,
        ),
        IndexCase(
            "MIPS->L2 IVF-PQ fast-scan + re-score",
            f"IVF{lists},PQ{fast_sub}x4fs",
            rescore,
            "nprobe",
            nprobes,
            train_size=train_size,
            mips_to_l2=True,
        ),
    ]
    if gpu:
        return cases[:3]
    if hnsw:
        cases.append(IndexCase("HNSW32", "HNSW32", 0, "ef_search", EF_SEARCHES))
    return cases


def new_kind_cases(n_items: int, dim: int, train_size: int = 0) -> list[IndexCase]:
    """The auto index beside faiss's newer kinds (serving-speed issue), all in the MIPS->L2
    space and re-scored to the auto depth, the IVF kinds over the auto lists and nprobe
    sweep:

    - RaBitQ, 1 bit per dimension, faiss's default query bits (4) and 8, and with a
      shortlist ``DEEP_RESCORE`` times as deep;
    - RaBitQ fast-scan (faiss has no scalar-quantizer fast-scan: this 1-bit quantizer
      with SIMD-scanned codes is the nearest), default 8 query bits, plain and centred;
    - RaBitQ fast-scan with 4 bits per dimension;
    - IVF-SQ4: 4-bit scalar quantizer codes;
    - HNSW over 1-bit RaBitQ codes for ``HNSW_LINKS`` and over SQ4 codes (M = 32), at
      efSearch from the re-score depth up.
    """
    lists, fast_sub, rescore, nprobe, auto_train = index_shape(n_items, dim)
    train_size = train_size or auto_train
    nprobes = tuple(sorted({max(1, round(lists * s)) for s in PROBE_SHARES} | {nprobe}))
    efs = tuple(int(rescore * f) for f in EF_OVER_RESCORE)
    ivf = {"train_size": train_size, "mips_to_l2": True}
    rabitq = "MIPS->L2 IVF-RaBitQ + re-score"
    rabitq_fs = "MIPS->L2 IVF-RaBitQ fast-scan + re-score"
    cases = [
        IndexCase(
            "auto: MIPS->L2 IVF-PQ fast-scan + re-score",
            f"IVF{lists},PQ{fast_sub}x4fs",
            rescore,
            "nprobe",
            nprobes,
            **ivf,
        ),
        # faiss's defaults: 4 query bits for RaBitQ, 8 for its fast-scan, not centred.
        IndexCase(
            rabitq, f"IVF{lists},RaBitQ", rescore, "nprobe", nprobes, **ivf, options={"qb": 4}
        ),
        IndexCase(
            "MIPS->L2 IVF-RaBitQ qb=8 + re-score",
            f"IVF{lists},RaBitQ",
            rescore,
            "nprobe",
            nprobes,
            shares=rabitq,
            options={"qb": 8},
        ),
        # 1-bit codes rank too coarsely for the auto depth to reach recall@100 0.95 (seeded
        # data): the same index with a shortlist four times as deep.
        IndexCase(
            f"MIPS->L2 IVF-RaBitQ + re-score {DEEP_RESCORE * rescore}",
            f"IVF{lists},RaBitQ",
            DEEP_RESCORE * rescore,
            "nprobe",
            nprobes,
            shares=rabitq,
            options={"qb": 4},
        ),
        IndexCase(
            rabitq_fs,
            f"IVF{lists},RaBitQfs",
            rescore,
            "nprobe",
            nprobes,
            **ivf,
            options={"qb": 8, "centered": False},
        ),
        IndexCase(
            "MIPS->L2 IVF-RaBitQ fast-scan centred + re-score",
            f"IVF{lists},RaBitQfs",
            rescore,
            "nprobe",
            nprobes,
            shares=rabitq_fs,
            options={"qb": 8, "centered": True},
        ),
        IndexCase(
            "MIPS->L2 IVF-RaBitQ 4-bit fast-scan + re-score",
            f"IVF{lists},RaBitQfs4",
            rescore,
            "nprobe",
            nprobes,
            **ivf,
        ),
        IndexCase(
            "MIPS->L2 IVF-SQ4 + re-score", f"IVF{lists},SQ4", rescore, "nprobe", nprobes, **ivf
        ),
    ]
    for links in HNSW_LINKS:
        cases.append(
            IndexCase(
                f"MIPS->L2 HNSW{links}-RaBitQ + re-score",
                f"HNSW{links},RaBitQ",
                rescore,
                "ef_search",
                efs,
                train_size=train_size,
                mips_to_l2=True,
            )
        )
    cases.append(
        IndexCase(
            "MIPS->L2 HNSW32-SQ4 + re-score",
            "HNSW32,SQ4",
            rescore,
            "ef_search",
            efs,
            train_size=train_size,
            mips_to_l2=True,
        )
    )
    return cases


# --------------------------------------------------------------------------- data


def clustered_vectors(n: int, dim: int, seed: int = 0, clusters: int = 1024) -> np.ndarray:
    """Seeded vectors with cluster structure and uneven norms, row 0 = padding (N + 1, d)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    rows = centres[rng.integers(0, clusters, n)] + 0.7 * rng.normal(size=(n, dim)).astype(
        np.float32
    )
    rows *= rng.lognormal(0.0, 0.3, size=(n, 1)).astype(np.float32)
    return np.vstack([np.zeros((1, dim), np.float32), rows]).astype(np.float32)


def queries_near_items(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Unit-length queries: random items' vectors plus noise (a stand-in for users)."""
    rng = np.random.default_rng(seed)
    picked = vectors[1 + rng.integers(0, len(vectors) - 1, count)]
    q = picked + 0.5 * picked.std() * rng.normal(size=picked.shape)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def bundle_vectors(bundle: Path) -> tuple[np.ndarray, str]:
    """The default retriever's item vectors of a bundle folder (memory-mapped) and a label."""
    manifest = read_manifest(bundle)
    encoder = manifest["default_encoder"]
    entry = manifest["retrievers"][encoder]
    vectors = np.load(bundle / entry["files"]["item_embeddings"], mmap_mode="r")
    return vectors, f"bundle {bundle.name} ({encoder}, {manifest['dataset']['source']})"


# --------------------------------------------------------------------------- measuring


def exact_top(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Internal ids (q, TOP) of the exact top-``TOP`` by inner product: the ground truth."""
    return exact_search(vectors, queries, TOP)[1]


def batch_ms(index: ItemIndex, queries: np.ndarray, batch: int = 64, repeats: int = 5) -> float:
    """Median time of one search over ``batch`` queries."""
    batch = min(batch, len(queries))
    timings = []
    for r in range(repeats):
        lo = (r * batch) % max(1, len(queries) - batch + 1)
        started = time.perf_counter()
        index.search(queries[lo : lo + batch], TOP)
        timings.append((time.perf_counter() - started) * 1000)
    return float(np.median(timings))


def measure(
    index: ItemIndex,
    case: IndexCase,
    value: int | None,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    *,
    latency_queries: int,
) -> Point:
    quality = measure_recall(
        index, queries, (10, TOP), exact_ids=exact_ids, latency_queries=latency_queries
    )
    return Point(
        label=case.label,
        param=case.sweep,
        value=value,
        recall_at_10=quality["recall@10"],
        recall_at_100=quality[f"recall@{TOP}"],
        query_ms_p50=quality["query_ms_p50"],
        query_ms_p99=quality["query_ms_p99"],
        batch64_ms_p50=batch_ms(index, queries),
    )


def run_cases(
    vectors: np.ndarray,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    cases: list[IndexCase],
    *,
    latency_queries: int = 200,
    seed: int = 0,
    gpus: int = 0,
) -> list[Built]:
    """Build each index (once per factory), sweep its parameter, measure every point;
    with ``gpus``, built on the CPU and searched on the GPUs."""
    n_items, dim = vectors.shape[0] - 1, vectors.shape[1]
    built: dict[str, tuple[ItemIndex, Built]] = {}
    results = []
    for case in cases:
        if case.shares:
            base, base_info = built[case.shares]
            info = replace(base_info, label=case.label, factory=case.factory, points=[])
            faiss_index, built_spec = base.index, base.spec
        else:
            LOG.info("building %s (%s) over %d vectors", case.label, case.factory, n_items)
            started = time.perf_counter()
            spec = IndexSpec(case.factory, train_size=case.train_size, mips_to_l2=case.mips_to_l2)
            item_index = ItemIndex.build(vectors, spec, seed=seed)
            seconds = time.perf_counter() - started
            per_vector = item_index.memory_bytes() / n_items
            info = Built(case.label, case.factory, seconds, per_vector, 4 * dim / per_vector)
            built[case.label] = (item_index, info)
            faiss_index, built_spec = item_index.index, item_index.spec
            if gpus:
                import faiss

                faiss_index = faiss.index_cpu_to_all_gpus(faiss_index)
                item_index.index = faiss_index  # what a case sharing it searches
            LOG.info("  built in %.1fs, %.1f bytes/vector", seconds, per_vector)
        set_faiss_options(faiss_index, case.options)
        for value in case.values or (None,):
            options = {case.sweep: value} if case.sweep else {}
            spec = replace(built_spec, rescore=case.rescore, **options)
            point = measure(
                ItemIndex(faiss_index, vectors, spec, gpus=gpus),
                case,
                value,
                queries,
                exact_ids,
                latency_queries=latency_queries,
            )
            LOG.info(
                "  %s %s=%s recall@10 %.4f @100 %.4f p50 %.2f ms",
                case.label,
                case.sweep or "-",
                value,
                point.recall_at_10,
                point.recall_at_100,
                point.query_ms_p50,
            )
            info.points.append(point)
        results.append(info)
    return results


def only_cases(cases: list[IndexCase], texts: list[str]) -> list[IndexCase]:
    """The cases whose label contains one of ``texts``, with the cases whose built index
    they search, in their original order."""
    wanted = {case.label for case in cases if any(text in case.label for text in texts)}
    wanted |= {case.shares for case in cases if case.label in wanted and case.shares}
    return [case for case in cases if case.label in wanted]


def set_faiss_options(index, options: dict) -> None:
    """Set search settings (attributes) on the faiss index under any transforms and IVF."""
    import faiss

    if not options:
        return
    try:
        target = faiss.extract_index_ivf(index)
    except RuntimeError:
        target = index
        while isinstance(target, faiss.IndexPreTransform):
            target = target.index
    target = faiss.downcast_index(target)
    for name, value in options.items():
        setattr(target, name, value)


def coarse_coverage(
    vectors: np.ndarray,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    *,
    lists: int,
    train_size: int,
    seed: int = 0,
) -> list[dict]:
    """Share of the exact top-100 inside the visited IVF lists, for three partitions.

    - "spherical k-means, IP probe": what faiss builds for an inner-product IVF (and so
      what the service serves);
    - "L2 k-means, IP probe": centroids and item assignment by L2, lists visited by
      inner product with the query (long centroids first);
    - "MIPS->L2 augmentation": items get an extra coordinate sqrt(M^2 - |x|^2) and
      queries a 0, which turns maximum inner product into nearest neighbour in L2
      (Bachrach et al., RecSys'14); L2 k-means and L2 probing in that space.

    Only the coarse level is compared: in the visited lists the re-scored PQ shortlist
    recovers (nearly) everything, so this coverage bounds recall@100.
    """
    import faiss

    items = np.ascontiguousarray(vectors[1:], dtype=np.float32)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(items), min(train_size, len(items)), replace=False)
    norms = np.linalg.norm(items, axis=1)
    extra = np.sqrt(np.maximum(norms.max() ** 2 - norms**2, 0.0))[:, None]
    augmented = np.hstack([items, extra]).astype(np.float32)
    padded_queries = np.hstack([queries, np.zeros((len(queries), 1), np.float32)])
    partitions = [
        ("spherical k-means, IP probe", items, queries, True, "ip"),
        ("L2 k-means, IP probe", items, queries, False, "ip"),
        ("MIPS->L2 augmentation", augmented, padded_queries, False, "l2"),
    ]
    probes = sorted({max(1, round(lists * share)) for share in PROBE_SHARES})
    rows = []
    for name, data, qs, spherical, probe in partitions:
        started = time.perf_counter()
        kmeans = faiss.Kmeans(data.shape[1], lists, niter=10, seed=seed, spherical=spherical)
        kmeans.train(data[sample])
        _, assign = kmeans.index.search(data, 1)
        assign = assign.ravel()
        sizes = np.bincount(assign, minlength=lists)
        if probe == "ip":
            order = np.argsort(-(qs @ kmeans.centroids.T), axis=1)  # (q, lists)
        else:
            order = kmeans.index.search(qs, lists)[1]
        for nprobe in probes:
            visited = order[:, :nprobe]
            covered = [
                np.isin(assign[ids - 1], row).mean()
                for ids, row in zip(exact_ids, visited, strict=True)
            ]
            rows.append(
                {
                    "partition": name,
                    "nprobe": nprobe,
                    "coverage_at_100": float(np.mean(covered)),
                    "scanned_share": float(sizes[visited].sum(axis=1).mean() / len(items)),
                }
            )
        LOG.info("coarse study: %s in %.0fs", name, time.perf_counter() - started)
    return rows


def render(header: list[str], rows: list[list[str]], markdown: bool, left: int = 1) -> str:
    """A plain-text table (first ``left`` columns left-aligned) or a Markdown one."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def format_coverage(rows: list[dict], markdown: bool = False) -> str:
    header = ["partition", "nprobe", "scanned", "exact top-100 in visited lists"]
    body = [
        [
            r["partition"],
            str(r["nprobe"]),
            f"{r['scanned_share']:.1%}",
            f"{r['coverage_at_100']:.3f}",
        ]
        for r in rows
    ]
    return render(header, body, markdown)


# The measured columns of both tables, after the index and its parameter.
MEASURED = [
    "build s",
    "B/vector",
    "compression",
    "recall@10",
    "recall@100",
    "p50 ms",
    "p99 ms",
    "batch64 ms",
]


def format_table(results: list[Built], markdown: bool = False) -> str:
    header = ["index", "param", *MEASURED]
    rows = [
        [
            info.label,
            f"{p.param}={p.value}" if p.param else "-",
            f"{info.build_seconds:.1f}",
            f"{info.bytes_per_vector:.1f}",
            f"{info.compression:.1f}x",
            f"{p.recall_at_10:.4f}",
            f"{p.recall_at_100:.4f}",
            f"{p.query_ms_p50:.2f}",
            f"{p.query_ms_p99:.2f}",
            f"{p.batch64_ms_p50:.1f}",
        ]
        for info in results
        for p in info.points
    ]
    return render(header, rows, markdown, left=2)


def operating_points(results: list[Built], target: float = TARGET_RECALL) -> list[dict]:
    """Per index, its cheapest swept point (first in sweep order, which visits more as it
    goes) with recall@100 >= ``target``; an index that never reaches it gets its best
    recall@100 and ``reached`` false."""
    rows = []
    for info in results:
        reached = [p for p in info.points if p.recall_at_100 >= target]
        point = reached[0] if reached else max(info.points, key=lambda p: p.recall_at_100)
        rows.append(
            {
                "label": info.label,
                "factory": info.factory,
                "build_seconds": info.build_seconds,
                "bytes_per_vector": info.bytes_per_vector,
                "compression": info.compression,
                "reached": bool(reached),
                **asdict(point),
            }
        )
    return rows


def format_operating_points(rows: list[dict], markdown: bool = False) -> str:
    header = ["index", f"param (recall@100 >= {TARGET_RECALL})", *MEASURED]
    body = [
        [
            r["label"],
            (f"{r['param']}={r['value']}" if r["param"] else "-")
            + ("" if r["reached"] else " (not reached: best)"),
            f"{r['build_seconds']:.1f}",
            f"{r['bytes_per_vector']:.1f}",
            f"{r['compression']:.1f}x",
            f"{r['recall_at_10']:.4f}",
            f"{r['recall_at_100']:.4f}",
            f"{r['query_ms_p50']:.2f}",
            f"{r['query_ms_p99']:.2f}",
            f"{r['batch64_ms_p50']:.1f}",
        ]
        for r in rows
    ]
    return render(header, body, markdown, left=2)


def plot(results: list[Built], path: Path, title: str) -> None:
    """Recall@100 against median single-query latency, one line per index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for info in results:
        xs = [p.query_ms_p50 for p in info.points]
        ys = [p.recall_at_100 for p in info.points]
        label = f"{info.label} ({info.bytes_per_vector:.0f} B/vector, {info.compression:.1f}x)"
        ax.plot(xs, ys, marker="o", label=label)
        for p in info.points:
            if p.value is not None:
                ax.annotate(
                    str(p.value),
                    (p.query_ms_p50, p.recall_at_100),
                    fontsize=7,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("median single-query latency, top-100 (ms, log scale)")
    ax.set_ylabel("recall@100 vs exact search")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    import faiss

    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def run_benchmark(
    vectors: np.ndarray,
    queries: np.ndarray,
    cases: list[IndexCase],
    source: str,
    *,
    out_json: Path | None = None,
    out_png: Path | None = None,
    latency_queries: int = 200,
    coarse_study: bool = False,
    gpus: int = 0,
) -> dict:
    """Run every case (and the coarse study); write the JSON and PNG; return the result."""
    before = machine()
    started = time.perf_counter()
    exact_ids = exact_top(vectors, queries)
    LOG.info(
        "exact top-%d of %d queries in %.1fs", TOP, len(queries), time.perf_counter() - started
    )
    results = run_cases(
        vectors, queries, exact_ids, cases, latency_queries=latency_queries, gpus=gpus
    )
    coverage = []
    if coarse_study:
        lists, _, _, _, train_size = index_shape(vectors.shape[0] - 1, vectors.shape[1])
        coverage = coarse_coverage(vectors, queries, exact_ids, lists=lists, train_size=train_size)
    seconds = time.perf_counter() - started
    report = {
        "source": source,
        "items": int(vectors.shape[0] - 1),
        "dim": int(vectors.shape[1]),
        "queries": int(len(queries)),
        "latency_queries": int(min(latency_queries, len(queries))),
        "top": TOP,
        "machine": before,
        "searched_on": f"{gpus} GPU(s)" if gpus else "CPU",
        "load_average_after": list(os.getloadavg()),
        "seconds": seconds,
        "cases": [asdict(c) for c in cases],
        "results": [asdict(r) for r in results],
        "coarse_study": coverage,
        "operating_points": operating_points(results),
    }
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2))
    if out_png is not None:
        plot(results, out_png, plot_title(report))
    return with_tables(report, results)


def plot_title(report: dict) -> str:
    sizes = f"{report['items']:,} items x {report['dim']} dims, {report['queries']} queries"
    sizes += f", searched on {report.get('searched_on', 'CPU')}"
    source = report["source"]
    return f"{sizes}\n{source if len(source) <= 90 else source[:87] + '...'}"


def with_tables(report: dict, results: list[Built]) -> dict:
    """The report with its results as a plain-text and a Markdown table."""
    coverage = report.get("coarse_study") or []
    report["table"] = format_table(results)
    report["markdown"] = format_table(results, markdown=True)
    if report.get("operating_points"):
        points = report["operating_points"]
        report["table"] += "\n\n" + format_operating_points(points)
        report["markdown"] += "\n\n" + format_operating_points(points, markdown=True)
    if coverage:
        report["table"] += "\n\n" + format_coverage(coverage)
        report["markdown"] += "\n\n" + format_coverage(coverage, markdown=True)
    return report


def results_from_report(report: dict) -> list[Built]:
    """The ``Built`` results of a JSON report written by ``run_benchmark``."""
    results = []
    for entry in report["results"]:
        points = [Point(**p) for p in entry["points"]]
        results.append(Built(**{**entry, "points": points}))
    return results


def replot(json_path: Path, out_png: Path) -> dict:
    """Tables and PNG again from a JSON report, without measuring anything."""
    report = json.loads(json_path.read_text())
    results = results_from_report(report)
    plot(results, out_png, plot_title(report))
    return with_tables(report, results)


def sweep_served(bundle: Path, queries: np.ndarray, latency_queries: int) -> list[Point]:
    """The bundle's own index, as the service loads it, at a range of nprobe: nothing is
    built, so a served index can be re-tuned without a rebuild."""
    manifest = read_manifest(bundle)
    entry = manifest["retrievers"][manifest["default_encoder"]]
    vectors = np.load(bundle / entry["files"]["item_embeddings"], mmap_mode="r")
    spec = IndexSpec(**entry["index"]["spec"])
    served = ItemIndex.load(bundle / entry["files"]["index"], vectors, spec, device="cpu")
    case = IndexCase(f"served {spec.factory}", spec.factory, spec.rescore, "nprobe")
    exact_ids = exact_top(vectors, queries)
    lists = faiss_lists(served.index)
    points = []
    # The spec's own nprobe beside the usual shares of the lists.
    for nprobe in sorted({max(1, round(lists * share)) for share in PROBE_SHARES} | {spec.nprobe}):
        index = ItemIndex(served.index, vectors, replace(spec, nprobe=nprobe))
        points.append(
            measure(index, case, nprobe, queries, exact_ids, latency_queries=latency_queries)
        )
        LOG.info("served nprobe=%d recall@100 %.4f", nprobe, points[-1].recall_at_100)
    return points


def faiss_lists(index) -> int:
    import faiss

    return int(faiss.extract_index_ivf(index).nlist)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="bundle folder, e.g. models/perf-1m")
    source.add_argument("--synthetic", type=int, help="N seeded clustered vectors instead")
    parser.add_argument("--dim", type=int, default=64, help="with --synthetic")
    parser.add_argument(
        "--queries",
        type=Path,
        help="(q, d) float32 .npy of user embeddings "
        "(default with --bundle: runs/<bundle name>/heldout_queries.npy when it exists)",
    )
    parser.add_argument("--n-queries", type=int, default=1000, help="queries used for recall")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument(
        "--train-size", type=int, default=0, help="IVF/PQ training vectors (0: as auto)"
    )
    parser.add_argument("--no-hnsw", action="store_true", help="skip HNSW32 (slow to build)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="with --kinds new: only the cases whose label contains TEXT (repeatable; a "
        "case that searches another's index brings that one along)",
    )
    parser.add_argument(
        "--kinds",
        default="default",
        choices=["default", "new"],
        help="new: the auto index beside faiss's RaBitQ, SQ4 and HNSW-over-codes kinds "
        "(new_kind_cases; --no-hnsw leaves out the HNSW ones)",
    )
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0: all cores)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "gpu"],
        help="gpu: search on every GPU faiss sees (built on the CPU), the kinds it can search",
    )
    parser.add_argument("--out-json", type=Path, default=Path("docs/index_bench.json"))
    parser.add_argument("--out-png", type=Path, default=Path("docs/index_recall_latency.png"))
    parser.add_argument(
        "--coarse-study",
        action="store_true",
        help="also compare IVF partitions by how much of the exact top-100 they visit",
    )
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument(
        "--served",
        action="store_true",
        help="with --bundle: sweep nprobe of the bundle's own IVF index; builds nothing",
    )
    parser.add_argument(
        "--from-json", type=Path, help="redraw the PNG and tables from a JSON report; no runs"
    )
    return parser


def load_inputs(args) -> tuple[np.ndarray, np.ndarray, str]:
    if args.synthetic:
        vectors = clustered_vectors(args.synthetic, args.dim)
        return vectors, queries_near_items(vectors, args.n_queries), "seeded clustered vectors"
    bundle = args.bundle or Path("models/perf-1m")
    if not bundle.is_dir():
        raise SystemExit(f"error: {bundle}: no bundle; run bench.make_perf_bundle or --synthetic")
    vectors, source = bundle_vectors(bundle)
    queries_path = args.queries or Path("runs") / bundle.name / "heldout_queries.npy"
    if queries_path.is_file():
        queries = np.load(queries_path, allow_pickle=False)[: args.n_queries]
        return vectors, queries.astype(np.float32), f"{source}; held-out user queries"
    LOG.warning("%s not found: queries are item vectors plus noise", queries_path)
    return vectors, queries_near_items(vectors, args.n_queries), f"{source}; queries near items"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.from_json:
        report = replot(args.from_json, args.out_png)
        print(report["markdown"] if args.markdown else report["table"])
        print(f"wrote {args.out_png}")
        return 0
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    vectors, queries, source = load_inputs(args)
    if args.served:
        points = sweep_served(args.bundle or Path("models/perf-1m"), queries, args.latency_queries)
        print(f"{points[0].label} on {source}")
        print("| nprobe | recall@10 | recall@100 | p50 ms | p99 ms | batch64 ms |")
        print("| --- | --- | --- | --- | --- | --- |")
        for point in points:
            print(
                f"| {point.value} | {point.recall_at_10:.4f} | {point.recall_at_100:.4f} | "
                f"{point.query_ms_p50:.2f} | {point.query_ms_p99:.2f} | "
                f"{point.batch64_ms_p50:.1f} |"
            )
        return 0
    n_items, dim = vectors.shape[0] - 1, vectors.shape[1]
    gpus = faiss_gpus("gpu") if args.device == "gpu" else 0
    if args.kinds == "new":
        cases = new_kind_cases(n_items, dim, args.train_size)
        if args.no_hnsw:
            cases = [case for case in cases if case.sweep != "ef_search"]
        if args.only:
            cases = only_cases(cases, args.only)
    else:
        cases = default_cases(n_items, dim, args.train_size, hnsw=not args.no_hnsw, gpu=bool(gpus))
    report = run_benchmark(
        vectors,
        queries,
        cases,
        source,
        out_json=args.out_json,
        out_png=args.out_png,
        latency_queries=args.latency_queries,
        coarse_study=args.coarse_study,
        gpus=gpus,
    )
    print(plot_title(report))
    print(report["table"])
    if args.markdown:
        print()
        print(report["markdown"])
    print(f"wrote {args.out_json} and {args.out_png}; {report['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
