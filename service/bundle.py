"""Versioned model bundles: written by the export job, loaded by the service.

Layout of ``models/<name>/`` (see docs/ARCHITECTURE.md)::

    manifest.json                       format version, provenance, metrics, sha256 of every file
    items.parquet                       item_id, raw_id, popularity, title, genres
    retrievers/<encoder>/user_encoder.onnx
    retrievers/<encoder>/item_embeddings.npy   float32 (N + 1, d), row = internal id
    retrievers/<encoder>/items.faiss
    retrievers/<encoder>/ctr_head.onnx         optional

``models/CURRENT`` names the active bundle. A bundle is written under a temporary name and
renamed into place when complete; CURRENT is replaced atomically. Loading verifies the
format version and every checksum, and refuses a mismatch with a message naming the file.
No pickle is ever loaded (``allow_pickle=False``), and bundle names are plain names
resolved inside the models directory, so CURRENT cannot point elsewhere.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from service.encoder import OnnxUserEncoder
from service.errors import BundleError, excerpt
from service.features import ItemFeatures
from service.ranking import CtrHead
from service.retrieval import IndexSpec, ItemIndex

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
ITEMS = "items.parquet"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def retriever_dir(encoder: str) -> str:
    return f"retrievers/{encoder}"


# --------------------------------------------------------------------------- names


def check_name(name: str) -> str:
    """A bundle name is a plain file name: letters, digits, '.', '_' and '-'."""
    if not NAME_PATTERN.match(name or "") or name in (".", ".."):
        raise BundleError(
            f"invalid bundle name {excerpt(name)}: use letters, digits, '.', '_', '-'"
        )
    return name


def bundle_dir(models_dir: str | Path, name: str) -> Path:
    """The folder of bundle ``name``, guaranteed to lie directly inside ``models_dir``."""
    root = Path(models_dir).resolve()
    path = (root / check_name(name)).resolve()
    if path.parent != root:
        raise BundleError(f"bundle {name!r} resolves outside {root}")
    return path


def current_name(models_dir: str | Path) -> str:
    """The bundle named by ``models_dir/CURRENT``."""
    path = Path(models_dir) / CURRENT
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise BundleError(f"{path}: no CURRENT file; build a bundle first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from exc
    try:
        return check_name(name)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None


def set_current(models_dir: str | Path, name: str) -> None:
    """Point CURRENT at ``name`` atomically (write a temporary file, then rename)."""
    bundle_dir(models_dir, name)
    target = Path(models_dir) / CURRENT
    temporary = Path(models_dir) / f".{CURRENT}.{uuid.uuid4().hex}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)


def list_bundles(models_dir: str | Path) -> list[str]:
    """Names of complete bundles (folders with a manifest), oldest first."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime)]


# --------------------------------------------------------------------------- writing


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BundleWriter:
    """Collects a bundle's files in a temporary folder and publishes them in one rename.

    Use as a context manager: an exception inside the block removes the temporary folder,
    so a failed export leaves nothing half-written behind.
    """

    def __init__(self, models_dir: str | Path, name: str):
        self.models_dir = Path(models_dir)
        self.name = check_name(name)
        self.final = bundle_dir(self.models_dir, name)
        if self.final.exists():
            raise BundleError(f"bundle {self.final} exists already; bundles are immutable")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.root = self.models_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        self.root.mkdir()

    def path(self, relative: str) -> Path:
        """Where to write ``relative`` inside the bundle (parents are created)."""
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self, manifest: dict, make_current: bool = True) -> Path:
        """Checksum every file, write the manifest, move into place, optionally make current."""
        files = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            relative = path.relative_to(self.root).as_posix()
            files[relative] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        manifest = {**manifest, "format_version": FORMAT_VERSION, "name": self.name, "files": files}
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.rename(self.root, self.final)
        if make_current:
            set_current(self.models_dir, self.name)
        LOG.info("bundle %s written (%d files)", self.final, len(files))
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


