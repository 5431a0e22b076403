import json
import re
import shutil

import numpy as np
import pytest

from service.bundle import (
    CURRENT,
    BundleWriter,
    bundle_dir,
    current_name,
    list_bundles,
    load_bundle,
    placement,
    set_current,
)
from service.errors import BundleError
from tests.service.bundles import (
    head_of_another_width,
    index_of_another_dimension,
    vectors_of_another_width,
    write_manifest,
)


@pytest.fixture
def models_copy(exported_bundle, tmp_path):
    """A private copy of the exported models dir that a test may damage."""
    models_dir, _ = exported_bundle
    copy = tmp_path / "models"
    shutil.copytree(models_dir, copy)
    return copy, copy / "tiny"


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_a_changed_byte_is_refused_naming_the_file(models_copy):
    models_dir, path = models_copy
    target = path / "retrievers/sasrec/item_embeddings.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"item_embeddings\.npy: checksum"):
        load_bundle(models_dir, device="cpu")


def test_a_missing_file_is_refused_naming_it(models_copy):
    models_dir, path = models_copy
    (path / "retrievers/sasrec/user_encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"user_encoder\.onnx: missing"):
        load_bundle(models_dir, device="cpu")


def test_a_truncated_index_is_refused_naming_it(models_copy):
    models_dir, path = models_copy
    index = path / "retrievers/sasrec/items.faiss"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"items\.faiss: size"):
        load_bundle(models_dir, device="cpu")


def test_a_truncated_index_with_a_forged_manifest_is_still_refused(models_copy):
    # Someone "fixes" the checksums: the index itself must still fail to load.
    from service.bundle import sha256_of

    models_dir, path = models_copy
    index = path / "retrievers/sasrec/items.faiss"
    index.write_bytes(index.read_bytes()[:100])
    manifest = _manifest(path)
    entry = manifest["files"]["retrievers/sasrec/items.faiss"]
    entry.update(sha256=sha256_of(index), bytes=index.stat().st_size)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"items\.faiss: unreadable"):
        load_bundle(models_dir, device="cpu")


def test_another_format_version_is_refused(models_copy):
    models_dir, path = models_copy
    manifest = _manifest(path)
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: format version 99"):
        load_bundle(models_dir, device="cpu")


def test_a_pickled_npy_is_never_loaded(models_copy):
    from service.bundle import sha256_of

    models_dir, path = models_copy
    target = path / "retrievers/sasrec/item_embeddings.npy"
    np.save(target, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    manifest = _manifest(path)
    manifest["files"]["retrievers/sasrec/item_embeddings.npy"].update(
        sha256=sha256_of(target), bytes=target.stat().st_size
    )
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="item_embeddings.npy"):
        load_bundle(models_dir, device="cpu")


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/b", "..", ".hidden", ""])
def test_current_cannot_point_outside_the_models_dir(models_copy, name):
    models_dir, _ = models_copy
    (models_dir / CURRENT).write_text(name + "\n")
    with pytest.raises(BundleError, match="CURRENT"):
        load_bundle(models_dir, device="cpu")


def test_manifest_cannot_list_files_outside_the_bundle(models_copy):
    models_dir, path = models_copy
    manifest = _manifest(path)
    manifest["files"]["../CURRENT"] = {"sha256": "0", "bytes": 1}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(models_dir, device="cpu")


def test_writer_publishes_atomically_and_refuses_to_overwrite(tmp_path):
    with BundleWriter(tmp_path, "b1") as writer:
        writer.path("retrievers/x/a.txt").write_text("a")
        assert not (tmp_path / "b1").exists()  # still under its temporary name
        writer.commit({"retrievers": {}})
    assert current_name(tmp_path) == "b1"
    assert _manifest(tmp_path / "b1")["files"]["retrievers/x/a.txt"]["bytes"] == 1
    with pytest.raises(BundleError, match="exists already"):
        BundleWriter(tmp_path, "b1")
    assert list_bundles(tmp_path) == ["b1"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_set_current_requires_a_plain_name(tmp_path):
    with pytest.raises(BundleError):
        set_current(tmp_path, "../x")
    assert bundle_dir(tmp_path, "ok-1.2_3") == (tmp_path / "ok-1.2_3").resolve()


def test_missing_current_says_to_build_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="build a bundle"):
        load_bundle(tmp_path, device="cpu")


