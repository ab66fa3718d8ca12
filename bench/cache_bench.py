"""Benchmark the cache: a model-bound project repeated with the cache off and on, and
knowledge-base queries with and without the cache, on each cache backend.

    python -m bench.cache_bench [--latency-ms 300] [--repeats 3] [--queries 40]

The project part runs one worker in this process on a temporary SQLite file, with the
offline model sleeping ``--latency-ms`` per call, and submits the same brief ``--repeats``
times per configuration: the cache off (the peer every other row is measured against), in
process memory, a standalone Redis, and a three-master Redis Cluster. The knowledge part
ingests the PEP corpus in ``examples/knowledge/python-peps`` and asks ``--queries``
questions twice per backend: the first pass fills the cache, the second reads it.

The Redis servers are started by ``scripts/services/redis.sh`` on ``--redis-port`` and the
three ports after it, and stopped at the end. Results go to bench/results/ as JSON and,
unless ``--no-docs``, to the ``cache`` section of docs/benchmarks.md with a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select

from app.db import projects as project_store
from app.db.models import Chunk, llm_calls
from app.db.states import FINAL_PROJECT_STATUSES
from app.runtime import Runtime
from app.training.cli import ingest
from app.worker.runner import Worker
from bench.product_runs import load_benchmark_settings
from bench.report import describe_machine, describe_source, markdown_table, replace_section

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FOLDER = REPOSITORY_ROOT / "bench" / "results"
DOCS_PAGE = REPOSITORY_ROOT / "docs" / "benchmarks.md"
PLOT_PATH = REPOSITORY_ROOT / "docs" / "images" / "cache_bench.png"
REDIS_SCRIPT = REPOSITORY_ROOT / "scripts" / "services" / "redis.sh"
CORPUS = REPOSITORY_ROOT / "examples" / "knowledge" / "python-peps"
BRIEF = (REPOSITORY_ROOT / "examples" / "briefs" / "invoice-reminders.md").read_text(encoding="utf-8")
BACKENDS = ("off", "memory", "redis", "redis_cluster")
PROJECT_TIMEOUT_SECONDS = 300


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cache_bench",
        description="Measure the cache: a repeated model-bound project, and knowledge queries, per backend.",
    )
    parser.add_argument("--latency-ms", type=float, default=300, help="offline model latency per call (ms)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the same brief per configuration")
    parser.add_argument("--queries", type=int, default=40, help="distinct knowledge-base questions")
    parser.add_argument(
        "--redis-port", type=int, default=46380, help="standalone Redis port; the cluster uses the next three"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    arguments = parser.parse_args(argv)
    if arguments.repeats < 2:
        parser.error(f"--repeats must be at least 2 to measure cached runs, got {arguments.repeats}")
    if arguments.queries < 1:
        parser.error(f"--queries must be at least 1, got {arguments.queries}")
    return arguments


def backend_environment(backend: str, redis_port: int, key_prefix: str) -> dict[str, str]:
    environment = {"TORONTO_AI_CACHING__KEY_PREFIX": key_prefix}
    if backend == "off":
        environment["TORONTO_AI_CACHING__ENABLED"] = "false"
        environment["TORONTO_AI_KNOWLEDGE__QUERY_CACHE_ENTRIES"] = "0"
    elif backend == "redis":
        environment["TORONTO_AI_CACHING__PROVIDER"] = "redis"
        environment["TORONTO_AI_CACHING__REDIS_PORT"] = str(redis_port)
    elif backend == "redis_cluster":
        nodes = [{"host": "127.0.0.1", "port": redis_port + offset} for offset in (1, 2, 3)]
        environment["TORONTO_AI_DISTRIBUTED_CACHE__ENABLED"] = "true"
        environment["TORONTO_AI_DISTRIBUTED_CACHE__NODES"] = json.dumps(nodes)
    return environment


async def run_projects(database_url: str, backend: str, arguments: argparse.Namespace) -> dict[str, Any]:
    """Run the brief ``repeats`` times on one runtime; return each run's time, calls and cache hits."""
    environment = {
        "TORONTO_AI_DATABASE__URL": database_url,
        "TORONTO_AI_LOG_LEVEL": "WARNING",
        "TORONTO_AI_OFFLINE_LATENCY_MS": str(arguments.latency_ms),
        "TORONTO_AI_WORKER__POLL_INTERVAL_SECONDS": "0.05",
        **backend_environment(backend, arguments.redis_port, f"bench{uuid.uuid4().hex[:8]}"),
    }
    settings = load_benchmark_settings(environment)
    runtime = await Runtime.start(settings, migrate=True)
    worker = Worker(runtime.database, runtime.executor, settings, signals=runtime.signals)
    running = asyncio.create_task(worker.run(), name="bench-worker")
    runs = []
    try:
        for _ in range(arguments.repeats):
            runs.append(await _run_one(runtime))
    finally:
        worker.stop()
        await running
        await runtime.aclose()
    return {"backend": backend, "runs": runs}