def write_items_table(
    path: Path,
    raw_ids: list[str],
    popularity: np.ndarray,
    *,
    titles: dict[str, str] | None = None,
    genres: dict[str, list[str]] | None = None,
    last_seen: np.ndarray | None = None,
) -> None:
    """items.parquet: one row per internal id 1..N (padding row 0 is not stored).

    ``last_seen`` (N + 1,) holds each item's latest training interaction (-1: never), which
    the CTR head's recency feature needs at serving time.
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
    pq.write_table(pa.table(columns), path)


# --------------------------------------------------------------------------- reading


def read_manifest(path: Path) -> dict:
    """The manifest of the bundle folder ``path``, with its format version checked."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{manifest_path}: missing") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{manifest_path}: not readable JSON ({exc})") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format version {version!r}, this service reads {FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("files"), dict) or not isinstance(
        manifest.get("retrievers"), dict
    ):
        raise BundleError(f"{manifest_path}: no 'files' or 'retrievers' section")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file exists inside the bundle with its recorded size and sha256."""
    for relative, expected in manifest["files"].items():
        file = (path / relative).resolve()
        if path.resolve() not in file.parents:
            raise BundleError(f"{path / MANIFEST}: file {relative!r} lies outside the bundle")
        if not file.is_file():
            raise BundleError(f"{file}: missing from bundle {path.name}")
        if file.stat().st_size != expected.get("bytes"):
            raise BundleError(
                f"{file}: size {file.stat().st_size} bytes, manifest says {expected.get('bytes')}"
            )
        if sha256_of(file) != expected.get("sha256"):
            raise BundleError(f"{file}: checksum does not match the manifest")


@dataclass
class Catalogue:
    """The items of a bundle: raw ids, popularity and optional metadata, by internal id."""

    raw_ids: np.ndarray  # (N + 1,) str, row 0 = ""
    popularity: np.ndarray  # (N + 1,) int64 training counts
    titles: list[str | None] | None = None
    genres: list[list[str]] | None = None
    lookup: dict[str, int] = field(default_factory=dict)
    last_seen: np.ndarray | None = None  # (N + 1,) int64, -1 = never

    @property
    def n_items(self) -> int:
        return len(self.raw_ids) - 1

    def internal_ids(self, raw: list[str]) -> np.ndarray:
        """Internal ids for raw ids; unknown ids map to 0 (padding)."""
        # map() over the dict's own get: faster than a generator for a request's ids.
        return np.array(list(map(self.lookup.get, raw, repeat(0, len(raw)))), dtype=np.int64)


def read_catalogue(path: Path) -> Catalogue:
    """items.parquet into a Catalogue; ids must be exactly 1..N in order."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise BundleError(f"{path}: not a readable Parquet file ({exc})") from exc
    ids = table.column("item_id").to_numpy()
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
        raise BundleError(f"{path}: item_id must run 1..N in order")
    raw = np.concatenate([[""], np.asarray(table.column("raw_id").to_pylist(), dtype=object)])
    popularity = np.concatenate([[0], table.column("popularity").to_numpy()]).astype(np.int64)
    names = table.column_names
    titles = [None, *table.column("title").to_pylist()] if "title" in names else None
    genres = [[], *table.column("genres").to_pylist()] if "genres" in names else None
    lookup = {r: i for i, r in enumerate(raw.tolist()) if i}
    last_seen = None
    if "last_seen_ts" in names:
        last_seen = np.concatenate([[-1], table.column("last_seen_ts").to_numpy()])
        last_seen = last_seen.astype(np.int64)
    return Catalogue(raw, popularity, titles, genres, lookup, last_seen)


@dataclass
class Retriever:
    """One encoder's serving parts: ONNX user encoder, item vectors, index, optional head
    (the models are None where the bundle was loaded without them)."""

    name: str
    encoder: OnnxUserEncoder | None
    index: ItemIndex | None
    max_len: int
    info: dict
    item_vectors: np.ndarray  # (N + 1, d) float32, memory-mapped
    ctr_head: CtrHead | None = None


@dataclass
class Bundle:
    name: str
    path: Path
    manifest: dict
    catalogue: Catalogue
    retrievers: dict[str, Retriever]
    item_features: ItemFeatures | None = None  # for the CTR heads

    @property
    def default_encoder(self) -> str:
        return self.manifest.get("default_encoder") or next(iter(self.retrievers))


def load_bundle(
    models_dir: str | Path,
    name: str | None = None,
    *,
    device: str = "auto",
    threads: int = 1,
    models: bool = True,
    verify: bool = True,
    index_device: str | None = None,
) -> Bundle:
    """Load (and fully verify) bundle ``name``, or the one named by CURRENT.

    ``device`` places the ONNX models (encoder, CTR head) and, unless ``index_device``
    says otherwise, the faiss index.

    ``models=False`` reads everything but the models (no onnxruntime session, no faiss
    index: a process that hands its batches to a compute process needs only the catalogue
    and the retrievers' settings); ``verify=False`` skips the checksums, for the compute
    process that loads files its parent has just verified.
    """
    name = name or current_name(models_dir)
    path = bundle_dir(models_dir, name)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle {name!r} does not exist")
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    catalogue = read_catalogue(path / ITEMS)
    item_features = (
        ItemFeatures.from_catalogue(catalogue) if catalogue.last_seen is not None else None
    )
    retrievers = {}
    for encoder, info in manifest["retrievers"].items():
        files = info["files"]
        vectors_path = path / files["item_embeddings"]
        try:
            vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise BundleError(f"{vectors_path}: not a plain .npy array ({exc})") from exc
        if vectors.dtype != np.float32 or vectors.shape[0] != catalogue.n_items + 1:
            raise BundleError(
                f"{vectors_path}: shape {vectors.shape} {vectors.dtype}, expected "
                f"({catalogue.n_items + 1}, d) float32"
            )
        head_names = info["ctr_head"]["feature_names"] if "ctr_head" in files else None
        if head_names is not None and (
            item_features is None or list(item_features.names) != list(head_names)
        ):
            raise BundleError(
                f"{path / files['ctr_head']}: trained on features {head_names}, "
                f"which {ITEMS} cannot provide"
            )
        retriever = Retriever(
            name=encoder,
            encoder=None,
            index=None,
            max_len=int(info["max_len"]),
            info=info,
            item_vectors=vectors,
        )
        if models:
            _load_models(
                retriever,
                path,
                catalogue.n_items,
                device=device,
                index_device=index_device or device,
                threads=threads,
                head_names=head_names,
            )
        retrievers[encoder] = retriever
    if not retrievers:
        raise BundleError(f"{path / MANIFEST}: no retrievers")
    LOG.info("loaded bundle %s with %s", name, ", ".join(retrievers))
    return Bundle(name, path, manifest, catalogue, retrievers, item_features)