def test_warm_up_runs_the_serving_kernel_on_the_shapes_serving_gives_it(head_models, monkeypatch):
    import service.pipeline as pipeline

    warm_up = pipeline.warm_up
    bundle = load_bundle(head_models, device="cpu")
    retriever = bundle.retrievers[bundle.default_encoder]
    batches, searches, scores = [], [], []
    kernel = pipeline.compute_batch

    def compute_batch(searched, served, queries):
        assert searched is retriever and served.item_features is bundle.item_features
        assert served.catalogue is bundle.catalogue
        batches.append([(q.window.shape, q.depth, q.keep, q.rerank, len(q.seen)) for q in queries])
        return kernel(searched, served, queries)

    monkeypatch.setattr(pipeline, "compute_batch", compute_batch)
    index, head = retriever.index, retriever.ctr_head
    search = index.search
    index.search = lambda users, depth: (
        searches.append((users.shape, depth)) or search(users, depth)
    )
    score = head.score
    head.score = lambda *arrays: scores.append(arrays[2].shape) or score(*arrays)
    assert warm_up(bundle, batch=3, candidates=30) >= 0

    width = retriever.max_len
    # Through the kernel serving runs: every history width alone, then batches up to twice
    # the batch at the longest width, each history's own items excluded and reranked ...
    histories, similar = batches[:-1], batches[-1]
    assert [b[0][0] for b in histories[:width]] == [(1, w) for w in range(1, width + 1)]
    assert [len(b) for b in histories[width:]] == [1, 2, 4, 8]
    assert all(q == ((1, width), 30 + width, 30, True, width) for b in histories[width:] for q in b)
    assert len(scores) == len(histories)
    features = len(bundle.item_features.names)
    assert scores[-1] == (8, 30, features)
    # ... and the query of /items/{id}/similar, through the same kernel: an item's own
    # vector searched one deeper than asked (the item itself comes back), never reranked.
    assert len(similar) == 1 and similar[0][3] is False
    assert searches[-1] == ((1, retriever.item_vectors.shape[1]), 11)


# --------------------------------------------------------------------------- parts that fit


def test_vectors_of_another_width_than_the_encoder_are_refused_naming_them(models_copy):
    models_dir, path = models_copy
    vectors_of_another_width(path)
    with pytest.raises(BundleError, match=r"user_encoder\.onnx: outputs .*item_embeddings\.npy"):
        load_bundle(models_dir, device="cpu")


def test_vectors_of_another_width_than_the_manifest_says_are_refused_without_models(
    models_copy,
):
    # A worker whose models run in a compute process loads no model, and still refuses.
    models_dir, path = models_copy
    vectors_of_another_width(path, keep_manifest_dim=True)
    with pytest.raises(BundleError, match=r"item_embeddings\.npy: vectors of width 20, .* dim 16"):
        load_bundle(models_dir, device="cpu", models=False)


@pytest.mark.parametrize("augmented_spec", [False, True], ids=["plain", "mips-to-l2"])
def test_an_index_of_another_dimension_is_refused_naming_it(models_copy, augmented_spec):
    models_dir, path = models_copy
    index_of_another_dimension(path, augmented_spec=augmented_spec)
    expected = "20" if augmented_spec else "16"  # augmented_dim(16) = 20
    with pytest.raises(
        BundleError, match=rf"items\.faiss: indexes vectors of dimension \d+, .*{expected}"
    ):
        load_bundle(models_dir, device="cpu")


