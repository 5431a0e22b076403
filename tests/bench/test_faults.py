"""Fault runs against a real uvicorn server and private redis-servers (bench/faults.py).

Short versions of the runs recorded in docs/RELIABILITY.md; each starts its own
redis-server on a free port, so stopping it touches nothing else.
"""

from __future__ import annotations

import shutil

import pytest

from bench.faults import (
    BAD_BUNDLES,
    bad_bundles,
    build_fixture,
    compute_faults,
    redis_outage,
    reload_under_load,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]


@pytest.fixture(scope="module")
def fixture(tiny_data, tmp_path_factory):
    """Two bundles of the tiny data trained with different seeds (CURRENT: the first)."""
    return build_fixture(tmp_path_factory.mktemp("faults"), tiny_data, epochs=1, max_len=16)


def test_a_redis_outage_under_load_loses_no_event_and_fails_no_recommendation(fixture):
    row = redis_outage(fixture, duration=14.0, outage_at=4.0, outage_for=3.0, concurrency=2)
    details = row.details
    assert details["requests_while_down"] > 0  # the outage really happened under load
    assert details["recommend_5xx"] == 0
    assert details["events_refused"] > 0  # /events noticed the outage ...
    assert details["events_refused_without_503_retry_after"] == 0  # ... and said so
    assert details["events_acknowledged"] > 0 and row.events_lost == 0
    assert details["hit_ratio_after"] >= 0.8 * details["hit_ratio_before"], details
    assert row.passed


def test_reloads_under_load_with_two_workers_fail_no_request(fixture):
    row = reload_under_load(fixture, reloads=4, interval=1.0, workers=2, concurrency=4)
    details = row.details
    assert details["failed"] == 0 and all(a["status"] == 200 for a in details["admin"])
    assert set(details["bundles_named"]) == set(fixture.bundles)
    assert details["inconsistent_rankings"] == 0
    assert details["histories_ranked_differently"] > 0  # the check could have caught a mix-up
    assert details["rss_settled_bytes"] <= details["rss_limit_bytes"]
    assert row.passed


def test_every_kind_of_bad_bundle_is_refused_naming_the_file(fixture):
    rows = bad_bundles(fixture)
    assert len(rows) == len(BAD_BUNDLES)
    for row in rows:
        assert row.passed, (row.fault, row.details)
        assert row.errors == 0


def test_a_killed_or_stopped_compute_process_is_replaced_under_load(fixture):
    rows = compute_faults(fixture, duration=8.0, fault_at=2.5, concurrency=2)
    for row in rows:
        details = row.details
        assert row.passed, (row.fault, row.behaviour)
        # Replaced well before the old 30 s call timeout would have freed the requests.
        assert details["recovery_s"] is not None and details["recovery_s"] < 5.0, details
