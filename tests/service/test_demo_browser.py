"""The demo page in a real browser (headless chromium, Selenium) against a real server.

The page is served by ``python -m service.serve`` over loopback with a bundle of two
retrievers, each with a CTR head. What the page shows must be what the API answers.
"""

from __future__ import annotations

import httpx
import pytest

from tests.browser import (
    build_history,
    chromium,
    column_items,
    columns_ready,
    missing_browser,
    wait_for,
)
from tests.servers import UvicornService
from tests.service.conftest import delete_prefix, server_settings

pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))


def api_answer(server, column, history: list[dict], **extra) -> dict:
    """What /recommend answers to the request a result column of the page made: the same
    history, encoder, k and request time (the CTR head's recency features measure to it),
    plus ``extra`` fields."""
    return httpx.post(
        f"{server.url}/recommend",
        json={
            "history": history,
            "k": 10,
            "encoder": column.get_attribute("data-encoder"),
            "at": int(column.get_attribute("data-at")),
            **extra,
        },
    ).json()


@pytest.fixture(scope="module")
def server(two_retriever_models, tmp_path_factory, shared_redis):
    prefix = "demo-browser"
    log = tmp_path_factory.mktemp("demo") / "uvicorn.log"
    service = UvicornService(server_settings(two_retriever_models, prefix), log_path=log)
    service.start()
    try:
        yield service
    finally:
        service.stop()
        delete_prefix(shared_redis, prefix)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def test_recommendations_for_three_clicked_items_match_the_api(server, browser):
    history = build_history(browser, server.url, "item 1", clicks=3)
    assert len({event["item_id"] for event in history}) == 3

    columns = columns_ready(browser, "recommendations")
    encoders = [column.get_attribute("data-encoder") for column in columns]
    assert encoders == ["sasrec", "two_tower"]
    for column in columns:
        assert column.get_attribute("data-state") == "ready", column.text
        shown = column_items(column)
        # The page leaves rerank to the bundle (whose heads rerank by default here).
        answer = api_answer(server, column, history)
        assert answer["reranked"] is True
        assert shown == [item["item_id"] for item in answer["items"]]
        assert len(shown) == 10
        # Titles, both scores, the move the rerank made, the cache and the timings.
        first = column.find_element("css selector", "tbody tr")
        cells = [cell.text for cell in first.find_elements("tag name", "td")]
        assert cells[1].startswith(answer["items"][0]["title"])
        assert cells[2] == f"{answer['items'][0]['retrieval_score']:.3f}"
        assert cells[3] == f"{answer['items'][0]['score']:.3f}"
        moved = answer["items"][0]["retrieval_rank"] - 1  # places the rerank lifted it
        assert cells[4] == (f"▲{moved}" if moved else "=")
        assert "reranked" in column.text and "cache " in column.text
        badge = column.find_element("css selector", ".badge")
        assert badge.text == "CTR head · rerank on by default"
        assert badge.get_attribute("title").startswith("set on at export")
        assert "total" in column.find_element("css selector", ".timings").text
    assert not browser.find_element("id", "error").is_displayed()


def test_the_rerank_option_can_ask_for_retrieval_order(server, browser):
    from selenium.webdriver.support.ui import Select

    history = build_history(browser, server.url, "item 1", clicks=2)
    browser.find_element("css selector", "#options summary").click()
    Select(browser.find_element("id", "rerank")).select_by_value("off")

    def answered_in_retrieval_order(driver):
        columns = columns_ready(driver, "recommendations")
        if columns and all("retrieval order" in column.text for column in columns):
            return columns
        return None

    columns = wait_for(browser, answered_in_retrieval_order, what="answers without the rerank")
    for column in columns:
        answer = api_answer(server, column, history, rerank=False)
        assert answer["reranked"] is False
        assert column_items(column) == [item["item_id"] for item in answer["items"]]


def test_similar_items_match_the_api(server, browser):
    build_history(browser, server.url, "item 2", clicks=1)
    row = browser.find_element("css selector", "#search-results li")
    item_id = row.get_attribute("data-item-id")
    row.find_element("css selector", "button.similar").click()
    columns = wait_for(browser, lambda d: columns_ready(d, "similar"), what="similar items")
    for column in columns:
        encoder = column.get_attribute("data-encoder")
        answer = httpx.get(
            f"{server.url}/items/{item_id}/similar", params={"k": 10, "encoder": encoder}
        ).json()
        assert column_items(column) == [item["item_id"] for item in answer["items"]]


def test_a_refused_request_shows_the_servers_error(server, browser):
    browser.get(f"{server.url}/demo/")
    wait_for(browser, lambda d: d.find_element("id", "bundle").text.startswith("bundle "))
    wait_for(browser, lambda d: d.find_elements("css selector", "#search-results li"))
    browser.find_element("css selector", "#options summary").click()
    k = browser.find_element("id", "k")
    k.clear()
    k.send_keys("0")
    browser.find_element("css selector", "#search-results li button.add").click()
    columns = wait_for(browser, lambda d: columns_ready(d, "recommendations"), what="answers")
    assert {column.get_attribute("data-state") for column in columns} == {"error"}
    banner = browser.find_element("id", "error")
    assert banner.is_displayed()
    # The API's own message, naming the field.
    assert "422" in banner.text and "body.k" in banner.text, banner.text


def test_a_category_filter_is_applied_as_the_api_applies_it(server, browser):
    from selenium.webdriver.support.ui import Select

    history = build_history(browser, server.url, "item 3", clicks=2)
    choice = Select(browser.find_element("id", "include-category"))
    category = choice.options[1].get_attribute("value")  # the largest category
    choice.select_by_value(category)
    # Columns replaced for the new filter (each says the filter it asked with), answered.
    columns = wait_for(
        browser,
        lambda d: (
            (c := columns_ready(d, "recommendations"))
            and all(category in column.get_attribute("data-filter") for column in c)
            and c
        ),
        what="filtered recommendations",
    )
    for column in columns:
        answer = api_answer(server, column, history, filter={"include_categories": [category]})
        assert column_items(column) == [item["item_id"] for item in answer["items"]]
        assert answer["filtered"] > 0 and f"filter removed {answer['filtered']}" in column.text
        for item_id in column_items(column):
            (found,) = httpx.get(f"{server.url}/items", params={"q": item_id, "limit": 1}).json()[
                "items"
            ]
            assert category in found["genres"]