def test_an_index_of_another_size_is_refused_naming_it(models_copy):
    import faiss

    models_dir, path = models_copy
    index = faiss.IndexFlatIP(16)
    index.add(np.zeros((5, 16), np.float32))
    faiss.write_index(index, str(path / "retrievers/sasrec/items.faiss"))
    write_manifest(path, _manifest(path))
    with pytest.raises(BundleError, match=r"items\.faiss: holds 5 items, catalogue has 120"):
        load_bundle(models_dir, device="cpu")


def test_an_l2_index_under_an_inner_product_spec_is_refused(models_copy):
    import faiss

    models_dir, path = models_copy
    index = faiss.IndexFlatL2(16)
    index.add(np.load(path / "retrievers/sasrec/item_embeddings.npy")[1:])
    faiss.write_index(index, str(path / "retrievers/sasrec/items.faiss"))
    write_manifest(path, _manifest(path))
    with pytest.raises(BundleError, match=r"items\.faiss: a l2 index"):
        load_bundle(models_dir, device="cpu")


@pytest.mark.parametrize("declared", [True, False], ids=["declared-width", "open-width"])
def test_a_head_of_another_width_is_refused_naming_it(head_models, tmp_path, declared):
    models_dir = tmp_path / "models"
    shutil.copytree(head_models, models_dir)
    head_of_another_width(models_dir / "with-head", declared=declared)
    with pytest.raises(BundleError, match=r"ctr_head\.onnx: .*(takes 20 values|fails on)"):
        load_bundle(models_dir, device="cpu")
    # Without its models the worker cannot see it; its compute process refuses it.
    assert load_bundle(models_dir, device="cpu", models=False).name == "with-head"


def test_a_head_without_a_manifest_entry_is_refused(head_models, tmp_path):
    models_dir = tmp_path / "models"
    shutil.copytree(head_models, models_dir)
    manifest = _manifest(models_dir / "with-head")
    del manifest["retrievers"]["sasrec"]["ctr_head"]
    write_manifest(models_dir / "with-head", manifest)
    with pytest.raises(BundleError, match=r"retrievers\.sasrec has a ctr_head file but no"):
        load_bundle(models_dir, device="cpu", models=False)


@pytest.mark.parametrize("max_len", [0, -3, "16", 2.5, None])
def test_a_max_len_that_is_not_a_positive_int_is_refused(models_copy, max_len):
    models_dir, path = models_copy
    manifest = _manifest(path)
    manifest["retrievers"]["sasrec"]["max_len"] = max_len
    write_manifest(path, manifest)
    with pytest.raises(BundleError, match=r"manifest\.json: retrievers\.sasrec\.max_len"):
        load_bundle(models_dir, device="cpu", models=False)


@pytest.mark.parametrize("damage", ["duplicate raw id", "null raw id", "no popularity", "gap"])
def test_an_inconsistent_id_map_is_refused_naming_items_parquet(models_copy, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    models_dir, path = models_copy
    table = pq.read_table(path / "items.parquet")
    raw = table.column("raw_id").to_pylist()
    if damage == "duplicate raw id":
        table = table.set_column(1, "raw_id", pa.array([raw[0], raw[0], *raw[2:]], pa.string()))
    elif damage == "null raw id":
        table = table.set_column(1, "raw_id", pa.array([None, *raw[1:]], pa.string()))
    elif damage == "no popularity":
        table = table.drop_columns(["popularity"])
    else:
        ids = table.column("item_id").to_numpy().copy()
        ids[-1] += 1
        table = table.set_column(0, "item_id", pa.array(ids))
    pq.write_table(table, path / "items.parquet")
    write_manifest(path, _manifest(path))
    with pytest.raises(BundleError, match=r"items\.parquet: "):
        load_bundle(models_dir, device="cpu", models=False)


# --------------------------------------------------------------------------- confined files


def _point(path, key, relative):
    """Make the sasrec retriever's ``files.key`` name ``relative``."""
    manifest = _manifest(path)
    manifest["retrievers"]["sasrec"]["files"][key] = relative
    write_manifest(path, manifest, checksums=False)


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "compute-process"])
def test_a_manifest_path_leading_out_of_the_bundle_is_refused(models_copy, verify):
    # A valid encoder beside the bundle, named by a path that climbs out of it.
    models_dir, path = models_copy
    shutil.copy(path / "retrievers/sasrec/user_encoder.onnx", models_dir / "evil.onnx")
    _point(path, "user_encoder", "../evil.onnx")
    with pytest.raises(BundleError, match=r"names '\.\./evil\.onnx', which lies outside"):
        load_bundle(models_dir, device="cpu", verify=verify)


