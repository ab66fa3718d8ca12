"""Serve reads of finished projects from the shared cache before routing.

A finished project never changes, so ``read_project`` caches its JSON as bytes. Reading a
project is the API's hottest request, and on a hit the bytes are ready at once: the cost
is what surrounds them. Measured in process, routing, dependency resolution and the
middleware below this one took about 110 of the 190 microseconds of a cached read, so this
middleware serves such a read before any of them runs.

It sits inside ``RequestContextMiddleware``, so the request still gets its id, its log line
and its metrics, and it checks the API key exactly as the route does. Anything it cannot
serve (a miss, another path or method, a rejected key) goes on to the application
unchanged, and the application writes every error response.
"""

from __future__ import annotations

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import api_key_problem
from app.cache import CacheKind
from app.db import projects as store
from app.runtime import Runtime

PROJECTS_PREFIX = "/api/v1/projects/"
JSON_HEADERS = [(b"content-type", b"application/json")]


class CachedProjectReads:
    def __init__(self, app: ASGIApp, route: BaseRoute) -> None:
        self.app = app
        # Set as the scope's route so that metrics label these reads with the route's path
        # template, the same label as reads that reach the route.
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        project_id = _project_id(scope)
        if project_id is None:
            await self.app(scope, receive, send)
            return

        runtime: Runtime = scope["app"].state.runtime
        body = await runtime.shared_cache.get(CacheKind.PROJECT, project_id)
        if body is None or await api_key_problem(runtime, _authorization(scope)) is not None:
            await self.app(scope, receive, send)
            return

        scope["route"] = self.route
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _project_id(scope: Scope) -> str | None:
    """Return the id of a ``GET /api/v1/projects/{id}`` request, or None for any other request."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    path: str = scope["path"]
    if not path.startswith(PROJECTS_PREFIX):
        return None
    project_id = path[len(PROJECTS_PREFIX) :]
    return project_id if store.is_id(project_id) else None


def _authorization(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value.decode("latin-1")
    return ""
