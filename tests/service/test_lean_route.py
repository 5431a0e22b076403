"""LeanRoute: FastAPI's description of a route, a lighter per-request path."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from service.api.lean_route import LeanRoute


class Body(BaseModel):
    name: str
    count: int = Field(1, ge=1)


async def tag(request: Request) -> str:
    return request.headers.get("x-tag", "none")


Tag = Annotated[str, Depends(tag)]


def app_with(endpoint) -> TestClient:
    router = APIRouter(route_class=LeanRoute)
    router.post("/echo")(endpoint)
    app = FastAPI()
    app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return JSONResponse({"locs": [list(e["loc"]) for e in exc.errors()]}, 422)

    return TestClient(app)


async def echo(body: Body, label: Tag) -> dict:
    return JSONResponse({"name": body.name, "count": body.count, "tag": label})


def test_the_body_is_validated_and_request_dependencies_are_awaited():
    client = app_with(echo)
    answer = client.post("/echo", json={"name": "a", "count": 3}, headers={"x-tag": "t"})
    assert answer.json() == {"name": "a", "count": 3, "tag": "t"}


@pytest.mark.parametrize(
    ("content", "loc"),
    [
        (b'{"name": "a", "count": 0}', ["body", "count"]),
        (b'{"count": 2}', ["body", "name"]),
        (b"[1, 2]", ["body"]),
        (b"{not json", ["body"]),
        (b"", ["body"]),
        (b'{"name": "\xff"}', ["body"]),
    ],
)
def test_invalid_bodies_are_validation_errors_located_under_body(content, loc):
    answer = app_with(echo).post("/echo", content=content)
    assert answer.status_code == 422 and answer.json()["locs"][0] == loc


def test_the_openapi_description_is_fastapis():
    schema = app_with(echo).get("/openapi.json").json()
    body = schema["paths"]["/echo"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/Body")


async def with_query(body: Body, page: int = 1) -> dict:
    return {}


async def nested_dependency(label: Tag) -> str:
    return label


async def with_nested(body: Body, value: Annotated[str, Depends(nested_dependency)]) -> dict:
    return {}


async def without_body(label: Tag) -> dict:
    return {}


@pytest.mark.parametrize("endpoint", [with_query, with_nested, without_body])
def test_endpoints_it_cannot_serve_faithfully_are_refused_at_start(endpoint):
    with pytest.raises(TypeError, match="LeanRoute"):
        app_with(endpoint)