async def _run_one(runtime: Runtime) -> dict[str, Any]:
    started = time.perf_counter()
    async with runtime.database.transaction() as connection:
        project_id = await project_store.insert_project(
            connection,
            project_store.NewProject("Bench", BRIEF, "default", None, ["offline"], 3),
            "project_manager",
        )
    deadline = started + PROJECT_TIMEOUT_SECONDS
    while True:
        async with runtime.database.read() as connection:
            project = await project_store.get_project(connection, project_id)
        if project.status in FINAL_PROJECT_STATUSES:
            break
        if time.perf_counter() > deadline:
            raise RuntimeError(
                f"project {project_id} still {project.status} after {PROJECT_TIMEOUT_SECONDS} s"
            )
        await asyncio.sleep(0.01)
    seconds = time.perf_counter() - started
    if project.status != "completed":
        raise RuntimeError(f"project {project_id} ended {project.status}: {project.error}")
    async with runtime.database.read() as connection:
        calls, hits = (
            await connection.execute(
                select(
                    func.count(), func.coalesce(func.sum(case((llm_calls.c.cache_hit, 1), else_=0)), 0)
                ).where(llm_calls.c.project_id == project_id)
            )
        ).one()
    return {"seconds": round(seconds, 4), "llm_calls": calls, "cache_hits": int(hits)}


async def run_queries(database_url: str, backend: str, arguments: argparse.Namespace) -> dict[str, Any]:
    """Ask every question twice on one runtime; return per-query latencies of both passes, in ms."""
    environment = {
        "TORONTO_AI_DATABASE__URL": database_url,
        "TORONTO_AI_LOG_LEVEL": "WARNING",
        **backend_environment(backend, arguments.redis_port, f"bench{uuid.uuid4().hex[:8]}"),
    }
    runtime = await Runtime.start(load_benchmark_settings(environment), migrate=True)
    try:
        questions = await _questions(runtime, arguments.queries)
        # Loads the embedding model, so that the first measured query does not pay for it.
        await runtime.knowledge.query("peps", "a question that is never measured", 5)
        passes = []
        for _ in range(2):
            latencies, cached = [], 0
            for question in questions:
                started = time.perf_counter()
                found = await runtime.knowledge.query("peps", question, 5)
                latencies.append((time.perf_counter() - started) * 1000)
                cached += found.cached
            passes.append({"latencies_ms": [round(value, 3) for value in latencies], "cached": cached})
    finally:
        await runtime.aclose()
    return {"backend": backend, "questions": len(questions), "passes": passes}


async def _questions(runtime: Runtime, count: int) -> list[str]:
    async with runtime.database.read() as connection:
        headings = list(
            await connection.scalars(
                select(Chunk.heading)
                .where(Chunk.heading != "")
                .distinct()
                .order_by(Chunk.heading)
                .limit(count)
            )
        )
    return [f"What does the PEP say about {heading.lower()}?" for heading in headings]


def start_redis(folder: Path, port: int) -> None:
    for arguments in (
        ["start-standalone", str(folder), str(port)],
        ["start-cluster", str(folder), str(port + 1), str(port + 2), str(port + 3)],
    ):
        subprocess.run([str(REDIS_SCRIPT), *arguments], check=True, capture_output=True, text=True)


