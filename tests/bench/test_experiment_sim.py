"""bench/experiment_sim.py: the experiment loop on the tiny bundle, end to end."""

from __future__ import annotations

from bench import experiment_sim


def test_the_simulation_counts_what_the_offline_ranking_predicts(tiny_data, head_models):
    (result,) = experiment_sim.simulate(tiny_data, head_models, arms_kind="rerank", limit=120)
    arms = result["per_arm"]
    assert set(arms) == {"retrieval", "rerank"}
    assert sum(arm["impressions"] for arm in arms.values()) == 120
    for arm in arms.values():
        # Every impression is counted once, and clicks are exactly the offline hits of
        # the users the arm served: the loop loses and invents nothing.
        assert arm["equal_on_arm_users"], arm
        assert arm["online_ctr"] == arm["online_hit_rate"]
        low, high = arm["online_ci"]
        assert low <= arm["online_hit_rate"] <= high
    text = experiment_sim.render(result)
    assert "experiment sim-rerank" in text and "equal" in text
