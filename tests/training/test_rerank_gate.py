"""The rerank gate: a head reranks by default only where it is shown to help on users it
never trained on (a paired bootstrap interval of the NDCG@10 difference above zero)."""

from __future__ import annotations

import numpy as np
import pytest

from training.ctr import CandidateSet
from training.errors import ConfigError
from training.rerank_gate import (
    DECIDED_BY_EXPORT,
    DECIDED_BY_GATE,
    GateConfig,
    decide,
    gate_head,
    ndcg_per_user,
    paired_bootstrap,
    verdict_on_test,
)

USERS, DEPTH, DIM = 400, 20, 4


def candidate_set(target_rank: np.ndarray) -> CandidateSet:
    """Candidates of USERS users, each with its true item at ``target_rank`` in retrieval
    order (DEPTH or more: not retrieved); the true item's slot carries feature 1.0, which
    is how the scorers below recognise it."""
    rng = np.random.default_rng(1)
    ids = np.tile(np.arange(1, DEPTH + 1), (USERS, 1))
    targets = np.where(target_rank < DEPTH, np.minimum(target_rank, DEPTH - 1) + 1, DEPTH + 5)
    features = (ids == targets[:, None]).astype(np.float32)[..., None]
    return CandidateSet(
        users=np.arange(USERS),
        targets=targets,
        ids=ids,
        scores=-np.arange(DEPTH, dtype=np.float32)[None].repeat(USERS, axis=0),
        user=rng.normal(size=(USERS, DIM)).astype(np.float32),
        features=features,
        labels=features,
        feature_names=["is_target"],
        tasks=["watched"],
    )


def lifts_the_true_item(user, candidates, features):
    return features[..., 0]  # (b, c): the true item first, the rest in retrieval order


def sinks_the_true_item(user, candidates, features):
    return -features[..., 0]  # the true item last


def vectors() -> np.ndarray:
    return np.random.default_rng(2).normal(size=(DEPTH + 10, DIM)).astype(np.float32)


def test_ndcg_per_user_is_the_discounted_gain_inside_the_cutoff():
    got = ndcg_per_user(np.array([0, 1, 9, 10, 50]), cutoff=10)
    assert got == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0, 0.0])


def test_a_head_that_lifts_true_items_reranks_by_default():
    # Every user's true item sits at rank 3..8 in retrieval order; the head puts it first.
    ranks = np.random.default_rng(0).integers(3, 9, USERS)
    gate = gate_head(lifts_the_true_item, candidate_set(ranks), vectors(), DEPTH)
    assert gate["rerank_by_default"] is True and gate["decided_by"] == DECIDED_BY_GATE
    assert gate["ndcg_reranked"] == pytest.approx(1.0)
    assert gate["ci"][0] > 0 and gate["delta"] > 0 and "helps" in gate["reason"]
    assert gate["validation_users"] == USERS and gate["depth"] == DEPTH


def test_a_head_that_sinks_true_items_does_not_rerank_by_default():
    ranks = np.random.default_rng(0).integers(0, 4, USERS)
    gate = gate_head(sinks_the_true_item, candidate_set(ranks), vectors(), DEPTH)
    assert gate["rerank_by_default"] is False
    assert gate["ci"][1] < 0 and "hurts" in gate["reason"]
    assert f"{gate['ndcg_retrieval']:.4f}" in gate["reason"]


def test_users_whose_true_item_was_not_retrieved_count_zero_both_ways():
    ranks = np.full(USERS, DEPTH + 1)  # nobody's true item among the candidates
    gate = gate_head(lifts_the_true_item, candidate_set(ranks), vectors(), DEPTH)
    assert gate["ndcg_retrieval"] == gate["ndcg_reranked"] == 0.0
    assert gate["rerank_by_default"] is False and gate["ci"] == [0.0, 0.0]


def test_a_gain_inside_the_noise_does_not_rerank_by_default():
    rng = np.random.default_rng(3)
    retrieval = rng.uniform(0, 1, 200)
    # A small mean gain under a large per-user spread: the interval straddles zero.
    reranked = retrieval + 0.01 + rng.normal(0, 0.3, 200)
    gate = decide(retrieval, reranked, GateConfig())
    assert gate["delta"] > 0 and gate["ci"][0] < 0 < gate["ci"][1]
    assert gate["rerank_by_default"] is False and "no gain shown" in gate["reason"]
    # The same gain on many more users is shown.
    retrieval = rng.uniform(0, 1, 200_000)
    reranked = retrieval + 0.01 + rng.normal(0, 0.3, 200_000)
    assert decide(retrieval, reranked, GateConfig(resamples=200))["rerank_by_default"] is True


def test_the_bootstrap_interval_is_seeded_and_matches_the_normal_approximation():
    differences = np.random.default_rng(4).normal(0.02, 0.2, 2000)
    low, high = paired_bootstrap(differences, 2000, seed=7, confidence=0.95)
    assert (low, high) == paired_bootstrap(differences, 2000, seed=7, confidence=0.95)
    assert (low, high) != paired_bootstrap(differences, 2000, seed=8, confidence=0.95)
    half = 1.96 * differences.std() / np.sqrt(len(differences))
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert (low + high) / 2 == pytest.approx(differences.mean(), abs=0.2 * half)
    narrower = paired_bootstrap(differences, 2000, seed=7, confidence=0.5)
    assert low < narrower[0] < narrower[1] < high


def test_the_export_option_overrides_the_gate_and_keeps_its_measurement():
    ranks = np.random.default_rng(0).integers(3, 9, USERS)
    helps = candidate_set(ranks)
    forced_off = gate_head(
        lifts_the_true_item, helps, vectors(), DEPTH, GateConfig(rerank_default="off")
    )
    assert forced_off["rerank_by_default"] is False and forced_off["gate_decision"] is True
    assert forced_off["decided_by"] == DECIDED_BY_EXPORT
    assert "--rerank-default off" in forced_off["reason"] and "helps" in forced_off["reason"]
    forced_on = gate_head(
        sinks_the_true_item, helps, vectors(), DEPTH, GateConfig(rerank_default="on")
    )
    assert forced_on["rerank_by_default"] is True and forced_on["gate_decision"] is False


def test_no_validation_users_means_no_rerank_by_default():
    gate = decide(np.zeros(0), np.zeros(0), GateConfig())
    assert gate["rerank_by_default"] is False and gate["validation_users"] == 0
    assert gate["ci"] is None and "no validation users" in gate["reason"]


@pytest.mark.parametrize(
    "options", [{"rerank_default": "sometimes"}, {"resamples": 0}, {"confidence": 1.0}]
)
def test_a_bad_gate_setting_is_refused_naming_it(options):
    with pytest.raises(ConfigError):
        GateConfig(**options)


def test_a_decision_is_judged_on_the_test_difference_and_its_interval():
    assert verdict_on_test(True, 0.01, [0.002, 0.02]) == "right (clearly)"
    assert verdict_on_test(False, 0.01, [-0.001, 0.02]) == "wrong (within noise)"
    assert verdict_on_test(False, -0.01, [-0.02, -0.001]) == "right (clearly)"
    assert verdict_on_test(True, -0.01, [-0.02, 0.001]) == "wrong (within noise)"
