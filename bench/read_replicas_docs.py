"""The read_replicas section of docs/benchmarks.md and its plot, built from one run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report


def write_docs(results: dict[str, Any], page: Path, plot_path: Path, section_name: str) -> None:
    """Replace the section ``section_name`` of ``page`` and save the plot it links to."""
    plot(results["summary"], plot_path)
    report.replace_section(page, section_name, render_section(results, plot_path.name))


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [entry["setup"].replace(", ", "\n") for entry in summary]
    colours = ["#4c72b0" if not entry["pgbouncer"] else "#dd8452" for entry in summary]
    figure, (rates, latencies) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = rates.bar(labels, [entry["median_rate"] for entry in summary], color=colours)
    rates.bar_label(bars, fmt="%.0f")
    rates.set_ylabel("requests per second (median of rounds)")
    rates.set_title("Project reads through one API instance")
    positions = range(len(summary))
    latencies.bar([p - 0.2 for p in positions], [e["median_p50_ms"] for e in summary], 0.4, label="p50")
    latencies.bar([p + 0.2 for p in positions], [e["median_p95_ms"] for e in summary], 0.4, label="p95")
    latencies.set_xticks(list(positions), labels)
    latencies.set_ylabel("latency, ms")
    latencies.set_title("Latency per request")
    latencies.legend()
    for axis in (rates, latencies):
        axis.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def comparison(summary: list[dict[str, Any]], cpus: int) -> str:
    """Return a paragraph that compares the setups' median rates, from the measured numbers."""
    rates = {(entry["replica"], entry["pgbouncer"]): entry["median_rate"] for entry in summary}
    cores = max(entry["median_api_cpu_cores"] for entry in summary)
    spread = max((max(entry["rates"]) - min(entry["rates"])) / entry["median_rate"] for entry in summary)

    def change(new: float, old: float) -> str:
        return f"{100 * (new / old - 1):+.0f} %"

    return (
        f"Against the primary alone, one replica changed the median rate by "
        f"{change(rates[True, False], rates[False, False])} with direct connections and by "
        f"{change(rates[True, True], rates[False, True])} through PgBouncer, while taking every "
        f"measured read off the primary. PgBouncer changed it by "
        f"{change(rates[False, True], rates[False, False])} without a replica. The API process "
        f"used up to {cores:.2f} of the host's {cpus} cores, which it shares with both servers, "
        "both PgBouncers, the load generator and any other work on the host. The rounds of "
        f"one setup differed by up to {100 * spread:.0f} % of its median, so smaller differences "
        "between setups are within the noise of this host. A replica relieves the primary of reads; it "
        "raises one instance's rate only where the primary, not the instance, is the limit. "
        "Through PgBouncer every statement is prepared unnamed, again for each execution and in "
        "two round trips, and every transaction starts with `SET LOCAL statement_timeout`."
    )


def render_section(results: dict[str, Any], plot_name: str) -> str:
    arguments = results["arguments"]
    machine = results["machine"]
    packages = machine["packages"]
    rows = [
        [
            entry["setup"],
            f"{entry['median_rate']:.0f}",
            ", ".join(f"{rate:.0f}" for rate in entry["rates"]),
            f"{entry['median_p50_ms']:.1f}",
            f"{entry['median_p95_ms']:.1f}",
            f"{100 * entry['replica_read_share']:.0f} %",
            f"{entry['median_api_cpu_cores']:.2f}",
            str(entry["errors"]),
        ]
        for entry in results["summary"]
    ]
    header = ["setup", "req/s (median)", "req/s per round", "p50 ms", "p95 ms"]
    header += ["reads on the replica", "API CPU, cores", "failed"]
    table = report.markdown_table(header, rows)
    load_start = " / ".join(str(value) for value in machine["load_average_at_start"])
    load_end = " / ".join(str(value) for value in machine["load_average_at_end"])
    source = results["source"]
    changes = " with uncommitted changes in app/" if source["app_has_uncommitted_changes"] else ""
    return f"""## Read replicas and PgBouncer

`bench/read_replicas.py` measures how many project reads per second one API instance
(`deploy.py`, one uvicorn process) serves in four database setups, in one run on one
cluster: a PostgreSQL primary alone or with one streaming replica, each with direct
connections or through PgBouncer in transaction mode (the shipped `config/pgbouncer.ini`,
one PgBouncer per server). The benchmark starts its own cluster, seeds
{arguments["projects"]} finished projects through the real worker with the offline
provider, and then, for {arguments["rounds"]} interleaved rounds, starts a fresh instance per
setup and sends it reads from {arguments["concurrency"]} concurrent httpx clients for
{arguments["duration"]:g} s after a {arguments["warmup"]:g} s warm-up. Half of the requests list the newest 20
projects (`GET /api/v1/projects`) and half read one finished project with its tasks and
usage (`GET /api/v1/projects/{{id}}`). The instance uses the default pool of 10 + 5
connections per server and logs at WARNING. "Reads on the replica" is the instance's own
`toronto_ai_database_reads_total` counter. "API CPU" is the user and system CPU time of the
instance's process while measuring, divided by the measured time.

{table}

{comparison(results["summary"], machine["cpus"])}

![Read throughput and latency per setup]({plot_name})

Command:

```
flock /tmp/toronto-bench.lock {results["command"]}
```

Machine: {machine["cpus"]} CPUs ({machine["cpu_model"]}), {machine["memory_gib"]} GiB RAM; the
primary, the replica, both PgBouncers, the API instance and the load generator share it.
PostgreSQL {results["postgres"]}; Python {machine["python"]}, SQLAlchemy {packages["sqlalchemy"]},
asyncpg {packages["asyncpg"]}. Load average {load_start} (1 / 5 / 15 min) at the start and
{load_end} at the end.

Date: {results["started_at"]} to {results["finished_at"]} (UTC).

Code: commit `{source["commit"]}`{changes}.
"""
