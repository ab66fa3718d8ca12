"""The API key commands of ``python -m app.cli``: create, list and revoke."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli.__main__ import main


@pytest.fixture
def cli_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORONTO_AI_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("TORONTO_AI_DATABASE__URL", f"sqlite:///{tmp_path / 'keys.db'}")
    assert main(["migrate"]) in (0, None)


def create_key(capsys: pytest.CaptureFixture[str], name: str) -> str:
    assert main(["create-api-key", "--name", name]) in (0, None)
    return capsys.readouterr().out.strip()


def listed_rows(capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["list-api-keys"]) in (0, None)
    return capsys.readouterr().out.splitlines()[1:]


def test_list_hides_the_key(cli_database: None, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    key = create_key(capsys, "ci pipeline")

    rows = listed_rows(capsys)

    assert len(rows) == 1
    assert rows[0].startswith(key[:8])
    assert "active" in rows[0]
    assert rows[0].endswith("ci pipeline")
    assert key not in rows[0]


def test_revoke_by_whole_key_leaves_other_keys_active(
    cli_database: None, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    first = create_key(capsys, "first")
    create_key(capsys, "second")

    assert main(["revoke-api-key", first]) == 0
    assert "revoked 1 key(s)" in capsys.readouterr().out

    statuses = {row.split()[-1]: row for row in listed_rows(capsys)}
    assert "revoked" in statuses["first"]
    assert "active" in statuses["second"]


def test_revoke_by_prefix(cli_database: None, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    key = create_key(capsys, "by prefix")

    assert main(["revoke-api-key", key[:8]]) == 0
    assert main(["revoke-api-key", key[:8]]) == 1
    assert "no active API key matches" in capsys.readouterr().err


def test_revoke_rejects_partial_key(cli_database: None, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    key = create_key(capsys, "kept")

    assert main(["revoke-api-key", key[:10]]) == 2
    error = capsys.readouterr().err
    assert key[:10] in error
    assert "list-api-keys" in error
    assert "active" in listed_rows(capsys)[0]


def test_control_characters_in_name_rejected(cli_database: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["create-api-key", "--name", "ci\x1b[2Jpipeline"])

    assert exit_info.value.code == 2
    assert "control characters" in capsys.readouterr().err
    assert listed_rows(capsys) == []
