"""Machine description, JSON results, the Markdown section of docs/benchmarks.md and its plot."""

from __future__ import annotations

import json
import os
import platform
import re
import sqlite3
import subprocess
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PAGE_INTRODUCTION = """# Benchmarks

Measured numbers of this service, each with the command that produced it and the machine it
ran on. Every section between `<!-- NAME:begin -->` and `<!-- NAME:end -->` is written by
its benchmark script and replaced when the script runs again. The text outside those markers
is written by hand. Numbers from different machines are not comparable.
"""
PACKAGES = ("sqlalchemy", "asyncpg", "aiosqlite", "procrastinate", "pgqueuer", "psycopg")


def describe_machine() -> dict[str, Any]:
    """Return the CPU count and model, RAM, load average and software versions of this host."""
    cpu_model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if found:
            cpu_model = found.group(1).strip()
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        found = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.MULTILINE)
        if found:
            memory_gib = round(int(found.group(1)) / 1024**2, 1)
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "packages": packages,
    }


def describe_source(repository: Path) -> dict[str, Any]:
    """Return the checked-out commit and whether app/ differs from it, or None where git fails.

    Only read-only git commands run here: ``git status`` could rewrite the index.
    """

    def git(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *arguments], cwd=repository, capture_output=True, text=True)

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("diff", "--quiet", "HEAD", "--", "app")
        untracked = git("ls-files", "--others", "--exclude-standard", "--", "app")
    except OSError:
        return {"commit": None, "app_has_uncommitted_changes": None}
    if commit.returncode != 0 or changed.returncode not in (0, 1) or untracked.returncode != 0:
        return {"commit": None, "app_has_uncommitted_changes": None}
    return {
        "commit": commit.stdout.strip(),
        "app_has_uncommitted_changes": changed.returncode == 1 or bool(untracked.stdout.strip()),
    }


def write_json(results: dict[str, Any], folder: Path, started_at: datetime) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"queue_throughput-{started_at:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def replace_section(page: Path, name: str, body: str) -> None:
    """Write ``body`` between the markers of section ``name``, creating the page or section if missing."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = page.read_text(encoding="utf-8") if page.exists() else PAGE_INTRODUCTION
    if begin in text and end in text:
        before, _, rest = text.partition(begin)
        _, _, after = rest.partition(end)
        text = before + section.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_results(
    throughput: list[tuple[str, float, str]],
    target_lines: list[tuple[str, float]],
    efficiency: list[tuple[str, float, bool]],
    efficiency_target_percent: float,
    latency_ms: float,
    path: Path,
) -> None:
    """Save a two-panel PNG: throughput bars with the target lines, and % of ideal per concurrency run.

    ``throughput`` contains (label, rate, kind) tuples, where kind is "product" or "reference".
    ``efficiency`` contains (label, percent, comparable) tuples, and the bars of runs that are
    not comparable with the ideal rate are hatched.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})

    labels = [label for label, _, _ in throughput]
    rates = [rate for _, rate, _ in throughput]
    colors = ["tab:blue" if kind == "product" else "tab:gray" for _, _, kind in throughput]
    bars = left.barh(labels, rates, color=colors)
    left.bar_label(bars, labels=[f"{rate:,.0f}" for rate in rates], padding=3, fontsize=8)
    left.set_xscale("log")
    left.set_xlim(min(rates) / 2, max(rates) * 4)
    left.invert_yaxis()
    for (label, value), style in zip(target_lines, ("--", ":"), strict=False):
        left.axvline(value, color="tab:red", linestyle=style, linewidth=1, label=f"{label}: {value:,.0f}")
    left.set_xlabel("tasks or jobs per second, log scale (zero-latency model, no-op jobs)")
    left.set_title("Orchestration throughput: product (blue) and reference queues (gray)", fontsize=10)
    if target_lines:
        left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)

    efficiency_labels = [label for label, _, _ in efficiency]
    percents = [percent for _, percent, _ in efficiency]
    bars = right.bar(efficiency_labels, percents, color="tab:blue")
    for bar, (_, _, comparable) in zip(bars, efficiency, strict=True):
        if not comparable:
            bar.set_hatch("//")
            bar.set_facecolor("white")
            bar.set_edgecolor("tab:blue")
    right.bar_label(
        bars,
        labels=[
            f"{percent:.0f} %" + ("" if comparable else "\nlimit\nnot kept")
            for _, percent, comparable in efficiency
        ],
        padding=2,
        fontsize=8,
    )
    right.axhline(
        efficiency_target_percent,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"target {efficiency_target_percent:g} %",
    )
    right.set_ylim(0, max([110.0, *percents]) * 1.25)
    right.set_ylabel("achieved / ideal tasks per second (%)")
    right.set_title(f"Concurrency efficiency, model sleeps {latency_ms:g} ms", fontsize=10)
    right.tick_params(axis="x", labelsize=8)
    right.legend(loc="upper left", fontsize=8)

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
