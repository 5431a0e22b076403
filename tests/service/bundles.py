"""Bundles whose parts do not fit together, each with checksums that match: copies of a
test bundle with one part replaced by one of another shape, the manifest rewritten so that
only the load-time checks of the parts can refuse them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from service.bundle import MANIFEST, set_current, sha256_of

WIDER = 4  # the replaced part's extra width


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def write_manifest(bundle: Path, manifest: dict, checksums: bool = True) -> None:
    """Write ``manifest``, its checksums first brought in line with the files as they are."""
    if checksums:
        for relative, entry in manifest["files"].items():
            file = bundle / relative
            if file.is_file():
                entry.update(sha256=sha256_of(file), bytes=file.stat().st_size)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))


def vectors_of_another_width(bundle: Path, keep_manifest_dim: bool = False) -> str:
    """The item vectors replaced by ones WIDER wider than the encoder's output; the
    manifest's ``dim`` says the new width unless ``keep_manifest_dim``. The file a
    refusal must name."""
    manifest = manifest_of(bundle)
    encoder, entry = next(iter(manifest["retrievers"].items()))
    relative = entry["files"]["item_embeddings"]
    old = np.load(bundle / relative)
    wider = np.random.default_rng(0).standard_normal((old.shape[0], old.shape[1] + WIDER))
    np.save(bundle / relative, wider.astype(np.float32), allow_pickle=False)
    if not keep_manifest_dim:
        entry["dim"] = old.shape[1] + WIDER
    write_manifest(bundle, manifest)
    return Path(relative).name


def index_of_another_dimension(bundle: Path, augmented_spec: bool = False) -> str:
    """The faiss index replaced by an exact one over vectors WIDER wider than the item
    vectors (or, with ``augmented_spec``, the spec switched to the MIPS->L2 space while the
    index stays plain); the file a refusal must name."""
    import faiss

    manifest = manifest_of(bundle)
    entry = next(iter(manifest["retrievers"].values()))
    relative = entry["files"]["index"]
    vectors = np.load(bundle / entry["files"]["item_embeddings"])
    if augmented_spec:
        entry["index"]["spec"].update(mips_to_l2=True, max_norm=2.0)
    else:
        index = faiss.IndexFlatIP(vectors.shape[1] + WIDER)
        rows = np.random.default_rng(0).standard_normal((len(vectors) - 1, index.d))
        index.add(rows.astype(np.float32))
        faiss.write_index(index, str(bundle / relative))
    write_manifest(bundle, manifest)
    return Path(relative).name


def head_graph(dim: int, features: int, declared: bool) -> bytes:
    """A CTR head graph for embeddings of width ``dim``: with ``declared`` its inputs say
    the width; otherwise they leave it open and only running it finds the mismatch."""
    from onnx import TensorProto, helper, numpy_helper

    width = dim if declared else "dim"
    inputs = [
        helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, ["b", width]),
        helper.make_tensor_value_info("candidate_embeddings", TensorProto.FLOAT, ["b", "c", width]),
        helper.make_tensor_value_info(
            "candidate_features", TensorProto.FLOAT, ["b", "c", features]
        ),
    ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "c"])
    weights = numpy_helper.from_array(np.ones((dim, 1), np.float32), "weights")
    last = numpy_helper.from_array(np.array([-1], np.int64), "last")
    nodes = [
        helper.make_node("MatMul", ["user_embedding", "weights"], ["user_score"]),  # (b, 1)
        helper.make_node("MatMul", ["candidate_embeddings", "weights"], ["item_score"]),
        helper.make_node("Squeeze", ["item_score", "last"], ["item_scores"]),  # (b, c)
        helper.make_node("ReduceSum", ["candidate_features", "last"], ["feature_sum"], keepdims=0),
        helper.make_node("Add", ["item_scores", "feature_sum"], ["partial"]),
        helper.make_node("Add", ["partial", "user_score"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "head", inputs, [output], initializer=[weights, last])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def head_of_another_width(bundle: Path, declared: bool = True) -> str:
    """The CTR head replaced by one that takes embeddings WIDER wider than the item
    vectors (its feature count right); the file a refusal must name."""
    manifest = manifest_of(bundle)
    entry = next(e for e in manifest["retrievers"].values() if "ctr_head" in e["files"])
    relative = entry["files"]["ctr_head"]
    dim = np.load(bundle / entry["files"]["item_embeddings"], mmap_mode="r").shape[1]
    features = len(entry["ctr_head"]["feature_names"])
    (bundle / relative).write_bytes(head_graph(dim + WIDER, features, declared))
    write_manifest(bundle, manifest)
    return Path(relative).name


MISMATCHES = {
    "vectors": vectors_of_another_width,
    "index": index_of_another_dimension,
    "head": head_of_another_width,
}


def publish_mismatch(models_dir: Path, source: Path, kind: str, name: str) -> str:
    """Copy bundle folder ``source`` into ``models_dir`` as ``name``, give it the mismatch
    ``kind`` (MISMATCHES), make it CURRENT; the file a refusal must name."""
    shutil.copytree(source, models_dir / name)
    named = MISMATCHES[kind](models_dir / name)
    set_current(models_dir, name)
    return named