def test_an_absolute_manifest_path_is_refused(models_copy):
    models_dir, path = models_copy
    shutil.copy(path / "retrievers/sasrec/user_encoder.onnx", models_dir / "evil.onnx")
    absolute = str((models_dir / "evil.onnx").resolve())
    _point(path, "user_encoder", absolute)
    with pytest.raises(BundleError, match="an absolute path"):
        load_bundle(models_dir, device="cpu")


def test_a_symlink_out_of_the_bundle_is_refused(models_copy):
    models_dir, path = models_copy
    target = path / "retrievers/sasrec/user_encoder.onnx"
    outside = models_dir / "evil.onnx"
    shutil.move(target, outside)
    target.symlink_to(outside)  # same bytes, so the checksum would match
    with pytest.raises(BundleError, match="lies outside the bundle"):
        load_bundle(models_dir, device="cpu")


@pytest.mark.parametrize(
    "relative", ["retrievers/sasrec/item_embeddings.npy", "items.parquet"], ids=["vectors", "items"]
)
def test_a_file_left_out_of_the_manifest_files_is_refused_not_loaded_unverified(
    models_copy, relative
):
    models_dir, path = models_copy
    manifest = _manifest(path)
    del manifest["files"][relative]
    write_manifest(path, manifest, checksums=False)
    # Changed after the export: nothing would have noticed.
    changed = path / relative
    if changed.suffix == ".npy":
        np.save(changed, np.load(changed) * 2, allow_pickle=False)
    name = relative.rpartition("/")[2].replace(".", r"\.")
    with pytest.raises(BundleError, match=rf"{name}: named by .* not listed with a checksum"):
        load_bundle(models_dir, device="cpu", models=False)


def test_a_head_file_named_apart_from_the_files_section_is_refused(head_models, tmp_path):
    models_dir = tmp_path / "models"
    shutil.copytree(head_models, models_dir)
    manifest = _manifest(models_dir / "with-head")
    manifest["retrievers"]["sasrec"]["ctr_head"]["file"] = "../../elsewhere.onnx"
    write_manifest(models_dir / "with-head", manifest, checksums=False)
    with pytest.raises(BundleError, match=r"ctr_head\.file names '\.\./\.\./elsewhere"):
        load_bundle(models_dir, device="cpu", models=False)


def test_the_index_can_be_placed_apart_from_the_onnx_models(head_models, monkeypatch):
    import faiss

    import service.retrieval as retrieval

    asked = []
    monkeypatch.setattr(retrieval, "faiss_gpus", lambda device: asked.append(device) or 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: index)  # a stand-in GPU
    bundle = load_bundle(head_models, device="cpu", index_device="gpu")
    assert asked and set(asked) == {"gpu"}
    for stages in placement(bundle).values():
        assert stages == {
            "encoder": "CPUExecutionProvider",
            "index": "gpu",
            "ctr_head": stages["ctr_head"],
        }
    assert {stages["ctr_head"] for stages in placement(bundle).values()} == {"CPUExecutionProvider"}
    asked.clear()
    load_bundle(head_models, device="cpu")  # without it, the index goes where the models go
    assert asked and set(asked) == {"cpu"}
    light = load_bundle(head_models, device="cpu", models=False)
    assert all(set(stages.values()) == {None} for stages in placement(light).values())


