"""Options of ``vector_db`` that its chosen mode does not read are rejected, not ignored."""

from __future__ import annotations

import argparse

import pytest

from app.errors import ConfigError
from app.training import vector_db


def parse(*arguments: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vector_db.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["vector_db", *arguments])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--partition-indices", "--partitions", "4", "--replicas", "1"],
            "vector_db --partition-indices does not take --replicas; replicas come from vector_db.replicas",
        ),
        (["--partition-indices", "--instances", "a:1"], "does not take --instances"),
        (["--partition-indices", "--replicas", "0"], "does not take --replicas"),
        (["--status", "--partitions", "4", "--rollback"], "--status does not take --partitions, --rollback"),
        (
            ["--configure-scaling", "--knowledge-base", "peps"],
            "--configure-scaling does not take --knowledge-base",
        ),
    ],
)
def test_unused_option_rejected(arguments, message):
    with pytest.raises(ConfigError) as error:
        vector_db.check_options(parse(*arguments))

    assert message in str(error.value)


@pytest.mark.parametrize(
    "arguments",
    [
        ["--status"],
        ["--partition-indices", "--partitions", "2", "--knowledge-base", "peps", "--batch-size", "10"],
        ["--partition-indices", "--rollback"],
        ["--configure-scaling", "--instances", "a:1", "--partitions", "2", "--replicas", "0"],
    ],
)
def test_used_options_accepted(arguments):
    vector_db.check_options(parse(*arguments))