def stop_redis(folder: Path) -> None:
    subprocess.run([str(REDIS_SCRIPT), "stop", str(folder)], check=False, capture_output=True)


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "command": "python -m bench.cache_bench " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "source": describe_source(REPOSITORY_ROOT),
        "latency_ms": arguments.latency_ms,
        "projects": [],
        "queries": [],
    }
    with tempfile.TemporaryDirectory(prefix="cache_bench_") as folder:
        start_redis(Path(folder) / "redis", arguments.redis_port)
        try:
            for backend in BACKENDS:
                database_url = f"sqlite:///{folder}/projects-{backend}.db"
                results["projects"].append(await run_projects(database_url, backend, arguments))
                print(f"projects, {backend}: {results['projects'][-1]['runs']}", file=sys.stderr)

            database_url = f"sqlite:///{folder}/knowledge.db"
            setup = await Runtime.start(
                load_benchmark_settings({"TORONTO_AI_DATABASE__URL": database_url}), migrate=True
            )
            try:
                await ingest(setup, "peps", [CORPUS], create=True)
            finally:
                await setup.aclose()
            for backend in BACKENDS:
                results["queries"].append(await run_queries(database_url, backend, arguments))
        finally:
            stop_redis(Path(folder) / "redis")
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Derive the table rows: per backend, first and repeated runs, hit ratio and time saved."""
    off = next(item for item in results["projects"] if item["backend"] == "off")
    off_seconds = statistics.mean(run["seconds"] for run in off["runs"])
    projects = []
    for item in results["projects"]:
        first, repeats = item["runs"][0], item["runs"][1:]
        calls = sum(run["llm_calls"] for run in item["runs"])
        hits = sum(run["cache_hits"] for run in item["runs"])
        repeat_seconds = statistics.mean(run["seconds"] for run in repeats)
        projects.append(
            {
                "backend": item["backend"],
                "first_seconds": first["seconds"],
                "repeat_seconds": repeat_seconds,
                "hit_ratio": hits / calls if calls else 0.0,
                "saved_percent": 100 * (1 - repeat_seconds / off_seconds),
            }
        )
    queries = []
    for item in results["queries"]:
        first, second = item["passes"]
        queries.append(
            {
                "backend": item["backend"],
                "first_median_ms": statistics.median(first["latencies_ms"]),
                "second_median_ms": statistics.median(second["latencies_ms"]),
                "second_p95_ms": _percentile(second["latencies_ms"], 95),
                "second_cached": second["cached"],
                "questions": item["questions"],
            }
        )
    return {"projects": projects, "queries": queries}


def _percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def render_section(results: dict[str, Any], summary: dict[str, Any]) -> str:
    machine = results["machine"]
    project_rows = [
        [
            row["backend"],
            f"{row['first_seconds']:.2f}",
            f"{row['repeat_seconds']:.2f}",
            f"{row['hit_ratio']:.0%}",
            f"{row['saved_percent']:.0f} %",
        ]
        for row in summary["projects"]
    ]
    query_rows = [
        [
            row["backend"],
            f"{row['first_median_ms']:.2f}",
            f"{row['second_median_ms']:.2f}",
            f"{row['second_p95_ms']:.2f}",
            f"{row['second_cached']} of {row['questions']}",
        ]
        for row in summary["queries"]
    ]
    return "\n".join(
        [
            "## Cache",
            "",
            f"Command: `{results['command'].strip()}`, run {results['started_at']} at commit "
            f"{results['source']['commit']} on {machine['cpus']} CPUs ({machine['cpu_model']}), "
            f"{machine['memory_gib']} GiB, Python {machine['python']}, SQLite {machine['sqlite']}; "
            f"load average at start {machine['load_average_at_start']}.",
            "",
            f"A project from `examples/briefs/invoice-reminders.md`, run {len(results['projects'][0]['runs'])} "
            f"times per configuration by one in-process worker, with the offline model sleeping "
            f"{results['latency_ms']:.0f} ms per call. `off` is the peer: no cache. The first run of every "
            "configuration fills the cache; the later runs read it. Time saved compares the later runs with "
            "the mean of `off`.",
            "",
            markdown_table(
                ["cache", "first run (s)", "later runs, mean (s)", "hit ratio, all runs", "time saved"],
                project_rows,
            ),
            "",
            f"Knowledge-base queries: {summary['queries'][0]['questions']} distinct questions on the PEP "
            "corpus, top 5, asked twice per backend. The first pass embeds each question and searches; the "
            "second reads both from the cache, except with `off`.",
            "",
            markdown_table(
                [
                    "cache",
                    "first pass median (ms)",
                    "second pass median (ms)",
                    "second pass p95 (ms)",
                    "served from cache",
                ],
                query_rows,
            ),
            "",
            "![Project run times and query latencies per cache backend](images/cache_bench.png)",
        ]
    )


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _paired_bars(
        left,
        summary["projects"],
        ("first_seconds", "first run"),
        ("repeat_seconds", "later runs"),
        "seconds per project",
        "Model-bound project",
    )
    _paired_bars(
        right,
        summary["queries"],
        ("first_median_ms", "first pass"),
        ("second_median_ms", "second pass"),
        "median ms per query",
        "Knowledge-base query",
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    results = asyncio.run(run(arguments))
    summary = summarize(results)
    results["summary"] = summary
    RESULTS_FOLDER.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_FOLDER / f"cache_bench-{stamp}.json").write_text(
        json.dumps(results, indent=2) + "\n", encoding="utf-8"
    )
    section = render_section(results, summary)
    print(section)
    if not arguments.no_docs:
        plot(summary, PLOT_PATH)
        replace_section(DOCS_PAGE, "cache", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _paired_bars(
    axis: Any,
    rows: list[dict[str, Any]],
    first: tuple[str, str],
    second: tuple[str, str],
    ylabel: str,
    title: str,
) -> None:
    """Draw two bars per backend: ``first`` and ``second`` are (row key, legend label)."""
    positions = range(len(rows))
    for offset, (key, label) in ((-0.2, first), (0.2, second)):
        axis.bar([position + offset for position in positions], [row[key] for row in rows], 0.4, label=label)
    axis.set_xticks(list(positions), [row["backend"] for row in rows])
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
