"""The knowledge-base command line run as a separate process, as a user runs it, on a SQLite file."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_DOCUMENT_BYTES = 2048
# Each command that embeds loads the model first, which takes about 7 s on a 2-core machine.
CLI_TIMEOUT_SECONDS = 120

LEAVE = """\
# Leave

Every employee gets 25 days of paid annual leave a year. Days not taken expire at the end
of March of the next year.
"""
DEPLOY = "Deploy the billing service from the main branch only, during office hours.\n"
ONBOARDING = """\
Onboarding
==========

New starters get a laptop and a badge on their first morning, and meet their buddy at lunch.
"""
PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"


@dataclass(frozen=True)
class Workspace:
    environment: dict[str, str]
    database: Path
    documents: Path


def make_workspace(root: Path) -> Workspace:
    config = root / "config"
    config.mkdir()
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    database = root / "knowledge.db"
    environment = {
        **inherited,
        "TORONTO_AI_CONFIG_DIR": str(config),
        "TORONTO_AI_DATABASE__URL": f"sqlite:///{database}",
        "TORONTO_AI_KNOWLEDGE__MAX_DOCUMENT_BYTES": str(MAX_DOCUMENT_BYTES),
    }
    documents = root / "documents"
    documents.mkdir()
    return Workspace(environment, database, documents)


def run_cli(workspace: Workspace, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.training.cli", *arguments],
        cwd=REPO_ROOT,
        env=workspace.environment,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
    )


def skipped_lines(stderr: str) -> dict[str, str]:
    """Return the reason of each "skipped" line on stderr, by the file name it starts with."""
    reasons = {}
    for line in stderr.splitlines():
        if line.startswith("skipped "):
            path, _, reason = line.removeprefix("skipped ").partition(": ")
            reasons[Path(path).name] = reason
    return reasons


def stored_documents(database: Path) -> dict[str, str]:
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT source, status FROM documents"))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Workspace, subprocess.CompletedProcess[str]]:
    """A folder of three valid files and four bad ones, ingested once into "handbook"."""
    workspace = make_workspace(tmp_path_factory.mktemp("knowledge-cli"))
    documents = workspace.documents
    (documents / "leave.md").write_text(LEAVE, encoding="utf-8")
    (documents / "deploy.txt").write_text(DEPLOY, encoding="utf-8")
    (documents / "onboarding.rst").write_text(ONBOARDING, encoding="utf-8")
    (documents / "empty.md").write_bytes(b"")
    (documents / "diagram.md").write_bytes(PNG_BYTES)  # an image saved under a text name
    (documents / "photo.png").write_bytes(PNG_BYTES)  # not a supported suffix: ignored
    (documents / "menu.txt").write_bytes("Café menu: espresso, crème brûlée.\n".encode("latin-1"))
    (documents / "archive.md").write_text("x" * (MAX_DOCUMENT_BYTES + 100), encoding="utf-8")

    result = run_cli(workspace, "ingest", "handbook", str(documents), "--create")
    return workspace, result


def test_ingest_skips_bad_files_with_reason(ingested):
    workspace, result = ingested

    assert result.returncode == 1, result.stderr
    assert "handbook: 3 documents" in result.stdout
    assert "(0 failed, 4 files skipped)" in result.stdout
    reasons = skipped_lines(result.stderr)
    assert sorted(reasons) == ["archive.md", "diagram.md", "empty.md", "menu.txt"]
    assert reasons["empty.md"].startswith("document 'empty.md' is empty")
    assert reasons["diagram.md"].startswith("document 'diagram.md' looks like a binary file")
    assert reasons["menu.txt"].startswith("document 'menu.txt' is not valid UTF-8 (byte 0xe9")
    assert reasons["archive.md"].startswith(
        f"document 'archive.md' is {MAX_DOCUMENT_BYTES + 100} bytes, over the limit of {MAX_DOCUMENT_BYTES}"
    )
    assert "photo.png" not in result.stderr
    assert "Traceback" not in result.stderr


def test_status_shows_ingested_documents(ingested):
    workspace, _ = ingested

    result = run_cli(workspace, "status", "handbook")

    assert result.returncode == 0, result.stderr
    assert "model all-MiniLM-L6-v2 (384 dimensions)" in result.stdout
    assert "documents: 3 ready, 0 pending, 0 processing, 0 failed" in result.stdout
    # The status output has counts only, so the names are read from the database.
    assert stored_documents(workspace.database) == {
        "leave.md": "ready",
        "deploy.txt": "ready",
        "onboarding.rst": "ready",
    }


def test_query_prints_scored_results(ingested):
    workspace, _ = ingested

    result = run_cli(
        workspace, "query", "handbook", "How many days of holiday do I get a year?", "--top-k", "2"
    )

    assert result.returncode == 0, result.stderr
    ranked = re.findall(r"^(\d+)\. (-?\d\.\d{3})  (\S+)", result.stdout, re.MULTILINE)
    assert [rank for rank, _, _ in ranked] == ["1", "2"]
    assert ranked[0][2] == "leave.md"
    scores = [float(score) for _, score, _ in ranked]
    assert scores == sorted(scores, reverse=True)
    assert "25 days of paid annual leave" in result.stdout


@pytest.mark.parametrize("top_k", ["0", "10000"])
def test_query_top_k_out_of_range(ingested, top_k):
    workspace, _ = ingested

    result = run_cli(workspace, "query", "handbook", "leave", "--top-k", top_k)

    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"error: top_k: {top_k} is outside 1 to 100; ask for a number of results in that range, "
        "or raise knowledge.max_top_k"
    )


@pytest.mark.parametrize("command", [["query", "missing", "leave"], ["status", "missing"]])
def test_unknown_knowledge_base_is_one_line(ingested, command):
    workspace, _ = ingested

    result = run_cli(workspace, *command)

    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: knowledge base 'missing' not found")


def test_missing_path_creates_nothing(tmp_path):
    workspace = make_workspace(tmp_path)
    missing = workspace.documents / "nothing-here"

    ingested = run_cli(workspace, "ingest", "ghost", str(missing), "--create")
    status = run_cli(workspace, "status", "ghost")

    assert ingested.returncode == 2
    assert ingested.stderr.strip() == f"error: {missing}: no such file or folder"
    assert status.returncode != 0
    assert "knowledge base 'ghost' not found" in status.stderr
    assert "ingest ... --create" in status.stderr


@pytest.mark.parametrize("name", ["bad name", "Bad!", "x" * 65])
def test_create_rejects_an_invalid_name(ingested, name):
    workspace, _ = ingested

    result = run_cli(workspace, "create", name)

    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {name!r} is not a valid knowledge-base name")
    assert "not found" not in result.stderr


def test_file_name_not_utf8_is_skipped(tmp_path):
    workspace = make_workspace(tmp_path)
    (workspace.documents / "leave.md").write_text(LEAVE, encoding="utf-8")
    with open(os.fsencode(workspace.documents) + b"/caf\xe9.md", "wb") as file:
        file.write(b"Menu of the week.\n")

    result = run_cli(workspace, "ingest", "handbook", str(workspace.documents), "--create")

    assert result.returncode == 1, result.stderr
    assert stored_documents(workspace.database) == {"leave.md": "ready"}
    assert any(line.startswith("skipped ") and "caf" in line for line in result.stderr.splitlines())
