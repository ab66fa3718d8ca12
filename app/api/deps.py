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


async def require_api_key(request: Request) -> None:
    """Check ``Authorization: Bearer <key>`` in production; other environments are open."""
    runtime: Runtime = request.app.state.runtime
    if not runtime.settings.is_production:
        return

    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send `Authorization: Bearer <key>`; create a key with "
            "`python -m app.cli create-api-key --name NAME`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    async with runtime.database.read() as connection:
        valid = await is_valid_key(connection, key.strip())
    if not valid:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked API key; create a new one with `python -m app.cli create-api-key --name NAME`",
            headers={"WWW-Authenticate": "Bearer"},
        )
