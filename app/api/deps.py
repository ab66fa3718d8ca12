"""Typed dependencies of the route handlers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from app.api.auth import is_valid_key
from app.core.config import Settings
from app.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    # A coroutine, because FastAPI runs a plain function dependency in its thread pool, and
    # that hop costs more than a cached read itself.
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings(request: Request) -> Settings:
    return request.app.state.runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


MISSING_KEY = (
    "missing API key: send `Authorization: Bearer <key>`; create a key with "
    "`python -m app.cli create-api-key --name NAME`"
)
NOT_BEARER = (
    "invalid Authorization header: send the key with the Bearer scheme, `Authorization: Bearer <key>`"
)
INVALID_KEY = (
    "invalid or revoked API key; create a new one with `python -m app.cli create-api-key --name NAME`"
)


async def api_key_problem(runtime: Runtime, authorization: str) -> str | None:
    """Return why a request with this ``Authorization`` header is refused, or None.

    Production requires a valid ``Bearer`` key; other environments are open.
    """
    if not runtime.settings.is_production:
        return None

    scheme, _, key = authorization.partition(" ")
    if not authorization.strip():
        return MISSING_KEY
    if scheme.lower() != "bearer" or not key.strip():
        return NOT_BEARER
    async with runtime.database.read() as connection:
        valid = await is_valid_key(connection, key.strip())
    return None if valid else INVALID_KEY


async def require_api_key(request: Request) -> None:
    problem = await api_key_problem(request.app.state.runtime, request.headers.get("authorization", ""))
    if problem is not None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, problem, headers={"WWW-Authenticate": "Bearer"})
