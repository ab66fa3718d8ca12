"""The ``deployment`` fixture: processes of one test on the test's database, stopped after it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.processes import Deployment


@pytest.fixture
def deployment(database_url: str, tmp_path: Path) -> Iterator[Deployment]:
    deployment = Deployment(database_url, tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop_all()
