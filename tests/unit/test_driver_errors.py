"""Driver errors come out as the SQLAlchemy exceptions the engine would raise."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import exc

from app.db.driver_errors import sqlalchemy_errors

TRANSLATIONS = ((sqlite3.IntegrityError, exc.IntegrityError), (sqlite3.Error, exc.DBAPIError))


def test_specific_error_translated_first() -> None:
    with pytest.raises(exc.IntegrityError) as raised, sqlalchemy_errors("INSERT", (1,), TRANSLATIONS):
        raise sqlite3.IntegrityError("UNIQUE constraint failed")

    assert isinstance(raised.value.orig, sqlite3.IntegrityError)
    assert raised.value.statement == "INSERT"


def test_general_driver_error_translated() -> None:
    with pytest.raises(exc.DBAPIError) as raised, sqlalchemy_errors("SELECT", (), TRANSLATIONS):
        raise sqlite3.OperationalError("database is locked")

    assert not isinstance(raised.value, exc.IntegrityError)


def test_other_errors_pass_through() -> None:
    with pytest.raises(ValueError), sqlalchemy_errors("SELECT", (), TRANSLATIONS):
        raise ValueError("not from the driver")
