import numpy as np
import pytest
import torch

from training.data import Interactions, build_sequences
from training.evaluate import (
    evaluate,
    log_loss,
    mask_seen,
    metrics_from_ranks,
    popularity_scorer,
    roc_auc,
    target_ranks,
)

from .helpers import internal_ids


def test_metrics_match_hand_computed_values():
    ranks = np.array([0, 1, 9, 10, 25])  # 0-based
    m = metrics_from_ranks(ranks, cutoffs=(10, 20))
    assert m["recall@10"] == pytest.approx(3 / 5)
    assert m["recall@20"] == pytest.approx(4 / 5)
    ndcg10 = (1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(11)) / 5
    ndcg20 = ndcg10 + (1 / np.log2(12)) / 5
    assert m["ndcg@10"] == pytest.approx(ndcg10)
    assert m["ndcg@20"] == pytest.approx(ndcg20)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 26) / 5)


def test_metrics_of_truncated_candidate_lists_count_a_miss_as_zero_and_leave_out_mrr():
    # The CTR head's lists: a target not among 200 candidates has rank 200.
    ranks = np.array([0, 3, 200, 200])
    m = metrics_from_ranks(ranks, (10,), mrr=False)
    assert set(m) == {"recall@10", "ndcg@10"}
    assert m["recall@10"] == 0.5
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(2) + 1 / np.log2(5)) / 4)


def test_auc_matches_a_hand_computed_value():
    # Positives 0.9 and 0.3 against negatives 0.8, 0.3, 0.1:
    # 0.9 beats all three (3); 0.3 loses to 0.8, ties 0.3 (0.5), beats 0.1 (1) -> 4.5 / 6.
    labels = np.array([1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.3, 0.1])
    assert roc_auc(labels, scores) == pytest.approx(0.75)
    assert roc_auc(labels, -scores) == pytest.approx(0.25)
    assert np.isnan(roc_auc(np.ones(3), np.arange(3.0)))


def test_log_loss_is_binary_cross_entropy_of_the_logits():
    assert log_loss(np.array([1, 0]), np.array([0.0, 0.0])) == pytest.approx(np.log(2))
    # p = sigmoid(2) for a positive, 1 - sigmoid(-1) for a negative
    expected = -(np.log(1 / (1 + np.exp(-2))) + np.log(1 - 1 / (1 + np.exp(1)))) / 2
    assert log_loss(np.array([1, 0]), np.array([2.0, -1.0])) == pytest.approx(expected)


def test_target_rank_counts_ties_against_the_target():
    scores = torch.tensor([[0.0, 0.5, 0.9, 0.5, 0.1]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [0]
    # item 1 ties with item 3: the tie is counted as ranked above the target
    assert target_ranks(scores, torch.tensor([1])).tolist() == [2]
    assert target_ranks(scores, torch.tensor([4])).tolist() == [3]


def _log(events):
    users, items, ts = zip(*events, strict=True)
    return build_sequences(Interactions(np.array(users), np.array(items), np.array(ts)))


def test_seen_items_and_padding_are_masked():
    data = _log([("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("u", "d", 4)])
    scores = torch.zeros(1, data.n_items + 1)
    start, end = data.offsets[:1], data.offsets[:1] + 2  # history a, b
    masked = mask_seen(scores, data, start, end)
    a, b = internal_ids(data.item_map)["a"], internal_ids(data.item_map)["b"]
    assert torch.isinf(masked[0, [0, a, b]]).all()
    assert torch.isfinite(masked[0]).sum() == data.n_items - 2


def test_full_ranking_of_a_known_scorer():
    # two users; the scorer ranks items by a fixed preference order e > d > c > b > a
    events = [("u1", x, t) for t, x in enumerate("abcd")] + [
        ("u2", x, t) for t, x in enumerate("eab")
    ]
    data = _log(events)
    ids = internal_ids(data.item_map)
    preference = torch.zeros(data.n_items + 1)
    for rank, name in enumerate("edcba"):
        preference[ids[name]] = 10 - rank

    def scorer(item_ids, deltas):
        return preference[None].expand(item_ids.shape[0], -1).clone()

    # test targets: u1 -> d (history a,b,c masked: d is the best unseen after e) rank 1
    #               u2 -> b (history e,a masked: remaining d, c, b) rank 2
    result = evaluate(scorer, data, "test", max_len=10, cutoffs=(1, 2, 3))
    assert result["users"] == 2
    assert result["recall@1"] == 0.0
    assert result["recall@2"] == pytest.approx(0.5)
    assert result["recall@3"] == pytest.approx(1.0)
    assert result["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_popularity_counts_only_training_events():
    events = [("u1", x, t) for t, x in enumerate("aabxy")] + [
        ("u2", x, t) for t, x in enumerate("abzw")
    ]
    data = _log(events)
    counts = popularity_scorer(data)(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1))[0]
    ids = internal_ids(data.item_map)
    assert counts[ids["a"]] == 3 and counts[ids["b"]] == 2
    assert counts[ids["x"]] == counts[ids["y"]] == counts[ids["z"]] == counts[ids["w"]] == 0
