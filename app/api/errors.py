"""Mapping of service errors to HTTP responses with a message that says what to fix."""

from __future__ import annotations

import difflib
import logging

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from app.errors import (
    ConflictError,
    DatabaseUnavailableError,
    InvalidInputError,
    NotFoundError,
    VectorStoreError,
)

logger = logging.getLogger(__name__)


def _field(location: tuple) -> str:
    return ".".join(str(part) for part in location)


def _body_fields(request: Request) -> list[str]:
    """Return the top-level fields the route's body model accepts, or [] if it has none."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(body_field, "field_info", None), "annotation", None)
    return sorted(getattr(model, "model_fields", {}))


def _message(request: Request, error: dict) -> str:
    """Return pydantic's message for one error, with the fix where pydantic gives none."""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "JSON decode error")
        return f"the body is not valid JSON ({reason}); send a JSON object"
    if error["type"] == "extra_forbidden" and error["loc"][:1] == ("body",) and len(error["loc"]) == 2:
        accepted = _body_fields(request)
        if accepted:
            close = difflib.get_close_matches(str(error["loc"][1]), accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"unknown field; accepted fields: {', '.join(accepted)}{hint}"
    if error["type"] in ("model_attributes_type", "dict_type") and error["loc"] == ("body",):
        content_type = request.headers.get("content-type", "none")
        if not content_type.startswith("application/json"):
            return (
                f"the body must be a JSON object sent with Content-Type: application/json, not {content_type}"
            )
        return "the body must be a JSON object"
    return message


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"field": _field(error["loc"]), "message": _message(request, error), "type": error["type"]}
        for error in exc.errors()
    ]
    summary = "; ".join(f"{error['field']}: {error['message']}" for error in errors)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": f"invalid request: {summary}", "errors": errors},
    )


async def not_found(request: Request, exc: NotFoundError) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_404_NOT_FOUND, content={"detail": str(exc)})


async def conflict(request: Request, exc: ConflictError) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_409_CONFLICT, content={"detail": str(exc)})


async def invalid_input(request: Request, exc: InvalidInputError) -> JSONResponse:
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_ENTITY, content={"detail": str(exc)})


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.error("database unavailable: %s", exc, extra={"action": "http.database_unavailable"})
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": "the database is unavailable; retry shortly"},
        headers={"Retry-After": "5"},
    )


async def vector_store_error(request: Request, exc: VectorStoreError) -> JSONResponse:
    # The message names the Chroma server or the command to run; neither is a secret.
    logger.error("vector store error: %s", exc, extra={"action": "http.vector_store_error"})
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": str(exc)},
        headers={"Retry-After": "5"},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(NotFoundError, not_found)
    app.add_exception_handler(ConflictError, conflict)
    app.add_exception_handler(InvalidInputError, invalid_input)
    # A lost or refused connection is the database's outage, not the client's error.
    app.add_exception_handler(OperationalError, database_unavailable)
    app.add_exception_handler(InterfaceError, database_unavailable)
    app.add_exception_handler(DatabaseUnavailableError, database_unavailable)
    app.add_exception_handler(ConnectionError, database_unavailable)
    app.add_exception_handler(VectorStoreError, vector_store_error)
