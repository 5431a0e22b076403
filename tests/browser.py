"""A real browser for the demo page: Debian's chromium driven by Selenium (headless).

Used by the browser tests (tests/service/test_demo_browser.py) and by
scripts/demo_screenshot.py, which takes the README's screenshot from the real page.
``scripts/test.sh`` installs chromium and chromium-driver where apt can; elsewhere the
tests skip with the reason ``missing_browser`` gives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = os.environ.get("RECSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RECSERVE_CHROMEDRIVER", "/usr/bin/chromedriver")


def missing_browser() -> str | None:
    """Why no browser can be driven here, or None when one can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).exists() or shutil.which(path)):
            return f"{path} not found: install Debian's {package} (scripts/test.sh does, as root)"
    return None


def chromium(width: int = 1400, height: int = 1000):
    """A headless chromium WebDriver with a window of ``width`` x ``height`` pixels."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        # The tests may run as root, in a container without a user namespace.
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(driver, condition, timeout: float = 20.0, what: str = "the page"):
    """Wait until ``condition(driver)`` is truthy; return it (TimeoutError naming ``what``,
    with the page's error banner, on timeout)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        banner = driver.find_element("id", "error").text
        raise TimeoutError(f"timed out waiting for {what} (error banner: {banner!r})") from None


def columns_ready(driver, panel: str) -> list | None:
    """The result columns in ``panel`` ("recommendations" or "similar") once every one has
    answered (none loading); None while any is still waiting."""
    columns = driver.find_elements("css selector", f"#{panel} [data-encoder]")
    if columns and all(c.get_attribute("data-state") in ("ready", "error") for c in columns):
        return columns
    return None


def column_items(column) -> list[str]:
    """The item ids a result column shows, in order."""
    return [
        row.get_attribute("data-item-id")
        for row in column.find_elements("css selector", "tbody tr[data-item-id]")
    ]


def build_history(driver, base_url: str, query: str, clicks: int) -> list[dict]:
    """Open the demo page, search the catalogue for ``query``, add the first ``clicks``
    results to the history, wait for every retriever's answer; the history as sent."""
    driver.get(f"{base_url}/")
    wait_for(driver, lambda d: d.find_element("id", "bundle").text.startswith("bundle "))
    # A blank query lists the most popular items; the page shows them on load.
    status = "shown" if query.strip() else "most popular items"
    driver.find_element("id", "search").send_keys(query)
    wait_for(
        driver,
        lambda d: d.find_element("id", "search-status").text.endswith(status),
        what=f"search results for {query!r}",
    )
    for row in driver.find_elements("css selector", "#search-results li")[:clicks]:
        row.find_element("css selector", "button.add").click()
    wait_for(
        driver,
        lambda d: len(d.find_elements("css selector", "#history li")) == clicks,
        what=f"{clicks} events in the history",
    )
    wait_for(driver, lambda d: columns_ready(d, "recommendations"), what="the recommendations")
    return [
        {"item_id": li.get_attribute("data-item-id"), "ts": int(li.get_attribute("data-ts"))}
        for li in driver.find_elements("css selector", "#history li")
    ]
