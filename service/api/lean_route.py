"""A FastAPI route for the hot path: one JSON body model and request-only dependencies.

FastAPI's per-request machinery (dependency solving with query-parameter parsing, an exit
stack, a second validation pass through its own model field) cost more of the event
loop's time than the whole pipeline's Python work of /recommend, and the event loop bounds
a worker's throughput. ``LeanRoute`` keeps what FastAPI gives the route (its OpenAPI
description, built from the endpoint's signature as usual, and the app's exception
handlers) and replaces only the per-request handling: the body is parsed and validated
by pydantic-core in one pass over the raw bytes, and each dependency, which must be a
coroutine taking only the ``Request``, is awaited directly. Errors come out as FastAPI's
do: a ``RequestValidationError`` with locations under ``body``.
"""

from __future__ import annotations

import inspect

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError


class LeanRoute(APIRoute):
    """See the module docstring; set it as ``route_class`` of a router."""

    def __init__(self, path: str, endpoint, **kwargs):
        super().__init__(path, endpoint, **kwargs)
        bodies = self.dependant.body_params
        if len(bodies) != 1 or not issubclass(bodies[0].field_info.annotation, BaseModel):
            raise TypeError(f"{path}: a LeanRoute endpoint takes exactly one pydantic body model")
        self._body_name = bodies[0].name
        self._body_model = bodies[0].field_info.annotation
        if (
            self.dependant.query_params
            or self.dependant.path_params
            or self.dependant.header_params
        ):
            raise TypeError(f"{path}: a LeanRoute endpoint takes no query, path or header params")
        self._dependencies = []
        for dependency in self.dependant.dependencies:
            call = dependency.call
            parameters = list(inspect.signature(call).parameters.values())
            if (
                not inspect.iscoroutinefunction(call)
                or dependency.dependencies
                or len(parameters) != 1
                or parameters[0].annotation not in (Request, "Request")
            ):
                raise TypeError(
                    f"{path}: LeanRoute dependencies must be coroutines of the Request alone, "
                    f"not {call.__name__}"
                )
            self._dependencies.append((dependency.name, call))

    def get_route_handler(self):
        async def handler(request: Request):
            try:
                body = self._body_model.model_validate_json(await request.body())
            except ValidationError as exc:
                errors = exc.errors(include_url=False)
                for error in errors:
                    error["loc"] = ("body", *error["loc"])
                raise RequestValidationError(errors) from None
            values = {name: await call(request) for name, call in self._dependencies}
            return await self.endpoint(**{self._body_name: body}, **values)

        return handler
