"""Candidate features: hand-computed values, point-in-time item age, and one definition
shared by the training pipeline and the serving path."""

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from service.features import (
    AGE_CAP,
    NEVER,
    ItemFeatures,
    candidate_features,
    feature_names,
    genre_matrix,
    last_seen_from_events,
)


def hand_items() -> ItemFeatures:
    """Items 1..4 as a bundle's catalogue would give them (no event index)."""
    genres, names = genre_matrix([[], ["A"], ["A", "B"], ["B"], []])
    return ItemFeatures(
        popularity=np.array([0, 10, 0, 3, 1]),
        last_seen=np.array([NEVER, 1000, NEVER, 400, 1990]),
        genres=genres,
        genre_names=names,
    )


def test_feature_values_match_a_hand_computed_example():
    items = hand_items()
    features, names = candidate_features(
        user_embedding=np.array([[1.0, 0.0]]),
        candidate_ids=np.array([[2, 3, 0]]),  # the last slot is empty
        retrieval_scores=np.array([[0.5, 0.2, -np.inf]]),
        candidate_vectors=np.array([[[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]]]),
        history_ids=np.array([[0, 1, 4]]),
        history_ts=np.array([[0, 100, 1000]]),
        request_time=np.array([2000]),
        items=items,
    )
    assert names == feature_names(with_genres=True) and features.dtype == np.float32
    # The user's last items are 1 (genre A) and 4 (none): the profile is A = 1/2, B = 0.
    # Item 2 has A and B: (1/2 + 0) / 2; item 3 has B only: 0.
    expected = {
        "retrieval_score": [0.5, 0.2, 0.0],
        "retrieval_score_gap": [0.0, -0.3, 0.0],
        "log_rank": [0.0, np.log(2), 0.0],
        "cosine": [0.6, 0.0, 0.0],
        "log_popularity": [0.0, np.log1p(3), 0.0],
        "log_item_age": [np.log1p(AGE_CAP), np.log1p(1600), 0.0],  # item 2 never seen
        "log_user_gap": [np.log1p(1000), np.log1p(1000), 0.0],
        "log_history_length": [np.log1p(2), np.log1p(2), 0.0],
        "genre_overlap": [0.25, 0.0, 0.0],
    }
    for column, name in enumerate(names):
        np.testing.assert_allclose(features[0, :, column], expected[name], rtol=1e-6, err_msg=name)


def test_without_genres_there_is_no_genre_feature():
    items = ItemFeatures(popularity=np.array([0, 1]), last_seen=np.array([NEVER, 5]))
    features, names = candidate_features(
        np.ones((1, 2)), np.array([[1]]), np.array([[1.0]]), np.ones((1, 1, 2)),
        history_ids=np.array([[1]]), history_ts=np.array([[3]]), request_time=np.array([10]),
        items=items,
    )  # fmt: skip
    assert names == feature_names(with_genres=False) and features.shape == (1, 1, len(names))


def test_item_age_is_taken_as_of_the_request():
    # Item 1 was interacted with at 100, 500 and 900; item 2 never.
    training = ItemFeatures.from_events(2, np.array([1, 1, 1]), np.array([500, 100, 900]))
    assert last_seen_from_events(2, np.array([1, 1, 1]), np.array([500, 100, 900])).tolist() == [
        NEVER,
        900,
        NEVER,
    ]
    ids = np.array([[1, 2], [1, 2], [1, 2], [1, 2]])
    requests = np.array([100, 600, 900, 5000])  # strictly before the request only
    found = training.last_seen_before(ids, requests)
    assert found[:, 0].tolist() == [NEVER, 500, 500, 900]
    assert (found[:, 1] == NEVER).all()
    # Serving knows only the last time; every training event precedes a real request.
    serving = ItemFeatures(popularity=training.popularity, last_seen=training.last_seen)
    np.testing.assert_array_equal(serving.last_seen_before(ids[-1:], requests[-1:]), found[-1:])


def test_catalogue_and_training_events_give_the_same_item_facts(tiny_data, exported_bundle):
    from service.bundle import load_bundle
    from training.ctr import training_item_features

    models_dir, _ = exported_bundle
    catalogue = load_bundle(models_dir, device="cpu").catalogue
    training = training_item_features(tiny_data)
    serving = ItemFeatures.from_catalogue(catalogue, last_seen=training.last_seen)
    np.testing.assert_array_equal(serving.popularity, training.popularity)
    np.testing.assert_array_equal(serving.genres, training.genres)
    assert serving.genre_names == training.genre_names and serving.names == training.names
    with pytest.raises(ValueError, match="last_seen"):
        ItemFeatures.from_catalogue(SimpleNamespace(popularity=catalogue.popularity, genres=None))


def test_training_and_serving_compute_the_same_features(tiny_data, exported_bundle):
    """One user's test request through the training pipeline and through the serving path
    (prepare_history, encoder window, ONNX encoder, index, seen-item removal, head inputs)."""
    from service.bundle import load_bundle
    from service.filters import drop_seen
    from service.histories import left_padded_window
    from service.pipeline import prepare_histories
    from service.ranking import RerankJob, batch_head_inputs
    from training.ctr import retrieve_candidates, training_item_features

    models_dir, _ = exported_bundle
    bundle = load_bundle(models_dir, device="cpu")
    retriever = bundle.retrievers["sasrec"]
    items = training_item_features(tiny_data)
    depth = 30
    user = int(tiny_data.eval_users()[3])

    offline = retrieve_candidates(tiny_data, retriever, items, "test", depth, users=[user])

    start, end = int(tiny_data.offsets[user]), int(tiny_data.offsets[user + 1]) - 1
    events = [
        (str(tiny_data.item_map.raw[i]), int(t))
        for i, t in zip(tiny_data.items[start:end], tiny_data.timestamps[start:end], strict=True)
    ]
    (history,) = prepare_histories(bundle.catalogue, [events], [1000])
    window, deltas = left_padded_window(
        history.item_ids,
        history.timestamps,
        np.array([0]),
        np.array([len(history.item_ids)]),
        retriever.max_len,
    )
    embedding = retriever.encoder.encode(window, deltas)
    seen = np.unique(history.item_ids)
    scores, found = retriever.index.search(embedding, depth + len(seen))
    ((ids, kept_scores),) = drop_seen([found[0]], [scores[0]], [seen], [depth])
    job = RerankJob(
        user_embedding=embedding[0],
        candidate_ids=ids,
        retrieval_scores=kept_scores,
        history_ids=history.item_ids,
        history_ts=history.timestamps,
        request_time=int(tiny_data.timestamps[end]),  # offline, the held-out event's time
    )
    inputs = batch_head_inputs(items, retriever.item_vectors, [job])

    assert len(ids) == depth
    np.testing.assert_array_equal(offline.ids[0], ids)
    np.testing.assert_array_equal(offline.scores[0], kept_scores)
    np.testing.assert_array_equal(offline.user[0], inputs.user[0])
    assert offline.feature_names == inputs.feature_names
    np.testing.assert_array_equal(offline.features[0], inputs.features[0])


def test_features_and_ranking_never_import_torch():
    code = (
        "import sys\nimport service.features, service.ranking\n"
        "leaked = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
