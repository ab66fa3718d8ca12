"""Measure the task queue's throughput beside procrastinate, pgqueuer and a bare SKIP LOCKED loop.

Run ``python -m bench.queue_throughput --quick`` for a short run or without ``--quick`` for
the full one. One run measures:

1. Orchestration overhead: work tasks per second through the real ``Worker`` and
   ``TaskExecutor`` with the offline provider at zero latency, on SQLite and on PostgreSQL.
2. Reference queues on the same PostgreSQL server: the same number of no-op jobs through
   procrastinate, pgqueuer and a bare ``FOR UPDATE SKIP LOCKED`` loop.
3. Concurrency efficiency: with the offline provider sleeping per call, achieved tasks per
   second as a percentage of ``concurrency / latency``.

Results go to bench/results/ as JSON and to the queue_throughput section of docs/benchmarks.md,
with a plot in docs/. Each measurement runs on a new SQLite file or PostgreSQL database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.logging import configure_logging
from bench import baselines, product_runs, report
from bench.databases import temporary_postgres_database, temporary_sqlite_url
from bench.queue_throughput_docs import write_docs

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FOLDER = REPOSITORY_ROOT / "bench" / "results"
DOCS_PAGE = REPOSITORY_ROOT / "docs" / "benchmarks.md"
PLOT_PATH = REPOSITORY_ROOT / "docs" / "queue_throughput.png"
SECTION_NAME = "queue_throughput"

PRESETS = {
    "quick": {"tasks": 1_000, "repeat": 1},
    "full": {"tasks": 3_000, "repeat": 3},
}
# Targets set by the product owner: the product's tasks per second against the references.
PROCRASTINATE_FACTOR_TARGET = 2.0
PGQUEUER_FACTOR_TARGET = 0.5
EFFICIENCY_TARGET_PERCENT = 90.0

OVERHEAD, REFERENCE, EFFICIENCY = "overhead", "reference", "efficiency"


@dataclass(frozen=True, slots=True)
class Step:
    """One measurement of the run; ``measure`` creates and drops its own database."""

    group: str
    label: str
    measure: Callable[[], Awaitable[Any]]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.queue_throughput",
        description="Measure the task queue's throughput beside procrastinate, pgqueuer and a bare "
        "SKIP LOCKED loop, and write bench/results/*.json and docs/benchmarks.md.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run: {PRESETS['quick']['tasks']} tasks, one repetition (default: "
        f"{PRESETS['full']['tasks']} tasks, {PRESETS['full']['repeat']} repetitions)",
    )
    parser.add_argument("--tasks", type=int, help="work tasks, and no-op jobs per reference queue")
    parser.add_argument(
        "--repeat", type=int, help="repetitions of every measurement (the median is reported)"
    )
    parser.add_argument("--tasks-per-project", type=int, default=10, help="work tasks per seeded project")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[16, 128],
        help="worker concurrencies of the in-process overhead runs; the first also sets the "
        "multi-process run (default: 16, the product default, and 128)",
    )
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=2,
        help="worker processes of the multi-process PostgreSQL run; 0 skips it",
    )
    parser.add_argument(
        "--efficiency-concurrency",
        type=int,
        nargs="+",
        default=[50, 200],
        help="worker concurrencies of the efficiency runs",
    )
    parser.add_argument(
        "--latency-ms", type=float, default=500.0, help="model latency of the efficiency runs, in ms"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="tasks per efficiency run, as a multiple of its concurrency"
    )
    parser.add_argument(
        "--procrastinate-concurrency", type=int, default=16, help="procrastinate worker concurrency"
    )
    parser.add_argument(
        "--pgqueuer-batch-size",
        type=int,
        default=10,
        help="pgqueuer dequeue batch size (the library default)",
    )
    parser.add_argument(
        "--skip-locked-connections", type=int, default=16, help="connections of the bare loop"
    )
    parser.add_argument(
        "--skip-locked-batch-size", type=int, default=10, help="rows per claim of the bare loop"
    )
    parser.add_argument(
        "--postgres-port", type=int, default=5432, help="port of the PostgreSQL server on 127.0.0.1"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds after which one measurement is abandoned"
    )
    parser.add_argument("--no-docs", action="store_true", help="write only the JSON results, not docs/")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing; rewrite the docs section and plot from an earlier results file",
    )
    arguments = parser.parse_args(argv)

    preset = PRESETS["quick" if arguments.quick else "full"]
    arguments.tasks = arguments.tasks or preset["tasks"]
    arguments.repeat = arguments.repeat or preset["repeat"]
    if min(arguments.concurrency) < 1:
        parser.error(f"--concurrency values must be at least 1, got {arguments.concurrency}")
    for name in ("tasks", "repeat", "tasks_per_project", "rounds", "latency_ms"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}")
    if min(arguments.efficiency_concurrency) < 1:
        parser.error(
            f"--efficiency-concurrency values must be at least 1, got {arguments.efficiency_concurrency}"
        )
    if arguments.worker_processes < 0:
        parser.error(f"--worker-processes must be 0 or more, got {arguments.worker_processes}")
    return arguments


def plan_steps(arguments: argparse.Namespace) -> list[Step]:
    """List the measurements of one repetition, in the order they run."""
    port = arguments.postgres_port
    timeout = arguments.timeout
    tasks = arguments.tasks
    per_project = arguments.tasks_per_project

    async def in_process(engine: str, latency_ms: float, concurrency: int, task_count: int):
        options = dict(
            task_count=task_count,
            tasks_per_project=per_project,
            latency_ms=latency_ms,
            concurrency=concurrency,
            timeout_seconds=timeout,
        )
        if engine == "sqlite":
            with temporary_sqlite_url() as url:
                return await product_runs.run_in_process(url, **options)
        async with temporary_postgres_database(port) as dsn:
            return await product_runs.run_in_process(dsn, **options)

    async def processes(count: int):
        async with temporary_postgres_database(port) as dsn:
            return await product_runs.run_worker_processes(
                dsn,
                processes=count,
                task_count=tasks,
                tasks_per_project=per_project,
                latency_ms=0,
                concurrency=arguments.concurrency[0],
                timeout_seconds=timeout,
            )

    async def reference(run: Callable[..., Awaitable[baselines.BaselineResult]], *options: int):
        async with temporary_postgres_database(port) as dsn:
            return await asyncio.wait_for(run(dsn, tasks, *options), timeout)

    steps = []
    for concurrency in arguments.concurrency:
        for engine, engine_label in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL")):
            steps.append(
                Step(
                    OVERHEAD,
                    f"{engine_label}, 1 worker in-process, concurrency {concurrency}",
                    lambda engine=engine, value=concurrency: in_process(engine, 0, value, tasks),
                )
            )
    concurrency = arguments.concurrency[0]
    if arguments.worker_processes:
        steps.append(
            Step(
                OVERHEAD,
                f"PostgreSQL, {arguments.worker_processes} worker processes, concurrency {concurrency} each",
                lambda: processes(arguments.worker_processes),
            )
        )
    steps += [
        Step(
            REFERENCE,
            f"procrastinate, concurrency {arguments.procrastinate_concurrency}",
            lambda: reference(baselines.run_procrastinate, arguments.procrastinate_concurrency),
        ),
        Step(
            REFERENCE,
            f"pgqueuer, batch size {arguments.pgqueuer_batch_size}",
            lambda: reference(baselines.run_pgqueuer, arguments.pgqueuer_batch_size),
        ),
        Step(
            REFERENCE,
            f"bare SKIP LOCKED, {arguments.skip_locked_connections} connections, "
            f"batch size {arguments.skip_locked_batch_size}",
            lambda: reference(
                baselines.run_skip_locked, arguments.skip_locked_connections, arguments.skip_locked_batch_size
            ),
        ),
    ]
    for engine, engine_label in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL")):
        for efficiency_concurrency in arguments.efficiency_concurrency:
            steps.append(
                Step(
                    EFFICIENCY,
                    f"{engine_label}, concurrency {efficiency_concurrency}",
                    lambda engine=engine, value=efficiency_concurrency: in_process(
                        engine, arguments.latency_ms, value, arguments.rounds * value
                    ),
                )
            )
    return steps


async def run_all(steps: list[Step], repeat: int) -> list[dict[str, Any]]:
    """Run every step ``repeat`` times, printing one progress line per measurement."""
    measurements = []
    total = len(steps) * repeat
    number = 0
    for repetition in range(1, repeat + 1):
        for step in steps:
            number += 1
            print(f"[{number}/{total}] {step.group}: {step.label} ...", flush=True)
            load_average = [round(value, 2) for value in os.getloadavg()]
            started = time.monotonic()
            result = await step.measure()
            elapsed = time.monotonic() - started
            record = {
                "group": step.group,
                "label": step.label,
                "repetition": repetition,
                "load_average_before": load_average,
                "elapsed_seconds_with_setup": round(elapsed, 2),
                **result.to_json(),
            }
            record["rate"] = record.get("tasks_per_second") or record["jobs_per_second"]
            if step.group == EFFICIENCY:
                ideal = result.concurrency / (result.latency_ms / 1000)
                record["ideal_tasks_per_second"] = ideal
                record["percent_of_ideal"] = 100 * record["rate"] / ideal
            if step.group != REFERENCE:
                record["concurrency_limit"] = result.processes * result.concurrency
            measurements.append(record)
            print(f"    {_describe_measurement(record)} ({elapsed:.0f} s with setup)", flush=True)
    return measurements


def _describe_measurement(record: dict[str, Any]) -> str:
    text = f"{record['rate']:,.1f} per second over {record['seconds']:.2f} s"
    if record["group"] == EFFICIENCY:
        text += f" = {record['percent_of_ideal']:.0f} % of ideal"
    if record["group"] != REFERENCE:
        text += f", {record['cpu_ms_per_task']:.1f} ms worker CPU per task"
        text += f", peak {record['peak_running']} running (limit {record['concurrency_limit']})"
        if len(record["tasks_per_worker"]) > 1:
            text += ", tasks per worker " + " / ".join(str(count) for count in record["tasks_per_worker"])
    return text


def summarize(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return per label the median, minimum and maximum rate over the repetitions, in run order."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for record in measurements:
        by_label.setdefault(record["label"], []).append(record)
    summary = []
    for label, records in by_label.items():
        rates = [record["rate"] for record in records]
        entry = {
            "group": records[0]["group"],
            "label": label,
            "runs": len(records),
            "median_rate": statistics.median(rates),
            "min_rate": min(rates),
            "max_rate": max(rates),
            "count": records[0].get("tasks") or records[0].get("jobs"),
        }
        if entry["group"] == EFFICIENCY:
            entry["ideal_tasks_per_second"] = records[0]["ideal_tasks_per_second"]
            entry["median_percent_of_ideal"] = statistics.median(
                record["percent_of_ideal"] for record in records
            )
        if entry["group"] == REFERENCE:
            entry["package_version"] = records[0]["package_version"]
        else:
            entry["concurrency_limit"] = records[0]["concurrency_limit"]
            entry["peak_running"] = max(record["peak_running"] for record in records)
            entry["median_cpu_ms_per_task"] = statistics.median(
                record["cpu_ms_per_task"] for record in records
            )
            entry["tasks_per_worker"] = [record["tasks_per_worker"] for record in records]
        summary.append(entry)
    return summary


def evaluate_targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare each product rate with the targets.

    A comparison is None where its reference was not measured, or, for efficiency, where the
    worker ran more tasks at once than its concurrency limit.
    """
    references = {
        entry["label"].split(",")[0]: entry["median_rate"] for entry in summary if entry["group"] == REFERENCE
    }
    procrastinate = references.get("procrastinate")
    pgqueuer = references.get("pgqueuer")
    overhead = []
    for entry in summary:
        if entry["group"] != OVERHEAD:
            continue
        rate = entry["median_rate"]
        overhead.append(
            {
                "label": entry["label"],
                "tasks_per_second": rate,
                "times_procrastinate": rate / procrastinate if procrastinate else None,
                "times_pgqueuer": rate / pgqueuer if pgqueuer else None,
                "meets_procrastinate_target": rate >= PROCRASTINATE_FACTOR_TARGET * procrastinate
                if procrastinate
                else None,
                "meets_pgqueuer_target": rate >= PGQUEUER_FACTOR_TARGET * pgqueuer if pgqueuer else None,
            }
        )
    efficiency = []
    for entry in summary:
        if entry["group"] != EFFICIENCY:
            continue
        # Above the concurrency limit the ideal rate is no longer an upper bound, so the
        # percentage does not show how well the worker uses its limit.
        valid = entry["peak_running"] <= entry["concurrency_limit"]
        percent = entry["median_percent_of_ideal"]
        efficiency.append(
            {
                "label": entry["label"],
                "percent_of_ideal": percent,
                "peak_running": entry["peak_running"],
                "concurrency_limit": entry["concurrency_limit"],
                "meets_target": percent >= EFFICIENCY_TARGET_PERCENT if valid else None,
            }
        )
    return {
        "procrastinate_factor": PROCRASTINATE_FACTOR_TARGET,
        "pgqueuer_factor": PGQUEUER_FACTOR_TARGET,
        "efficiency_percent": EFFICIENCY_TARGET_PERCENT,
        "overhead": overhead,
        "efficiency": efficiency,
    }


