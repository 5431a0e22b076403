"""Serving with a CTR head: /recommend reranks, rerank=false skips it, masks still hold."""

import pytest
from fastapi.testclient import TestClient

from service.main import create_app


@pytest.fixture
def head_client(make_settings, head_models):
    with TestClient(create_app(make_settings(models_dir=head_models))) as test_client:
        yield test_client


@pytest.mark.slow
def test_a_bundle_with_a_head_reranks_and_never_serves_a_seen_item(head_client, history):
    response = head_client.post("/recommend", json={"history": history, "k": 10})
    body = response.json()
    assert response.status_code == 200 and body["reranked"] is True
    assert body["timings_ms"]["rerank"] > 0
    seen = {event["item_id"] for event in history}
    assert not seen & {item["item_id"] for item in body["items"]}
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)  # ordered by the head's logits


@pytest.mark.slow
def test_rerank_false_skips_the_head_cleanly(head_client, history):
    body = head_client.post(
        "/recommend", json={"history": history, "k": 10, "rerank": False}
    ).json()
    assert body["reranked"] is False and body["timings_ms"]["rerank"] == 0
    assert all(item["score"] == item["retrieval_score"] for item in body["items"])


@pytest.mark.slow
def test_reranking_reorders_the_same_candidates_as_retrieval(head_client, history):
    # With k equal to the retrieval depth, the head can only reorder, never add or drop.
    request = {"history": history, "k": 20, "candidates": 20}
    reranked = head_client.post("/recommend", json=request).json()["items"]
    retrieved = head_client.post("/recommend", json={**request, "rerank": False}).json()["items"]
    assert {i["item_id"] for i in reranked} == {i["item_id"] for i in retrieved}


@pytest.mark.slow
def test_each_item_says_where_retrieval_had_put_it(head_client, history):
    request = {"history": history, "k": 20, "candidates": 20}
    reranked = head_client.post("/recommend", json=request).json()["items"]
    retrieved = head_client.post("/recommend", json={**request, "rerank": False}).json()["items"]
    assert [item["retrieval_rank"] for item in retrieved] == list(range(1, 21))
    # Ordering the reranked list by the ranks it reports gives back the retrieval order.
    by_rank = sorted(reranked, key=lambda item: item["retrieval_rank"])
    assert [i["item_id"] for i in by_rank] == [i["item_id"] for i in retrieved]
    assert [i["retrieval_score"] for i in by_rank] == [i["retrieval_score"] for i in retrieved]


def test_a_bundle_without_a_head_still_serves(client, history):
    body = client.post("/recommend", json={"history": history, "k": 5}).json()
    assert body["reranked"] is False and len(body["items"]) == 5


@pytest.mark.slow
def test_at_ranks_as_of_that_time_and_is_echoed(head_client, history):
    import time

    request = {"history": history, "k": 10, "at": 1_700_000_000}
    first = head_client.post("/recommend", json=request).json()
    time.sleep(1.1)  # a request without "at" would now measure to another second
    again = head_client.post("/recommend", json=request).json()
    assert first["at"] == again["at"] == 1_700_000_000
    assert [i["score"] for i in first["items"]] == [i["score"] for i in again["items"]]
    before = int(time.time())
    now = head_client.post("/recommend", json={"history": history, "k": 10}).json()
    assert before <= now["at"] <= int(time.time())


def test_a_negative_at_is_422_naming_it(client, history):
    response = client.post("/recommend", json={"history": history, "at": -1})
    assert response.status_code == 422 and "body.at" in response.json()["detail"]


def test_the_answer_memo_keeps_answers_for_different_times_apart(make_settings, history):
    settings = make_settings(answer_ttl_seconds=30)
    with TestClient(create_app(settings)) as client:
        first = client.post("/recommend", json={"history": history, "at": 1_600_000_000})
        other = client.post("/recommend", json={"history": history, "at": 1_700_000_000})
        same = client.post("/recommend", json={"history": history, "at": 1_600_000_000})
    assert other.json()["cache"] != "answer" and other.json()["at"] == 1_700_000_000
    assert same.json()["cache"] == "answer" and same.json()["at"] == 1_600_000_000
    assert first.json()["at"] == 1_600_000_000