def placement(bundle: Bundle) -> dict[str, dict]:
    """Where each retriever's stages run: the onnxruntime provider of its encoder and CTR
    head, and ``gpu`` or ``cpu`` for its faiss index (None for a stage not loaded here: no
    head, or a bundle loaded without its models)."""
    return {
        name: {
            "encoder": retriever.encoder.providers[0] if retriever.encoder else None,
            "index": ("gpu" if retriever.index.gpus else "cpu") if retriever.index else None,
            "ctr_head": retriever.ctr_head.providers[0] if retriever.ctr_head else None,
        }
        for name, retriever in bundle.retrievers.items()
    }


def warm_up(bundle: Bundle, batch: int, candidates: int) -> float:
    """Run each loaded model on the shapes serving will give it; returns the seconds taken.

    onnxruntime's CUDA provider grows its memory arena the first time a larger input
    arrives and CUDA loads kernels on their first launch, which made the first requests
    after a start many times slower than warm ones on a GPU (docs/BENCHMARKS.md). So
    every history width at batch 1, then batches of 1, 2, 4, ... up to twice ``batch`` (a
    compute process merges the batches that queued meanwhile) at the longest width, each
    searched to ``candidates`` and reranked. On a CPU this costs milliseconds.
    """
    started = time.perf_counter()
    sizes = [1 << i for i in range((2 * max(batch, 1) - 1).bit_length() + 1)]
    for retriever in bundle.retrievers.values():
        if retriever.encoder is None:
            continue
        for width in range(1, retriever.max_len + 1):
            retriever.encoder.encode(
                np.ones((1, width), np.int64), np.zeros((1, width), np.float32)
            )
        head = retriever.ctr_head
        features = 0
        if head is not None:
            features = len(head.feature_names or []) or head.n_features or 0
        depth = max(1, min(candidates, retriever.index.n_items))
        for size in sizes:
            window = np.ones((size, retriever.max_len), np.int64)
            users = retriever.encoder.encode(window, np.zeros(window.shape, np.float32))
            retriever.index.search(users, depth)
            if features:
                dim = users.shape[1]
                head.score(
                    users,
                    np.zeros((size, depth, dim), np.float32),
                    np.zeros((size, depth, features), np.float32),
                )
    return time.perf_counter() - started


def settle_heap() -> None:
    """Collect what is garbage now, then keep every object still alive (a loaded bundle's
    catalogue above all) out of the cyclic garbage collector's later passes.

    A full collection walks every tracked container, and the id dictionary of a large
    catalogue makes that take milliseconds: run by the collector at random moments under
    load, it raised the 99th percentile latency of /recommend on the perf bundle
    (docs/BENCHMARKS.md, fourth pass). Frozen objects
    are still freed by reference counting, and each call lifts the previous freeze before
    collecting, so a retired bundle held only by a reference cycle goes at the next call.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _load_models(
    retriever: Retriever,
    path: Path,
    n_items: int,
    *,
    device: str,
    index_device: str,
    threads: int,
    head_names: list[str] | None,
) -> None:
    """The retriever's faiss index, ONNX user encoder and CTR head, each refused by name."""
    files = retriever.info["files"]
    spec = IndexSpec(**retriever.info["index"]["spec"])
    try:
        index = ItemIndex.load(path / files["index"], retriever.item_vectors, spec, index_device)
    except RuntimeError as exc:
        raise BundleError(f"{path / files['index']}: unreadable faiss index ({exc})") from exc
    if index.index.ntotal != n_items:
        raise BundleError(
            f"{path / files['index']}: holds {index.index.ntotal} items, catalogue has {n_items}"
        )
    try:
        retriever.encoder = OnnxUserEncoder(path / files["user_encoder"], device, threads)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise BundleError(f"{path / files['user_encoder']}: cannot be loaded ({exc})") from exc
    if head_names is not None:
        head_path = path / files["ctr_head"]
        try:
            retriever.ctr_head = CtrHead(head_path, device, threads, feature_names=head_names)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise BundleError(f"{head_path}: cannot be loaded ({exc})") from exc
    retriever.index = index
