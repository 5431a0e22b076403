"""The demo page: the static HTML, CSS and JavaScript of service/demo/ under /demo/, and
/ leading there (``RECSERVE_DEMO_ENABLED=0`` removes both).

The page is a client of the public API like any other (GET /bundle, GET /items,
POST /recommend, GET /items/{id}/similar): it holds no privileges and no build step.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

PREFIX = "/demo/"
FILES = Path(__file__).resolve().parents[2] / "demo"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse(PREFIX, status_code=307)


def install(app: FastAPI) -> None:
    """Serve the page's files under ``PREFIX`` (index.html for the folder itself)."""
    app.include_router(router)
    app.mount(PREFIX.rstrip("/"), StaticFiles(directory=FILES, html=True), name="demo")
