"""Versioned model bundles: written by the export job, loaded by the service.

Layout of ``models/<name>/`` (see docs/ARCHITECTURE.md)::

    manifest.json                       format version, provenance, metrics, sha256 of every file
    items.parquet                       item_id, raw_id, popularity, title, genres
                                        (service/catalogue.py)
    retrievers/<encoder>/user_encoder.onnx
    retrievers/<encoder>/item_embeddings.npy   float32 (N + 1, d), row = internal id
    retrievers/<encoder>/items.faiss
    retrievers/<encoder>/ctr_head.onnx         optional
    retrievers/<encoder>/metadata_encoder.onnx item metadata -> item vector (cold start)
    item_metadata_vocabulary.json              what the metadata encoders read, when present

``models/CURRENT`` names the active bundle. A bundle is written under a temporary name and
renamed into place when complete; CURRENT is replaced atomically. Loading verifies the
format version and every checksum, and refuses a mismatch with a message naming the file.
Every file a bundle uses (each path the manifest names, and items.parquet) must lie inside
its folder once resolved (no absolute paths, no ``..`` or symbolic link leading out) and be
listed with its checksum in the manifest's ``files``. The parts must fit together: the
encoder's output width, the index's dimension and size and the head's inputs are checked
against the item vectors and the catalogue at load (``_load_models``), and
``service.pipeline.warm_up`` then runs the serving kernel itself before a bundle serves.
No pickle is ever loaded (``allow_pickle=False``), and bundle names are plain names
resolved inside the models directory, so CURRENT cannot point elsewhere.

Whether a retriever's CTR head reranks a request that does not say is the bundle's to
decide: the export's gate (``training.rerank_gate``) records it in ``ctr_head.gate``, read
by :func:`rerank_policy` into ``Retriever.rerank_default`` and ``rerank_reason``; a head
without a gate (an older bundle) reranks by default, as it always did.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from service.catalogue import Catalogue, read_catalogue
from service.encoder import OnnxUserEncoder
from service.errors import BundleError, excerpt
from service.features import ItemFeatures
from service.item_metadata import ItemMetadataEncoder, MetadataVocabulary
from service.ranking import CtrHead
from service.retrieval import IndexSpec, ItemIndex, augmented_dim

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
ITEMS = "items.parquet"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Why a retriever reranks by default or not where its manifest entry has no gate to say.
NO_HEAD_REASON = "no CTR head: candidates are served in retrieval order"
UNGATED_REASON = (
    "the bundle was exported before the rerank gate: its CTR head reranks by default, "
    "as such bundles always have"
)


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
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: not a JSON object")
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


def inside_bundle(root: Path, relative: object, where: str) -> Path:
    """The resolved path of ``relative`` (named at ``where`` in the manifest) inside the
    bundle folder ``root``: a relative path that stays inside the folder once every
    ``..`` and symbolic link is resolved. BundleError naming it otherwise."""
    root = root.resolve()
    manifest_path = root / MANIFEST
    if not isinstance(relative, str) or not relative.strip():
        raise BundleError(f"{manifest_path}: {where} is {relative!r}, not a file path")
    if PurePosixPath(relative).is_absolute():
        raise BundleError(
            f"{manifest_path}: {where} names {relative!r}, an absolute path that lies outside "
            "the bundle (files are named relative to the bundle folder)"
        )
    try:
        file = (root / relative).resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise BundleError(f"{manifest_path}: {where} names {relative!r}: {exc}") from exc
    if root not in file.parents:
        raise BundleError(
            f"{manifest_path}: {where} names {relative!r}, which lies outside the bundle "
            f"(it resolves to {file})"
        )
    return file


def bundle_file(root: Path, manifest: dict, relative: object, where: str) -> Path:
    """The resolved path of a file the bundle uses, named at ``where`` in the manifest: it
    must lie inside the bundle (:func:`inside_bundle`), be listed with its checksum in the
    manifest's ``files`` (so :func:`verify_files` has checked it), and exist."""
    file = inside_bundle(root, relative, where)
    shown = root.resolve() / relative
    entry = manifest["files"].get(relative)
    if not isinstance(entry, dict) or not entry.get("sha256"):
        raise BundleError(
            f"{shown}: named by {where} but not listed with a checksum in the manifest's "
            "files, so it cannot be verified"
        )
    if not file.is_file():
        raise BundleError(f"{shown}: missing from bundle {root.name}")
    return file


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file exists inside the bundle with its recorded size and sha256."""
    for relative, expected in manifest["files"].items():
        file = inside_bundle(path, relative, f"files[{relative!r}]")
        if not isinstance(expected, dict):
            raise BundleError(f"{path / MANIFEST}: files[{relative!r}] has no size and sha256")
        if not file.is_file():
            raise BundleError(f"{file}: missing from bundle {path.name}")
        if file.stat().st_size != expected.get("bytes"):
            raise BundleError(
                f"{file}: size {file.stat().st_size} bytes, manifest says {expected.get('bytes')}"
            )
        if sha256_of(file) != expected.get("sha256"):
            raise BundleError(f"{file}: checksum does not match the manifest")


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
    # Its files (user_encoder, item_embeddings, index, ctr_head, metadata_encoder,
    # metadata_vocabulary), resolved inside the bundle.
    paths: dict[str, Path] = field(default_factory=dict)
    # Embeds items it never saw from their metadata (None: the bundle has none, or the
    # models were not loaded); its vocabulary is read whenever the bundle has one.
    metadata_encoder: ItemMetadataEncoder | None = None
    metadata_vocabulary: MetadataVocabulary | None = None
    # Whether a request that does not say ``rerank`` is reranked by the CTR head, and why
    # (:func:`rerank_policy`: the export's gate, read from the manifest).
    rerank_default: bool = False
    rerank_reason: str = NO_HEAD_REASON


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


@dataclass
class RetrieverEntry:
    """A retriever's manifest entry, checked: its files, sequence length, index spec, the
    CTR head's feature names (None: no head) and its metadata encoder's vocabulary (None:
    no metadata encoder)."""

    paths: dict[str, Path]
    max_len: int
    spec: IndexSpec
    head_names: list[str] | None
    vocabulary: MetadataVocabulary | None = None
    rerank_default: bool = False
    rerank_reason: str = ""


REQUIRED_FILES = ("user_encoder", "item_embeddings", "index")


def check_retriever_entry(root: Path, manifest: dict, encoder: str) -> RetrieverEntry:
    """The manifest entry of retriever ``encoder``, refused (naming the manifest and the
    field) where a part is missing or malformed, and every file it names confined and
    checksummed (:func:`bundle_file`)."""
    manifest_path = root / MANIFEST
    where = f"retrievers.{encoder}"
    info = manifest["retrievers"][encoder]
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
        raise BundleError(f"{manifest_path}: {where} has no 'files' section")
    files = info["files"]
    for key in REQUIRED_FILES:
        if key not in files:
            raise BundleError(f"{manifest_path}: {where}.files has no {key!r}")
    # Every path the entry names, used or not, is held to the same rules.
    paths = {
        key: bundle_file(root, manifest, relative, f"{where}.files.{key}")
        for key, relative in files.items()
    }
    max_len = info.get("max_len")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise BundleError(f"{manifest_path}: {where}.max_len is {max_len!r}, not a positive int")
    spec = (info.get("index") or {}).get("spec") if isinstance(info.get("index"), dict) else None
    if not isinstance(spec, dict):
        raise BundleError(f"{manifest_path}: {where}.index.spec is missing")
    try:
        index_spec = IndexSpec(**spec)
    except TypeError as exc:
        raise BundleError(f"{manifest_path}: {where}.index.spec: {exc}") from exc
    head = optional_part(root, manifest, encoder, "ctr_head", {"file": "ctr_head"})
    head_names = None
    if head is not None:
        head_names = head.get("feature_names")
        if not isinstance(head_names, list) or not all(isinstance(n, str) for n in head_names):
            raise BundleError(f"{manifest_path}: {where}.ctr_head.feature_names is not a list")
    metadata = optional_part(
        root,
        manifest,
        encoder,
        "metadata_encoder",
        {"file": "metadata_encoder", "vocabulary": "metadata_vocabulary"},
    )
    vocabulary = None
    if metadata is not None:
        if "metadata_vocabulary" not in files:
            raise BundleError(f"{manifest_path}: {where}.files has no 'metadata_vocabulary'")
        vocabulary = read_vocabulary(paths["metadata_vocabulary"])
    rerank_default, rerank_reason = rerank_policy(info, f"{manifest_path}: {where}")
    return RetrieverEntry(
        paths, max_len, index_spec, head_names, vocabulary, rerank_default, rerank_reason
    )


def rerank_policy(info: dict, where: str) -> tuple[bool, str]:
    """Whether retriever entry ``info`` (named ``where`` in errors) reranks a request that
    does not say ``rerank``, and why.

    No head: never. A head with a ``gate`` (written by ``training.rerank_gate`` at export):
    what the gate recorded, ``rerank_by_default`` and its ``reason``. A head without one
    (a bundle exported before the gate existed): on, as such bundles have always served.
    A gate that is not an object with a boolean ``rerank_by_default`` and a string
    ``reason`` is refused with a BundleError naming the field.
    """
    head = info.get("ctr_head")
    if head is None:
        return False, NO_HEAD_REASON
    if not isinstance(head, dict):
        raise BundleError(f"{where}.ctr_head is not an object")
    gate = head.get("gate")
    if gate is None:
        return True, UNGATED_REASON
    if not isinstance(gate, dict):
        raise BundleError(f"{where}.ctr_head.gate is not an object")
    default, reason = gate.get("rerank_by_default"), gate.get("reason")
    if not isinstance(default, bool):
        raise BundleError(f"{where}.ctr_head.gate.rerank_by_default is {default!r}, not a bool")
    if not isinstance(reason, str):
        raise BundleError(f"{where}.ctr_head.gate.reason is {reason!r}, not a string")
    return default, reason


def optional_part(
    root: Path, manifest: dict, encoder: str, part: str, named: dict[str, str]
) -> dict | None:
    """Retriever ``encoder``'s manifest entry of an optional ``part`` (``ctr_head``,
    ``metadata_encoder``), present exactly when ``files`` lists the part's file. Each of
    its fields in ``named`` (field -> key in ``files``) that it has must name the file
    ``files`` names under that key."""
    manifest_path = root / MANIFEST
    where = f"retrievers.{encoder}"
    info = manifest["retrievers"][encoder]
    files, entry = info["files"], info.get(part)
    if (part in files) != (entry is not None):
        raise BundleError(
            f"{manifest_path}: {where} has a {part} "
            + (f"file but no {part} entry" if part in files else "entry but no file")
        )
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise BundleError(f"{manifest_path}: {where}.{part} is not an object")
    for field_name, key in named.items():
        if field_name not in entry:
            continue
        given = bundle_file(root, manifest, entry[field_name], f"{where}.{part}.{field_name}")
        listed = files.get(key)
        if listed is None or given != inside_bundle(root, listed, f"{where}.files.{key}"):
            raise BundleError(
                f"{manifest_path}: {where}.{part}.{field_name} names {entry[field_name]!r}, "
                f"but {where}.files.{key} names {listed!r}"
            )
    return entry


def read_vocabulary(path: Path) -> MetadataVocabulary:
    """The metadata encoders' vocabulary; BundleError naming the file when unreadable."""
    try:
        return MetadataVocabulary.read(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path}: not a metadata vocabulary ({exc})") from exc


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

    Every file the bundle uses must lie inside its folder and be listed with a checksum
    in the manifest; the parts must fit together (docs/RELIABILITY.md, "Checked at
    load"): what can be checked without the models always is (the id map, the vectors'
    shape against the catalogue and the manifest, the head's features against the
    catalogue), and with the models each one is run once on the others' shapes (the
    encoder's output width against the vectors, the index's dimension and size, the
    head's inputs). A part that does not fit is refused with a message naming its file.

    ``models=False`` reads everything but the models (no onnxruntime session, no faiss
    index: a process that hands its batches to a compute process needs only the catalogue
    and the retrievers' settings, and the compute process checks the models);
    ``verify=False`` skips the checksums (not the other checks), for the compute process
    that loads files its parent has just verified.
    """
    name = name or current_name(models_dir)
    path = bundle_dir(models_dir, name)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle {name!r} does not exist")
    manifest = read_manifest(path)
    if not manifest["retrievers"]:
        raise BundleError(f"{path / MANIFEST}: no retrievers")
    items_path = bundle_file(path, manifest, ITEMS, "the items table")
    entries = {
        encoder: check_retriever_entry(path, manifest, encoder)
        for encoder in manifest["retrievers"]
    }
    if verify:
        verify_files(path, manifest)
    catalogue = read_catalogue(items_path)
    try:
        item_features = (
            ItemFeatures.from_catalogue(catalogue) if catalogue.last_seen is not None else None
        )
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{items_path}: item features cannot be built ({exc})") from exc
    retrievers = {}
    for encoder, entry in entries.items():
        info = manifest["retrievers"][encoder]
        vectors = read_item_vectors(entry.paths["item_embeddings"], catalogue.n_items, info)
        head_names = entry.head_names
        if head_names is not None and (
            item_features is None or list(item_features.names) != list(head_names)
        ):
            raise BundleError(
                f"{entry.paths['ctr_head']}: trained on features {head_names}, "
                f"which {ITEMS} cannot provide"
            )
        retriever = Retriever(
            name=encoder,
            encoder=None,
            index=None,
            max_len=entry.max_len,
            info=info,
            item_vectors=vectors,
            paths=entry.paths,
            metadata_vocabulary=entry.vocabulary,
            rerank_default=entry.rerank_default,
            rerank_reason=entry.rerank_reason,
        )
        if models:
            _load_models(
                retriever,
                entry.spec,
                catalogue.n_items,
                device=device,
                index_device=index_device or device,
                threads=threads,
                head_names=head_names,
            )
        retrievers[encoder] = retriever
    LOG.info("loaded bundle %s with %s", name, ", ".join(retrievers))
    return Bundle(name, path, manifest, catalogue, retrievers, item_features)


def read_item_vectors(path: Path, n_items: int, info: dict) -> np.ndarray:
    """A retriever's item vectors, memory-mapped: float32 (N + 1, d), d as the manifest
    says where it says."""
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(f"{path}: not a plain .npy array ({exc})") from exc
    if (
        vectors.dtype != np.float32
        or vectors.ndim != 2
        or vectors.shape[0] != n_items + 1
        or vectors.shape[1] < 1
    ):
        raise BundleError(
            f"{path}: shape {vectors.shape} {vectors.dtype}, expected ({n_items + 1}, d) float32"
            f" ({ITEMS} has {n_items} items, plus the padding row)"
        )
    dim = info.get("dim")
    if dim is not None and dim != vectors.shape[1]:
        raise BundleError(
            f"{path}: vectors of width {vectors.shape[1]}, the manifest says dim {dim!r}"
        )
    return vectors


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
    spec: IndexSpec,
    n_items: int,
    *,
    device: str,
    index_device: str,
    threads: int,
    head_names: list[str] | None,
) -> None:
    """The retriever's ONNX user encoder, faiss index and CTR head, each loaded and run
    once on the shapes the others give it; a part that cannot be loaded or does not fit
    is refused by name."""
    paths = retriever.paths
    vectors_path = paths["item_embeddings"]
    dim = int(retriever.item_vectors.shape[1])

    encoder_path = paths["user_encoder"]
    try:
        encoder = OnnxUserEncoder(encoder_path, device, threads)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise BundleError(f"{encoder_path}: cannot be loaded ({exc})") from exc
    try:  # one history of one event: milliseconds, and the width is the one served
        users = encoder.encode(np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32))
    except Exception as exc:
        raise BundleError(f"{encoder_path}: fails on a one-event history ({exc})") from exc
    users = np.asarray(users)
    if users.shape != (1, dim):
        raise BundleError(
            f"{encoder_path}: outputs user embeddings of shape {users.shape[1:]} for one "
            f"history, but {vectors_path} holds item vectors of width {dim}"
        )

    index_path = paths["index"]
    try:
        index = ItemIndex.load(index_path, retriever.item_vectors, spec, index_device)
    except (RuntimeError, TypeError, ValueError) as exc:  # faiss, or a spec it cannot take
        raise BundleError(f"{index_path}: unreadable faiss index ({exc})") from exc
    expected = augmented_dim(dim) if spec.mips_to_l2 else dim
    if int(index.index.d) != expected:
        space = " (the MIPS->L2 augmented space of its spec)" if spec.mips_to_l2 else ""
        raise BundleError(
            f"{index_path}: indexes vectors of dimension {index.index.d}, but {vectors_path} "
            f"has width {dim}, which needs an index of dimension {expected}{space}"
        )
    if index.index.ntotal != n_items:
        raise BundleError(
            f"{index_path}: holds {index.index.ntotal} items, catalogue has {n_items}"
        )
    if not spec.mips_to_l2 and not index.gpus and index_metric(index) != "inner_product":
        raise BundleError(
            f"{index_path}: a {index_metric(index)} index, but its spec scores by inner "
            "product (mips_to_l2 is false)"
        )

    head = None
    if head_names is not None:
        head_path = paths["ctr_head"]
        try:
            head = CtrHead(head_path, device, threads, feature_names=head_names)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise BundleError(f"{head_path}: cannot be loaded ({exc})") from exc
        check_head_fits(head, head_path, vectors_path, dim, len(head_names))
    retriever.encoder, retriever.index, retriever.ctr_head = encoder, index, head
    if retriever.metadata_vocabulary is not None:
        retriever.metadata_encoder = load_metadata_encoder(
            retriever, device=device, threads=threads
        )


def index_metric(index: ItemIndex) -> str:
    """``inner_product`` or ``l2`` (or the metric's number): how the faiss index scores."""
    import faiss

    metric = int(_base_faiss_index(index.index).metric_type)
    return {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}.get(
        metric, f"metric {metric}"
    )


def _base_faiss_index(index):
    import faiss

    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def check_head_fits(head: CtrHead, head_path: Path, vectors_path: Path, dim: int, features: int):
    """The head takes user and candidate embeddings of the vectors' width and ``features``
    features, and gives one logit per candidate: its declared input widths where they are
    fixed, then one run on a single candidate (milliseconds)."""
    declared = {i.name: i.shape for i in head.session.get_inputs()}
    for name, width in (
        ("user_embedding", dim),
        ("candidate_embeddings", dim),
        ("candidate_features", features),
    ):
        last = declared[name][-1] if declared[name] else None
        if isinstance(last, int) and last != width:
            given = (
                f"ctr_head.feature_names has {width} features"
                if name == "candidate_features"
                else f"{vectors_path} has width {width}"
            )
            raise BundleError(f"{head_path}: its input {name} takes {last} values, but {given}")
    try:
        logits = head.score(
            np.zeros((1, dim), np.float32),
            np.zeros((1, 1, dim), np.float32),
            np.zeros((1, 1, features), np.float32),
        )
    except Exception as exc:
        raise BundleError(
            f"{head_path}: fails on user and candidate embeddings of width {dim} "
            f"({vectors_path}) and {features} features ({exc})"
        ) from exc
    if np.asarray(logits).shape != (1, 1):
        raise BundleError(
            f"{head_path}: gives logits of shape {np.asarray(logits).shape} for one "
            "candidate, expected (1, 1)"
        )


def load_metadata_encoder(
    retriever: Retriever, *, device: str, threads: int
) -> ItemMetadataEncoder:
    """The retriever's metadata encoder, run once on every token of its vocabulary (the
    graph must take each id) and checked to give vectors of the item vectors' width."""
    path = retriever.paths["metadata_encoder"]
    vocabulary = retriever.metadata_vocabulary
    try:
        encoder = ItemMetadataEncoder(path, vocabulary, device, threads)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise BundleError(f"{path}: cannot be loaded ({exc})") from exc
    every_token = np.arange(vocabulary.size, dtype=np.int64)[None, :]
    try:  # one item of every token: microseconds, and an id the graph lacks fails here
        vectors = np.asarray(encoder.run(every_token, np.ones(every_token.shape, np.float32)))
    except Exception as exc:
        raise BundleError(
            f"{path}: fails on the {vocabulary.size} token ids of "
            f"{retriever.paths['metadata_vocabulary'].name} ({exc})"
        ) from exc
    dim = int(retriever.item_vectors.shape[1])
    if vectors.shape != (1, dim):
        raise BundleError(
            f"{path}: gives item vectors of shape {vectors.shape[1:]}, but "
            f"{retriever.paths['item_embeddings']} holds vectors of width {dim}"
        )
    return encoder
