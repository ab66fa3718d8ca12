"""Fixtures of the integration tests: the API in process, with or without a worker."""

import pytest

from tests.conftest import make_settings
from tests.integration.api_client import open_client
from tests.integration.helpers import FAST_WORKER


@pytest.fixture
async def api(database_url, tmp_path):
    settings = make_settings(
        database_url,
        tmp_path,
        TORONTO_AI_API__MAX_BRIEF_CHARS="500",
        TORONTO_AI_API__MAX_BODY_BYTES="4096",
        **FAST_WORKER,
    )
    app, lifespan, client = await open_client(settings, embedded_worker=True)
    yield client
    await client.aclose()
    await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def api_without_worker(database_url, tmp_path):
    app, lifespan, client = await open_client(make_settings(database_url, tmp_path), embedded_worker=False)
    yield client
    await client.aclose()
    await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def sqlite_client(tmp_path):
    """The API on one SQLite file, for behaviour that is the same on every engine."""
    app, lifespan, client = await open_client(
        make_settings(f"sqlite:///{tmp_path / 'app.db'}", tmp_path), embedded_worker=False
    )
    yield client
    await client.aclose()
    await lifespan.__aexit__(None, None, None)
