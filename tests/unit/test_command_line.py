"""Unknown options and option prefixes are reported under the subcommand they follow."""

from __future__ import annotations

import pytest

from app.cli.__main__ import main as app_main
from app.training.cli import main as training_main


@pytest.mark.parametrize(
    ("main", "argv", "reported"),
    [
        (
            app_main,
            ["migrate", "--bogus"],
            "python -m app.cli migrate: error: unrecognized arguments: --bogus",
        ),
        (
            training_main,
            ["query", "docs", "text", "--bogus", "1"],
            "python -m app.training.cli query: error: unrecognized arguments: --bogus 1",
        ),
        (
            training_main,
            ["vector_db", "--status", "--bogus"],
            "python -m app.training.cli vector_db: error: unrecognized arguments: --bogus",
        ),
        (
            training_main,
            ["query", "docs", "text", "--top", "3"],
            "python -m app.training.cli query: error: unrecognized arguments: --top 3",
        ),
    ],
)
def test_unknown_option_names_subcommand(main, argv: list[str], reported: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)

    assert exited.value.code == 2
    assert reported in capsys.readouterr().err
