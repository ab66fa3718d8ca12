"""The queue_throughput section of docs/benchmarks.md and its plot, built from one run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report

OVERHEAD, REFERENCE, EFFICIENCY = "overhead", "reference", "efficiency"


def write_docs(results: dict[str, Any], page: Path, plot_path: Path, section_name: str) -> None:
    """Replace the section ``section_name`` of ``page`` and save the plot it links to."""
    summary = results["summary"]
    targets = results["targets"]
    references = {
        entry["label"].split(",")[0]: entry["median_rate"] for entry in summary if entry["group"] == REFERENCE
    }
    target_lines = []
    if "procrastinate" in references:
        factor = targets["procrastinate_factor"]
        target_lines.append((f"{factor:g} × procrastinate", factor * references["procrastinate"]))
    if "pgqueuer" in references:
        factor = targets["pgqueuer_factor"]
        target_lines.append((f"{factor:g} × pgqueuer", factor * references["pgqueuer"]))
    report.plot_results(
        throughput=[
            (
                _short_label(entry),
                entry["median_rate"],
                "product" if entry["group"] == OVERHEAD else "reference",
            )
            for entry in summary
            if entry["group"] in (OVERHEAD, REFERENCE)
        ],
        target_lines=target_lines,
        efficiency=[
            (
                entry["label"].replace(", concurrency ", "\nc = "),
                entry["median_percent_of_ideal"],
                entry["peak_running"] <= entry["concurrency_limit"],
            )
            for entry in summary
            if entry["group"] == EFFICIENCY
        ],
        efficiency_target_percent=targets["efficiency_percent"],
        latency_ms=results["arguments"]["latency_ms"],
        path=plot_path,
    )
    report.replace_section(page, section_name, render_section(results, summary, targets, plot_path.name))


def _short_label(entry: dict[str, Any]) -> str:
    if entry["group"] == OVERHEAD:
        return "product: " + entry["label"].replace(" in-process", "").replace(", concurrency ", ", c = ")
    return entry["label"].replace(", batch size ", ", batch ").replace(", concurrency ", ", c = ")


def render_section(
    results: dict[str, Any], summary: list[dict[str, Any]], targets: dict[str, Any], plot_name: str
) -> str:
    lines = ["## Queue throughput", ""]
    lines += _method_lines(results)
    lines += _setup_lines(results)
    arguments = results["arguments"]
    lines += _result_lines(summary, arguments["repeat"], arguments["latency_ms"], plot_name)
    lines += ["### Targets", "", _targets_table(targets), "", _efficiency_targets_table(targets)]
    return "\n".join(lines)


def _method_lines(results: dict[str, Any]) -> list[str]:
    arguments = results["arguments"]
    packages = results["machine"]["packages"]
    poll_interval = results["worker_settings"]["poll_interval_seconds"]
    return [
        "`bench/queue_throughput.py` measures three things in one run:",
        "",
        "1. **Orchestration overhead with a zero-latency model.** Work tasks completed per second by "
        "the real `Worker` and `TaskExecutor`, with the offline provider answering at once. Every task "
        "gets its full bookkeeping. The claim takes a lease, adds an attempt row and a "
        "`task.started` event, and returns what the prompt needs. Then comes the model call. Last, "
        "the result is stored in a batch transaction with the results that finished with it: the "
        "output, three conversation messages, the LLM call record, the artifact and the events, "
        "and the decremented dependency count of the project's report task. The same transaction "
        "claims the tasks that take the slots these results free. "
        f"{arguments['tasks']:,} tasks are seeded directly in the database as projects of "
        f"{arguments['tasks_per_project']} independent work tasks whose plan is already accepted, so "
        "no planning runs. The report tasks are held back, so every task that runs is a work task. "
        "The wall time runs from the first claim to the last completion, as recorded in the "
        "`tasks` table. The worker runs in the benchmark's event loop, except in the multi-process "
        "run, which starts `python -m app.worker.start` processes. *Worker CPU per task* is the user "
        "plus system CPU time of the worker's process over the same interval, divided by the tasks. "
        "The PostgreSQL server's CPU is not included.",
        "2. **Reference queues** on the same PostgreSQL server, each in a new database: "
        f"procrastinate {packages.get('procrastinate')}, pgqueuer {packages.get('pgqueuer')}, and a "
        f"bare loop of asyncpg {packages.get('asyncpg')} connections. The bare loop claims rows of a "
        "plain table with `FOR UPDATE SKIP LOCKED` and marks each row done with its own statement. "
        "Each queue gets the same number of jobs whose handler does nothing, then one worker runs "
        "until the queue is empty. The time runs from the start of processing to the empty queue.",
        "3. **Concurrency efficiency.** The offline provider sleeps "
        f"{arguments['latency_ms']:g} ms per call, and one worker at concurrency C runs "
        f"{arguments['rounds']} × C tasks. The ideal rate is C / {arguments['latency_ms'] / 1000:g} s.",
        "",
        "Every measurement uses a new SQLite file or a new PostgreSQL database, dropped afterwards. "
        "The worker uses the defaults of `app.core.config`, among them a pool of 10 + 5 overflow "
        "connections on PostgreSQL and one write connection to a SQLite file in WAL mode. The one "
        f"exception is `worker.poll_interval_seconds` = {poll_interval:g}, which only shortens the "
        "wait of an idle worker at the start of a run. Worker logs are at WARNING.",
        "",
    ]


def _setup_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    packages = machine["packages"]
    return [
        "Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB RAM; "
        f"PostgreSQL {machine['postgresql']} on the same host at 127.0.0.1; SQLite {machine['sqlite']}; "
        f"Python {machine['python']}, SQLAlchemy {packages.get('sqlalchemy')}, asyncpg "
        f"{packages.get('asyncpg')}, aiosqlite {packages.get('aiosqlite')}. Load average "
        f"{_load(machine['load_average_at_start'])} at the start and "
        f"{_load(machine['load_average_at_end'])} at the end.",
        "",
        f"Date: {results['started_at']} to {results['finished_at']} (UTC).",
        "",
        _source_line(results.get("source", {})),
        "",
    ]


def _source_line(source: dict[str, Any]) -> str:
    if not source.get("commit"):
        return "Code: the commit was not recorded."
    line = f"Code: commit `{source['commit']}`"
    if source.get("app_has_uncommitted_changes"):
        line += ", with uncommitted changes under `app/` at the time of the run"
    return line + "."


def _result_lines(summary: list[dict[str, Any]], repeat: int, latency_ms: float, plot_name: str) -> list[str]:
    lines = [
        "### Results",
        "",
        f"Median of {repeat} run{'s' if repeat > 1 else ''} per line"
        + (", with the lowest and highest in brackets." if repeat > 1 else "."),
        "",
        _throughput_table(summary, repeat),
        "",
        _efficiency_table(summary, repeat, latency_ms),
        "",
    ]
    over_limit = [
        entry["label"]
        for entry in summary
        if entry["group"] != REFERENCE and entry["peak_running"] > entry["concurrency_limit"]
    ]
    if over_limit:
        lines += [
            "In these runs the worker ran more tasks at once than its concurrency limit: "
            + "; ".join(over_limit)
            + ". Their rates are what the product does today, but their efficiency is not "
            "comparable with the ideal rate, which assumes the limit.",
            "",
        ]
    lines += [
        f"![Throughput of the product's worker beside the reference queues, and concurrency efficiency]"
        f"({plot_name})",
        "",
    ]
    return lines


def _load(values: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values) + " (1 / 5 / 15 min)"


def _rate(entry: dict[str, Any], repeat: int) -> str:
    text = f"{entry['median_rate']:,.0f}"
    if repeat > 1:
        text += f" ({entry['min_rate']:,.0f}–{entry['max_rate']:,.0f})"
    return text


def _throughput_table(summary: list[dict[str, Any]], repeat: int) -> str:
    rows = []
    for entry in summary:
        if entry["group"] == OVERHEAD:
            rows.append(
                [
                    f"product: {entry['label']}",
                    f"{entry['count']:,} tasks",
                    _rate(entry, repeat),
                    f"{entry['median_cpu_ms_per_task']:.1f} ms",
                    _running(entry),
                    _split(entry),
                ]
            )
        elif entry["group"] == REFERENCE:
            rows.append([entry["label"], f"{entry['count']:,} jobs", _rate(entry, repeat), "", "", ""])
    return report.markdown_table(
        [
            "Zero-latency model / no-op jobs",
            "Work",
            "Per second",
            "Worker CPU per task",
            "Most tasks running at once (limit)",
            "Tasks per worker process",
        ],
        rows,
    )


def _running(entry: dict[str, Any]) -> str:
    return f"{entry['peak_running']:,} ({entry['concurrency_limit']:,})"


def _split(entry: dict[str, Any]) -> str:
    """Return how the tasks were shared between the processes in each run, for multi-process runs."""
    splits = entry["tasks_per_worker"]
    if all(len(split) <= 1 for split in splits) and "processes" not in entry["label"]:
        return ""
    return "; ".join(" / ".join(f"{count:,}" for count in split) for split in splits)


def _efficiency_table(summary: list[dict[str, Any]], repeat: int, latency_ms: float) -> str:
    rows = [
        [
            entry["label"],
            f"{entry['count']:,}",
            f"{entry['ideal_tasks_per_second']:,.0f}",
            _rate(entry, repeat),
            f"{entry['median_percent_of_ideal']:.0f} %",
            _running(entry),
        ]
        for entry in summary
        if entry["group"] == EFFICIENCY
    ]
    return report.markdown_table(
        [
            f"Model sleeps {latency_ms:g} ms; engine, concurrency",
            "Tasks",
            "Ideal per second",
            "Per second",
            "Of ideal",
            "Most tasks running at once (limit)",
        ],
        rows,
    )


def _yes_no(value: bool | None) -> str:
    if value is None:
        return "not measured"
    return "yes" if value else "no"


def _factor(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _targets_table(targets: dict[str, Any]) -> str:
    rows = [
        [
            entry["label"],
            f"{entry['tasks_per_second']:,.0f}",
            _factor(entry["times_procrastinate"]),
            _yes_no(entry["meets_procrastinate_target"]),
            _factor(entry["times_pgqueuer"]),
            _yes_no(entry["meets_pgqueuer_target"]),
        ]
        for entry in targets["overhead"]
    ]
    return report.markdown_table(
        [
            "Product run (zero-latency model)",
            "Tasks per second",
            "× procrastinate",
            f"At least × {targets['procrastinate_factor']:g}?",
            "× pgqueuer",
            f"At least × {targets['pgqueuer_factor']:g}?",
        ],
        rows,
    )


def _efficiency_targets_table(targets: dict[str, Any]) -> str:
    rows = []
    for entry in targets["efficiency"]:
        if entry["meets_target"] is None:
            verdict = (
                f"not comparable: {entry['peak_running']:,} tasks ran at once, the limit is "
                f"{entry['concurrency_limit']:,}"
            )
        else:
            verdict = _yes_no(entry["meets_target"])
        rows.append([entry["label"], f"{entry['percent_of_ideal']:.0f} %", verdict])
    return report.markdown_table(
        ["Concurrency run", "Of ideal", f"At least {targets['efficiency_percent']:g} %?"], rows
    )
