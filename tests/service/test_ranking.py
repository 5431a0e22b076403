"""Reranking with an ONNX CTR head: scoring shapes, ordering, and masked items staying out.

The head here is a hand-built ONNX graph whose logit is one feature column (the log
popularity), so the expected order is known without training anything.
"""

import numpy as np
import pytest

from service.features import NEVER, ItemFeatures, feature_names
from service.ranking import INPUT_NAMES, OUTPUT_NAME, CtrHead, RerankJob, rerank, rerank_batch

NAMES = feature_names(with_genres=False)
POPULARITY = NAMES.index("log_popularity")
DIM = 4


def linear_head(weights: np.ndarray, folder) -> CtrHead:
    """An ONNX head with logits = candidate_features @ weights: (B, C, F) -> (B, C)."""
    from onnx import TensorProto, checker, helper, numpy_helper

    weights = np.asarray(weights, dtype=np.float32).reshape(len(NAMES), 1)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["candidate_features", "w"], ["scored"]),
            helper.make_node("Squeeze", ["scored", "last"], [OUTPUT_NAME]),
        ],
        "popularity_head",
        [
            helper.make_tensor_value_info(INPUT_NAMES[0], TensorProto.FLOAT, ["B", DIM]),
            helper.make_tensor_value_info(INPUT_NAMES[1], TensorProto.FLOAT, ["B", "C", DIM]),
            helper.make_tensor_value_info(
                INPUT_NAMES[2], TensorProto.FLOAT, ["B", "C", len(NAMES)]
            ),
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["B", "C"])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([-1]), "last")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    path = folder / "ctr_head.onnx"
    path.write_bytes(model.SerializeToString())
    return CtrHead(path, device="cpu", threads=1, feature_names=NAMES)


@pytest.fixture(scope="module")
def popularity_head(tmp_path_factory) -> CtrHead:
    """logits = the log popularity feature."""
    weights = np.zeros(len(NAMES))
    weights[POPULARITY] = 1.0
    return linear_head(weights, tmp_path_factory.mktemp("head"))


def test_a_batch_of_requests_is_reranked_as_each_alone(tmp_path):
    """Right-padded candidates and left-padded histories change no row's features."""
    head = linear_head(np.random.default_rng(3).normal(size=len(NAMES)), tmp_path)
    items, table = catalogue_items(), vectors()
    rng = np.random.default_rng(4)
    jobs = []
    for count, length in [(5, 2), (0, 3), (8, 1), (3, 0), (6, 70)]:
        ids = rng.permutation(np.arange(1, 9))[:count]
        jobs.append(
            RerankJob(
                user_embedding=rng.normal(size=DIM).astype(np.float32),
                candidate_ids=ids,
                retrieval_scores=np.sort(rng.normal(size=count))[::-1].astype(np.float32),
                history_ids=rng.integers(1, 9, size=length),
                history_ts=np.sort(rng.integers(0, 900, size=length)),
                request_time=int(rng.integers(900, 2000)),
            )
        )
    together = rerank_batch(head, items, table, jobs)
    for job, batched in zip(jobs, together, strict=True):
        (alone,) = rerank_batch(head, items, table, [job])
        np.testing.assert_array_equal(batched.ids, alone.ids)
        np.testing.assert_allclose(batched.logits, alone.logits, rtol=1e-5, atol=1e-6)
        assert sorted(batched.ids.tolist()) == sorted(job.candidate_ids.tolist())


def catalogue_items(n: int = 8) -> ItemFeatures:
    """Item i has popularity 10 * i: the higher the id, the more popular."""
    return ItemFeatures(
        popularity=np.arange(n + 1) * 10, last_seen=np.full(n + 1, 500, dtype=np.int64)
    )


def vectors(n: int = 8) -> np.ndarray:
    out = np.random.default_rng(0).normal(size=(n + 1, DIM)).astype(np.float32)
    out[0] = 0.0
    return out


def call_rerank(head, ids, exclude=None, scores=None):
    ids = np.asarray(ids)
    scores = np.linspace(1.0, 0.1, len(ids)) if scores is None else scores
    job = RerankJob(
        user_embedding=np.array([0.5, 0.5, 0.5, 0.5]),
        candidate_ids=ids,
        retrieval_scores=scores,
        history_ids=np.array([1, 2]),
        history_ts=np.array([100, 200]),
        request_time=1000,
    )
    return rerank(
        head,
        catalogue_items(),
        vectors(),
        job,
        exclude=None if exclude is None else np.asarray(exclude),
    )


@pytest.mark.parametrize("batch,count", [(1, 1), (1, 200), (3, 7)])
def test_ctr_head_scores_any_batch_and_candidate_count(popularity_head, batch, count):
    rng = np.random.default_rng(batch * count)
    features = rng.normal(size=(batch, count, len(NAMES))).astype(np.float32)
    logits = popularity_head.score(
        rng.normal(size=(batch, DIM)), rng.normal(size=(batch, count, DIM)), features
    )
    assert logits.shape == (batch, count)
    np.testing.assert_allclose(logits, features[..., POPULARITY], rtol=1e-6)


def test_rerank_orders_candidates_by_the_heads_logits(popularity_head):
    result = call_rerank(popularity_head, [3, 1, 7, 5], scores=np.array([0.9, 0.8, 0.7, 0.6]))
    assert result.ids.tolist() == [7, 5, 3, 1]  # by popularity, not by retrieval score
    np.testing.assert_allclose(result.logits, np.log1p([70, 50, 30, 10]), rtol=1e-6)
    np.testing.assert_allclose(result.retrieval_scores, [0.7, 0.6, 0.9, 0.8])  # follow ids


def test_reranking_never_returns_a_masked_item(popularity_head):
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.permutation(np.arange(0, 9))  # every item and the padding id
        masked = rng.choice(np.arange(1, 9), size=3, replace=False)
        result = call_rerank(popularity_head, ids, exclude=masked)
        assert not set(result.ids.tolist()) & set(masked.tolist())
        assert 0 not in result.ids
        assert sorted(result.ids.tolist()) == sorted(set(range(1, 9)) - set(masked.tolist()))
    # The most popular items are masked: they stay out although they would score best.
    assert call_rerank(popularity_head, [8, 7, 2, 1], exclude=[8, 7]).ids.tolist() == [2, 1]


def test_reranking_only_masked_candidates_returns_nothing(popularity_head):
    result = call_rerank(popularity_head, [0, 4, 5], exclude=[4, 5])
    assert len(result.ids) == 0 and len(result.logits) == 0


def test_a_head_is_refused_for_features_it_was_not_trained_on(popularity_head):
    with pytest.raises(ValueError, match="features"):
        CtrHead(popularity_head.path, device="cpu", feature_names=NAMES[:-1])
    items = catalogue_items()
    items.genres = np.zeros((9, 2), dtype=np.float32)  # now the catalogue adds genre_overlap
    items.last_seen[:] = NEVER
    with pytest.raises(ValueError, match="trained on features"):
        job = RerankJob(
            user_embedding=np.ones(DIM),
            candidate_ids=np.array([1, 2]),
            retrieval_scores=np.array([0.5, 0.4]),
            history_ids=np.array([3]),
            history_ts=np.array([10]),
            request_time=100,
        )
        rerank(popularity_head, items, vectors(), job)
