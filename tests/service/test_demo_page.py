"""The demo page's files and their headers (the page itself: test_demo_browser.py)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.main import create_app


def test_the_root_leads_to_the_demo_page(reader):
    response = reader.get("/", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/demo/"


def test_the_page_and_its_files_are_served_from_the_package(reader):
    page = reader.get("/demo/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, kind in (("demo.js", "javascript"), ("demo.css", "text/css")):
        assert f'"{asset}"' in page.text
        response = reader.get(f"/demo/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_the_page_may_load_only_its_own_files_and_call_only_this_origin(reader):
    policy = reader.get("/demo/").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe" not in policy and "http" not in policy
    # The API keeps its own, stricter policy.
    api = reader.get("/healthz").headers["content-security-policy"]
    assert api == "default-src 'none'; frame-ancestors 'none'"


def test_the_page_needs_nothing_from_outside(reader):
    for asset in ("", "demo.js", "demo.css"):
        text = reader.get(f"/demo/{asset}").text
        assert "http://" not in text and "https://" not in text, asset


def test_a_file_outside_the_page_folder_is_not_served(reader):
    assert reader.get("/demo/../settings.py").status_code == 404
    assert reader.get("/demo/%2e%2e/settings.py").status_code == 404


def test_the_demo_can_be_switched_off(make_settings):
    with TestClient(create_app(make_settings(demo_enabled=False))) as client:
        assert client.get("/", follow_redirects=False).status_code == 404
        assert client.get("/demo/").status_code == 404
        assert client.get("/healthz").status_code == 200