async def main_async(arguments: argparse.Namespace, command: str) -> int:
    configure_logging("WARNING")
    started_at = datetime.now(UTC)
    machine = report.describe_machine()
    machine["postgresql"] = await _postgres_version(arguments.postgres_port)
    source = report.describe_source(REPOSITORY_ROOT)
    steps = plan_steps(arguments)
    print(
        f"{len(steps)} measurements × {arguments.repeat} repetitions, {arguments.tasks} tasks or jobs each; "
        f"{machine['cpus']} CPUs, load average {machine['load_average_at_start']}",
        flush=True,
    )

    measurements = await run_all(steps, arguments.repeat)
    summary = summarize(measurements)
    targets = evaluate_targets(summary)
    finished_at = datetime.now(UTC)
    machine["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]

    results = {
        "benchmark": SECTION_NAME,
        "command": command,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": finished_at.isoformat(timespec="seconds"),
        "arguments": {key: value for key, value in vars(arguments).items()},
        "worker_settings": {
            "poll_interval_seconds": product_runs.POLL_INTERVAL_SECONDS,
            "other": "defaults of app.core.config",
        },
        "source": source,
        "machine": machine,
        "summary": summary,
        "targets": targets,
        "measurements": measurements,
    }
    json_path = report.write_json(results, RESULTS_FOLDER, started_at)
    print(f"results: {json_path.relative_to(REPOSITORY_ROOT)}")

    _print_summary(summary, targets)
    if not arguments.no_docs:
        write_docs(results, DOCS_PAGE, PLOT_PATH, SECTION_NAME)
        print(f"docs: {DOCS_PAGE.relative_to(REPOSITORY_ROOT)}, {PLOT_PATH.relative_to(REPOSITORY_ROOT)}")
    return 0


async def _postgres_version(port: int) -> str:
    import asyncpg

    from bench.databases import ADMIN_DATABASE, postgres_dsn

    connection = await asyncpg.connect(postgres_dsn(ADMIN_DATABASE, port))
    try:
        return await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()


def _print_summary(summary: list[dict[str, Any]], targets: dict[str, Any]) -> None:
    print("\nmedian per measurement:")
    for entry in summary:
        detail = (
            f" ({entry['median_percent_of_ideal']:.0f} % of ideal)" if entry["group"] == EFFICIENCY else ""
        )
        print(f"  {entry['group']:<10} {entry['label']:<60} {entry['median_rate']:>10,.1f}/s{detail}")
    print("targets:")
    for entry in targets["overhead"]:
        print(
            f"  {entry['label']}: ×{_format_factor(entry['times_procrastinate'])} procrastinate "
            f"(target ×{PROCRASTINATE_FACTOR_TARGET:g}), ×{_format_factor(entry['times_pgqueuer'])} pgqueuer "
            f"(target ×{PGQUEUER_FACTOR_TARGET:g})"
        )
    for entry in targets["efficiency"]:
        verdict = (
            f"not comparable: {entry['peak_running']} tasks ran at once, "
            f"the limit is {entry['concurrency_limit']}"
            if entry["meets_target"] is None
            else f"target {EFFICIENCY_TARGET_PERCENT:g} %"
        )
        print(f"  {entry['label']}: {entry['percent_of_ideal']:.0f} % of ideal ({verdict})")


def _format_factor(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.render:
        try:
            results = json.loads(arguments.render.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: cannot read results file {arguments.render}: {exc}", file=sys.stderr)
            return 2
        write_docs(results, DOCS_PAGE, PLOT_PATH, SECTION_NAME)
        print(f"docs: {DOCS_PAGE.relative_to(REPOSITORY_ROOT)}, {PLOT_PATH.relative_to(REPOSITORY_ROOT)}")
        return 0
    command = " ".join(["python -m bench.queue_throughput", *(sys.argv[1:] if argv is None else argv)])
    return asyncio.run(main_async(arguments, command))


if __name__ == "__main__":
    sys.exit(main())
