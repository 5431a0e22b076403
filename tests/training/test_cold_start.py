"""The item-metadata encoder: its fit, its export into a bundle and its load."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from service.bundle import load_bundle, read_manifest
from service.item_metadata import VOCABULARY
from training.cold_start import (
    ColdStartConfig,
    catalogue_metadata,
    fit_metadata_encoder,
    has_metadata,
)
from training.data import ItemMetadata, build_sequences
from training.errors import ConfigError
from training.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def genre_data():
    """400 items in 20 genres (the synthetic taste clusters)."""
    return build_sequences(generate(SyntheticConfig(users=200, items=400, clusters=20, seed=2)))


def genre_vectors(data, seed: int = 0) -> np.ndarray:
    """Item vectors (N + 1, 16) that metadata can predict: a centre per genre plus noise."""
    rng = np.random.default_rng(seed)
    centres = {}
    vectors = np.zeros((data.n_items + 1, 16), np.float32)
    for row, raw in enumerate(data.item_map.raw.tolist()[1:], start=1):
        genre = data.metadata.genres[raw][0]
        centre = centres.setdefault(genre, rng.standard_normal(16) * 2.0)
        vectors[row] = centre + rng.standard_normal(16) * 0.5
    return vectors


def test_the_fit_places_unseen_items_beside_their_own_vectors(genre_data):
    metadata = catalogue_metadata(genre_data)
    trained = np.ones(genre_data.n_items + 1, bool)
    config = ColdStartConfig(holdout_share=0.2)
    fit = fit_metadata_encoder(genre_vectors(genre_data), metadata, trained, config=config)
    report = fit.report
    assert report["items"] == {"fitted": 320, "held_out": 80}
    assert report["loss"]["last"] < 0.8 * report["loss"]["first"]
    encoder, mean = report["quality_held_out"]["encoder"], report["quality_held_out"]["mean_vector"]
    # Its genre's 20 items are all alike to the encoder: the true one ranks among them.
    assert encoder["recall@50"] > 0.9 > 0.2 > mean["recall@50"]
    assert encoder["neighbours@10"] > 0.3 > mean["neighbours@10"]
    assert encoder["length_ratio"] == pytest.approx(1.0, abs=0.2)


def test_items_without_training_events_or_metadata_are_no_targets(genre_data):
    metadata = catalogue_metadata(genre_data)
    trained = np.ones(genre_data.n_items + 1, bool)
    trained[1:101] = False  # never trained: their vectors are noise
    metadata.described[101:151] = False  # no title, no genres
    fit = fit_metadata_encoder(
        genre_vectors(genre_data), metadata, trained, config=ColdStartConfig(min_steps=1)
    )
    assert sum(fit.report["items"].values()) == 250


def test_export_writes_the_metadata_encoder_and_load_bundle_embeds_with_it(
    exported_bundle, tiny_data
):
    models_dir, path = exported_bundle
    entry = read_manifest(path)["retrievers"]["sasrec"]
    metadata_entry = entry["metadata_encoder"]
    assert metadata_entry["file"] == entry["files"]["metadata_encoder"]
    assert metadata_entry["vocabulary"] == entry["files"]["metadata_vocabulary"] == VOCABULARY
    assert metadata_entry["onnx_parity_max_abs_diff"] <= 1e-4
    assert {"recall@10", "ndcg@10", "neighbours@10"} <= set(
        metadata_entry["quality_held_out"]["encoder"]
    )

    retriever = load_bundle(models_dir, device="cpu").retrievers["sasrec"]
    encoder = retriever.metadata_encoder
    assert encoder is not None and encoder.vocabulary == retriever.metadata_vocabulary
    assert encoder.vocabulary.size == metadata_entry["model_config"]["n_tokens"]
    new_items = [
        {"title": "A Film Nobody Saw (2031)", "genres": ["genre-0"]},
        {"genres": ["genre-1", "a genre no item has"]},
        {},
    ]
    vectors = encoder.embed(new_items)
    assert vectors.shape == (3, retriever.item_vectors.shape[1]) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, encoder.embed(new_items))  # deterministic
    assert not np.allclose(vectors[0], vectors[1])

    # What the bundle serves is what the export fitted: the vocabulary featurizes the
    # catalogue as the fit did, and the loaded graph gives the vectors of the items.
    fitted = catalogue_metadata(tiny_data)
    assert fitted.vocabulary == encoder.vocabulary
    records = [tiny_data.metadata.record(r) for r in tiny_data.item_map.raw.tolist()[1:4]]
    np.testing.assert_array_equal(
        encoder.embed(records), encoder.run(fitted.token_ids[1:4], fitted.token_weights[1:4])
    )


def test_data_without_metadata_gets_no_metadata_encoder(tiny_data):
    assert has_metadata(tiny_data)
    assert not has_metadata(replace(tiny_data, metadata=None))
    assert not has_metadata(replace(tiny_data, metadata=ItemMetadata()))
    with pytest.raises(ConfigError, match="no item metadata"):
        catalogue_metadata(replace(tiny_data, metadata=None))
