"""Raise database driver errors as the SQLAlchemy exceptions the engine would raise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import exc

# Pairs of a driver's exception class and the SQLAlchemy class it becomes, most specific first.
ErrorTranslations = tuple[tuple[type[Exception], type[exc.DBAPIError]], ...]


@contextmanager
def sqlalchemy_errors(statement: str, arguments: Any, translations: ErrorTranslations) -> Iterator[None]:
    """Raise a driver error of ``statement`` as the first SQLAlchemy class ``translations`` pairs it with.

    Statements sent to the driver directly then fail with the exceptions that callers
    already catch for statements sent through SQLAlchemy.
    """
    try:
        yield
    except tuple(driver_error for driver_error, _ in translations) as error:
        for driver_error, sqlalchemy_error in translations:
            if isinstance(error, driver_error):
                raise sqlalchemy_error(statement, arguments, error) from error
        raise
