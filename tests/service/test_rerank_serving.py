"""Serving with a CTR head: /recommend reranks as the bundle says by default (the
export's gate), rerank=true and false override it, masks still hold."""

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.conftest import shared_app


@pytest.fixture(scope="module")
def head_client(head_models, tmp_path_factory, shared_redis):
    """One app serving the head bundle for the module's read-only tests."""
    with shared_app(head_models, tmp_path_factory, shared_redis) as test_client:
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


def test_a_bundle_without_a_head_still_serves(reader, history):
    body = reader.post("/recommend", json={"history": history, "k": 5}).json()
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


def test_a_negative_at_is_422_naming_it(reader, history):
    response = reader.post("/recommend", json={"history": history, "at": -1})
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


# ------------------------------------------------------------------ the bundle's default


@pytest.fixture(scope="module")
def gated_off_client(gated_off_models, tmp_path_factory, shared_redis):
    """One app serving the gated-off head bundle for the module's read-only tests."""
    with shared_app(gated_off_models, tmp_path_factory, shared_redis) as test_client:
        yield test_client


@pytest.mark.slow
def test_a_bundle_whose_gate_says_no_serves_retrieval_order_unless_asked(gated_off_client, history):
    request = {"history": history, "k": 10}
    default = gated_off_client.post("/recommend", json=request).json()
    assert default["reranked"] is False and default["timings_ms"]["rerank"] == 0
    assert all(item["score"] == item["retrieval_score"] for item in default["items"])
    assert [item["retrieval_rank"] for item in default["items"]] == list(range(1, 11))
    null = gated_off_client.post("/recommend", json={**request, "rerank": None}).json()
    assert null["reranked"] is False and null["items"] == default["items"]
    asked = gated_off_client.post("/recommend", json={**request, "rerank": True}).json()
    assert asked["reranked"] is True and asked["timings_ms"]["rerank"] > 0
    assert [i["score"] for i in asked["items"]] != [i["retrieval_score"] for i in asked["items"]]


@pytest.mark.slow
def test_readyz_and_bundle_show_each_retrievers_default_and_the_gates_reason(
    gated_off_client,
):
    from tests.service.conftest import GATE_SAYS_NO

    ready = gated_off_client.get("/readyz").json()  # no admin token needed
    assert ready["rerank"] == {"sasrec": {"by_default": False, "reason": GATE_SAYS_NO}}
    (retriever,) = gated_off_client.get("/bundle").json()["retrievers"]
    assert retriever["reranks"] is True  # a request can still ask for the head
    assert retriever["rerank_by_default"] is False
    assert retriever["rerank_reason"] == GATE_SAYS_NO


@pytest.mark.slow
def test_a_head_bundle_exported_before_the_gate_still_reranks_by_default(
    make_settings, head_models, tmp_path, history
):
    from service.bundle import UNGATED_REASON
    from tests.service.conftest import with_gate

    models = with_gate(head_models, tmp_path / "ungated", None)
    with TestClient(create_app(make_settings(models_dir=models))) as client:
        body = client.post("/recommend", json={"history": history, "k": 5}).json()
        ready = client.get("/readyz").json()
    assert body["reranked"] is True
    assert ready["rerank"]["sasrec"] == {"by_default": True, "reason": UNGATED_REASON}


def test_a_bundle_without_a_head_says_so_and_never_reranks(reader, history):
    ready = reader.get("/readyz").json()
    assert ready["rerank"]["sasrec"]["by_default"] is False
    assert "no CTR head" in ready["rerank"]["sasrec"]["reason"]
    body = reader.post("/recommend", json={"history": history, "k": 5, "rerank": True}).json()
    assert body["reranked"] is False and len(body["items"]) == 5


@pytest.mark.slow
def test_the_answer_memo_keys_on_the_rerank_served_not_the_rerank_asked(
    make_settings, gated_off_models, history
):
    settings = make_settings(models_dir=gated_off_models, answer_ttl_seconds=30)
    request = {"history": history, "k": 10, "at": 1_700_000_000}
    with TestClient(create_app(settings)) as client:
        default = client.post("/recommend", json=request).json()
        # Asking for the head after the default answer must compute the rerank...
        asked = client.post("/recommend", json={**request, "rerank": True}).json()
        # ...while asking for what the default already served reuses that answer.
        same = client.post("/recommend", json={**request, "rerank": False}).json()
        again = client.post("/recommend", json={**request, "rerank": True}).json()
    assert default["cache"] != "answer" and default["reranked"] is False
    assert asked["cache"] != "answer" and asked["reranked"] is True
    assert same["cache"] == "answer" and same["items"] == default["items"]
    assert again["cache"] == "answer" and again["items"] == asked["items"]


@pytest.mark.parametrize("value", ["sometimes", 2, [True]])
def test_a_rerank_that_is_not_a_boolean_is_422_naming_it(reader, history, value):
    response = reader.post("/recommend", json={"history": history, "rerank": value})
    assert response.status_code == 422 and "body.rerank" in response.json()["detail"]