# --------------------------------------------------------------------------- metadata encoder

METADATA = "retrievers/sasrec/metadata_encoder.onnx"


def test_a_bundle_without_a_metadata_encoder_loads_without_one(models_copy):
    models_dir, path = models_copy
    manifest = _manifest(path)
    entry = manifest["retrievers"]["sasrec"]
    del entry["metadata_encoder"], entry["files"]["metadata_encoder"]
    del entry["files"]["metadata_vocabulary"]
    for relative in (METADATA, "item_metadata_vocabulary.json"):
        (path / relative).unlink()
        del manifest["files"][relative]
    write_manifest(path, manifest)
    retriever = load_bundle(models_dir, device="cpu").retrievers["sasrec"]
    assert retriever.metadata_encoder is None and retriever.metadata_vocabulary is None


def test_a_metadata_encoder_entry_without_its_file_is_refused(models_copy):
    models_dir, path = models_copy
    manifest = _manifest(path)
    del manifest["retrievers"]["sasrec"]["files"]["metadata_encoder"]
    write_manifest(path, manifest)
    with pytest.raises(BundleError, match="has a metadata_encoder entry but no file"):
        load_bundle(models_dir, device="cpu", models=False)


@pytest.mark.parametrize("models", [True, False])
def test_a_damaged_metadata_vocabulary_is_refused_naming_it(models_copy, models):
    models_dir, path = models_copy
    (path / "item_metadata_vocabulary.json").write_text('{"format": 1, "tokens": "abc"}')
    write_manifest(path, _manifest(path))
    with pytest.raises(BundleError, match=r"item_metadata_vocabulary\.json: not a metadata vocab"):
        load_bundle(models_dir, device="cpu", models=models)


def test_a_vocabulary_the_metadata_encoder_cannot_take_is_refused_at_load(models_copy):
    models_dir, path = models_copy
    vocabulary = path / "item_metadata_vocabulary.json"
    document = json.loads(vocabulary.read_text())
    document["tokens"] += [f"title=extra{i}" for i in range(5)]  # ids past the graph's table
    vocabulary.write_text(json.dumps(document))
    write_manifest(path, _manifest(path))
    assert load_bundle(models_dir, device="cpu", models=False).name == "tiny"
    with pytest.raises(BundleError, match=r"metadata_encoder\.onnx: fails on the \d+ token ids"):
        load_bundle(models_dir, device="cpu")


@pytest.mark.parametrize(
    ("gate", "field"),
    [
        ("yes", "ctr_head.gate is not an object"),
        ({"rerank_by_default": "false", "reason": "r"}, "ctr_head.gate.rerank_by_default"),
        ({"rerank_by_default": 0, "reason": "r"}, "ctr_head.gate.rerank_by_default"),
        ({"rerank_by_default": True}, "ctr_head.gate.reason"),
    ],
)
def test_a_malformed_rerank_gate_is_refused_naming_the_field(gate, field):
    from service.bundle import rerank_policy

    with pytest.raises(BundleError, match=re.escape(f"retrievers.sasrec.{field}")):
        rerank_policy({"ctr_head": {"gate": gate}}, "manifest.json: retrievers.sasrec")


def test_the_rerank_default_follows_the_gate_and_older_heads_keep_reranking():
    from service.bundle import NO_HEAD_REASON, UNGATED_REASON, rerank_policy

    gate = {"rerank_by_default": False, "reason": "no gain shown"}
    assert rerank_policy({"ctr_head": {"gate": gate}}, "m") == (False, "no gain shown")
    assert rerank_policy({"ctr_head": {}}, "m") == (True, UNGATED_REASON)
    assert rerank_policy({}, "m") == (False, NO_HEAD_REASON)
