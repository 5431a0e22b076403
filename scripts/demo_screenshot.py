"""Take the README's screenshot of the demo page from the real page.

    .venv/bin/python scripts/demo_screenshot.py --models-dir models --out docs/demo.png

Starts ``python -m service.serve`` on a free port with the bundle in ``--models-dir``
(Redis at RECSERVE_REDIS_URL, default 127.0.0.1:6379, under a key prefix of its own),
opens the page in headless chromium, searches the catalogue, clicks items into a history,
waits for every retriever's answer, opens "similar" for one item and saves a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import build_history, chromium, columns_ready, wait_for  # noqa: E402
from tests.servers import UvicornService  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "demo.png")
    parser.add_argument("--query", default="", help="what to search (default: popular items)")
    parser.add_argument("--clicks", type=int, default=3, help="search results to add")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1150)
    args = parser.parse_args()

    prefix = f"screenshot-{uuid.uuid4().hex[:8]}"
    settings = {
        "RECSERVE_MODELS_DIR": str(args.models_dir.resolve()),
        "RECSERVE_REDIS_URL": os.environ.get("RECSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "RECSERVE_KEY_PREFIX": prefix,
        "RECSERVE_DEV_MODE": "1",
        "RECSERVE_RELOAD_POLL_SECONDS": "0",
        "RECSERVE_DEVICE": "cpu",
    }
    log = Path(tempfile.mkdtemp()) / "uvicorn.log"
    server = UvicornService(settings, log_path=log)
    server.start()
    driver = chromium(args.width, args.height)
    try:
        build_history(driver, server.url, args.query, clicks=args.clicks)
        # "Similar" for the most recent event: the second panel of the page.
        last = driver.find_elements("css selector", "#search-results li")[args.clicks - 1]
        last.find_element("css selector", "button.similar").click()
        wait_for(driver, lambda d: columns_ready(d, "similar"), what="similar items")
        driver.execute_script("window.scrollTo(0, 0)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
        server.stop()
    print(f"wrote {args.out} ({args.width}x{args.height}) from {server.url} (log {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
