import json
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
    warm_up,
)
from service.errors import BundleError


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


def test_warm_up_runs_every_model_on_the_shapes_serving_gives_it(head_models):
    bundle = load_bundle(head_models, device="cpu")
    retriever = bundle.retrievers[bundle.default_encoder]
    seen = {"encode": [], "search": [], "score": []}

    def spy(name, method):
        def call(*arrays):
            seen[name].append(tuple(tuple(a.shape) for a in arrays))
            return method(*arrays)

        return call

    encoder, index, head = retriever.encoder, retriever.index, retriever.ctr_head
    encoder.encode = spy("encode", encoder.encode)
    index.search = lambda users, depth, search=index.search: (
        seen["search"].append((users.shape[0], depth)) or search(users, depth)
    )
    head.score = spy("score", head.score)
    assert warm_up(bundle, batch=3, candidates=7) >= 0
    width = retriever.max_len
    # Every history width alone, then batches up to twice the batch at the longest width.
    assert [shapes[0] for shapes in seen["encode"][:width]] == [(1, w) for w in range(1, width + 1)]
    assert [shapes[0] for shapes in seen["encode"][width:]] == [(n, width) for n in (1, 2, 4, 8)]
    assert seen["search"] == [(n, 7) for n in (1, 2, 4, 8)]
    features = len(bundle.item_features.names)
    assert [shapes[2] for shapes in seen["score"]] == [(n, 7, features) for n in (1, 2, 4, 8)]


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
