"""The README's first command, ``python -m app.cli demo``, run as a user runs it, on a SQLite file."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The run with a knowledge base loads the embedding model and embeds 7 PEPs: about 30 s on
# a 2-core machine.
DEMO_TIMEOUT_SECONDS = 300


def run_demo(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    environment["TORONTO_AI_CONFIG_DIR"] = str(config)
    environment["TORONTO_AI_DATABASE__URL"] = f"sqlite:///{tmp_path / 'demo.db'}"
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", *arguments],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
    )


def test_demo_shows_progress_and_report(tmp_path):
    result = run_demo(tmp_path, "--no-knowledge")

    assert result.returncode == 0, result.stderr
    planned = re.search(r"plan accepted: (\d+) tasks", result.stdout)
    assert planned, result.stdout
    total = int(planned[1])
    counters = re.findall(r"finished  .*  \[(\d+)/(\d+)\]", result.stdout)
    # Every task of the plan, the report included, counted once in order; planning is not.
    assert counters == [(str(number), str(total)) for number in range(1, total + 1)]
    assert re.search(r"finished  PLAN \(project_manager\)$", result.stdout, re.MULTILINE)
    assert "project completed" in result.stdout
    assert "# Final report" in result.stdout


def test_demo_report_cites_several_documents(tmp_path):
    result = run_demo(tmp_path)

    assert result.returncode == 0, result.stderr
    assert "Knowledge base python-peps: 7 documents" in result.stdout
    assert "Loading the embedding model for the first document..." in result.stdout
    sources = result.stdout.rpartition("### Sources")[2]
    cited = set(re.findall(r"^- \[\d+\] (pep-\d+\.rst),", sources, re.MULTILINE))
    # The report carries the passages behind its tasks, which each draw on their own part
    # of the brief, so it cites more than the one PEP that the brief's opening matches.
    assert len(cited) >= 3, sources


def test_demo_missing_folder_creates_nothing(tmp_path):
    missing = tmp_path / "no-such-folder"

    result = run_demo(tmp_path, "--knowledge", str(missing))

    assert result.returncode == 1
    assert f"error: --knowledge {missing}: no such file or folder" in result.stderr
    with sqlite3.connect(tmp_path / "demo.db") as database:
        assert database.execute("SELECT count(*) FROM knowledge_bases").fetchone() == (0,)
