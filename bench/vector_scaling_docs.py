"""The vector_scaling section of docs/benchmarks.md and its plot, from one run's results.

Run ``python -m bench.vector_scaling_docs bench/results/vector_scaling-STAMP.json`` to write
them again from a saved run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.knowledge_docs import replace_section
from bench.vector_scaling import COALESCED, ONE_PER_QUERY, PARTITIONED, SINGLE

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGE = REPOSITORY_ROOT / "docs" / "benchmarks.md"
PLOT = REPOSITORY_ROOT / "docs" / "vector_scaling.png"
SECTION_NAME = "vector_scaling"


def write_docs(results: dict[str, Any]) -> None:
    plot(results, PLOT)
    replace_section(DOCS_PAGE, SECTION_NAME, render_section(results))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_sets = results["data_sets"]
    figure, axes = plt.subplots(1, len(data_sets), figsize=(5.5 * len(data_sets), 4.8), squeeze=False)
    for axis, (name, data) in zip(axes[0], data_sets.items(), strict=True):
        for label, entry in data["layouts"].items():
            points = sorted(entry["by_ef_search"].items(), key=lambda pair: int(pair[0]))
            for mode, style in ((COALESCED, "-"), (ONE_PER_QUERY, ":")):
                recalls = [by_mode[mode]["recall_at_10"] for _, by_mode in points]
                qps = [by_mode[mode]["qps"] for _, by_mode in points]
                axis.plot(recalls, qps, marker="o", linestyle=style, label=f"{label}, {mode}")
                for (ef_search, _), x, y in zip(points, recalls, qps, strict=True):
                    axis.annotate(
                        f"ef {ef_search}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
                    )
        axis.axvline(data["comparison"]["recall_target"], color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"{name}: {data['vectors']:,} vectors")
        axis.set_xlabel("recall@10")
        axis.set_ylabel(f"queries per second, {results['clients']} clients")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    # One legend below both plots, because four series inside either plot hide its points.
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render_section(results: dict[str, Any]) -> str:
    lines = [
        "## Vector store scaling: one Chroma server against 4 partitions on 2",
        "",
        f"Command: `{results['command']}` (started {results['started_at']}, load average "
        f"{', '.join(map(str, results['load_average_at_start']))} at the start and "
        f"{', '.join(map(str, results['load_average_at_end']))} at the end, on a machine that other "
        "work shared).",
        "",
        f"{results['clients']} concurrent clients send {results['queries']} queries between them, each "
        "one at a time, through the product's `QueryDistributor` (every partition in parallel, merged by "
        f"distance and chunk id). {_client_setup(results)} Both layouts hold the same vectors on the "
        "same two `chroma run` "
        "servers on this machine: one collection on the first server, or 4 partitions placed "
        "alternately on both. Recall@10 is against an exact numpy search. Queries are stored vectors "
        f"plus Gaussian noise of norm {results['query_noise']}. For each `ef_search` the servers are "
        "restarted, because a running Chroma 1.5.9 server keeps the value its index was loaded with. "
        "CPU per query adds up the user and system time of the two server processes, and of the "
        "client processes, during the timed queries.",
        "",
        f"Data: the first {results['pep_vectors']['vectors']:,} distinct chunk texts of the PEP corpus "
        "(bench/corpus/peps, of about 29,900), embedded once with all-MiniLM-L6-v2 by "
        "`python -m bench.vector_corpus` and reused from "
        f"`bench/results/{results['pep_vectors']['file']}`. Embedding them took 345 s on this machine "
        "while other work shared it, so the whole corpus would take about 20 minutes.",
    ]
    if "synthetic" in results:
        synthetic = results["synthetic"]
        lines[-1] += (
            f" And {synthetic['vectors']:,} synthetic unit vectors of the same dimension around "
            f"{synthetic['clusters']:,} random centres (noise norm {synthetic['spread']})."
        )
    lines += ["", "![QPS against recall@10 per layout](vector_scaling.png)", ""]

    for name, data in results["data_sets"].items():
        lines += [f"### {name}, {data['vectors']:,} vectors of {data['dimension']} dimensions", ""]
        lines += [
            "| layout | requests | ef_search | QPS | p50 ms | p95 ms | recall@10 | server CPU ms/query "
            "| client CPU ms/query |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, entry in data["layouts"].items():
            for mode in (COALESCED, ONE_PER_QUERY):
                for ef_search, by_mode in sorted(
                    entry["by_ef_search"].items(), key=lambda pair: int(pair[0])
                ):
                    values = by_mode[mode]
                    lines.append(
                        f"| {label} | {mode} | {ef_search} | {values['qps']:,.0f} | {values['ms_p50']:.1f} | "
                        f"{values['ms_p95']:.1f} | {values['recall_at_10']:.3f} | "
                        f"{values['server_cpu_ms_per_query']:.2f} | {values['client_cpu_ms_per_query']:.2f} |"
                    )
        writes = ", ".join(
            f"{label} {entry['write_vectors_per_second']:,.0f}" for label, entry in data["layouts"].items()
        )
        lines += ["", f"Writes through `ChromaVectorStore.upsert`, vectors per second: {writes}.", ""]
        lines += _comparison_lines(data["comparison"])
        lines += _cpu_lines(data, results["machine"]["cpus"])

    cache = results["service_cache"]
    lines += [
        "### Cached and uncached knowledge-base queries",
        "",
        f"`KnowledgeService.query` on the PEP vectors in a SQLite knowledge base on the "
        f"{cache['layout']} layout (ef_search {cache['ef_search']}), {cache['queries']} distinct texts "
        f"from {cache['concurrent_clients']} concurrent asyncio clients in one process, then the same "
        "texts again. An uncached query reads the knowledge base's row, queries every partition and "
        "reads the candidates back from the database; a cached one only reads the row.",
        "",
        "| queries | QPS | p50 ms | p95 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label in ("uncached", "cached"):
        values = cache[label]
        lines.append(f"| {label} | {values['qps']:,.0f} | {values['ms_p50']:.1f} | {values['ms_p95']:.1f} |")
    lines += [""]
    lines += _machine_lines(results)
    return "\n".join(lines)


def _client_setup(results: dict[str, Any]) -> str:
    processes = results["processes"]
    coalescing = results["coalescing"]
    where = "one process" if processes == 1 else f"{processes} processes"
    return (
        f"The clients are asyncio tasks in {where}, and the clients of one process share one "
        "`QueryDistributor`, as the concurrent requests of one API process do. Each measurement "
        f"runs twice. The {COALESCED} run uses the default settings: up to "
        f"{coalescing['query_batch_max']} queries per request, "
        f"{coalescing['query_requests_in_flight']} request in flight per partition and a window of "
        f"{coalescing['query_batch_window_seconds'] * 1000:g} ms. The run with {ONE_PER_QUERY} sets "
        "`query_batch_max` to 1, so every query goes to every partition at once on its own. Coalescing "
        "joins only the queries of one process, so with as many processes as clients it changes nothing."
    )


def _comparison_lines(comparison: dict[str, Any]) -> list[str]:
    target = comparison["qps_target_factor"]
    if "partitioned_over_single" not in comparison:
        return [
            f"Target (partitioned QPS at least {target} times one server's at recall@10 of "
            f"{comparison['recall_target']}): not met; {comparison['note']}.",
            "",
        ]
    chosen = comparison["chosen"]

    def describe(label: str, mode: str) -> str:
        values = chosen[f"{label}, {mode}"]
        return f"{values['qps']:,.0f} QPS (ef_search {values['ef_search']})"

    verdict = "met" if comparison["target_met"] else "not met"
    return [
        f"At recall@10 of at least {comparison['recall_target']}, both {COALESCED}: one server "
        f"{describe(SINGLE, COALESCED)}, 4 partitions on 2 servers {describe(PARTITIONED, COALESCED)}, "
        f"{comparison['partitioned_over_single']:.2f} times. Target of {target} times: **{verdict}**. "
        f"With {ONE_PER_QUERY}: one server {describe(SINGLE, ONE_PER_QUERY)}, 4 partitions "
        f"{describe(PARTITIONED, ONE_PER_QUERY)}. Coalesced partitions against one server with one "
        f"request per query: {comparison['partitioned_over_single_one_per_query']:.2f} times.",
        "",
    ]


def _cpu_lines(data: dict[str, Any], cpus: int) -> list[str]:
    """Explain the comparison by the CPU time per query of each layout and mode at its chosen ef_search."""
    comparison = data["comparison"]
    if "chosen" not in comparison:
        return []

    def chosen(label: str, mode: str) -> dict[str, float]:
        ef_search = comparison["chosen"][f"{label}, {mode}"]["ef_search"]
        return data["layouts"][label]["by_ef_search"][str(ef_search)][mode]

    def total(label: str, mode: str) -> float:
        values = chosen(label, mode)
        return values["server_cpu_ms_per_query"] + values["client_cpu_ms_per_query"]

    def gain(label: str) -> float:
        return chosen(label, COALESCED)["qps"] / chosen(label, ONE_PER_QUERY)["qps"]

    def saved(label: str) -> float:
        return 100 * (1 - total(label, COALESCED) / total(label, ONE_PER_QUERY))

    return [
        "CPU per query, servers and clients together, at those ef_search values: one server "
        f"{total(SINGLE, COALESCED):.1f} ms {COALESCED} and {total(SINGLE, ONE_PER_QUERY):.1f} ms with "
        f"{ONE_PER_QUERY}; 4 partitions {total(PARTITIONED, COALESCED):.1f} ms {COALESCED} and "
        f"{total(PARTITIONED, ONE_PER_QUERY):.1f} ms with {ONE_PER_QUERY}. Coalescing multiplied the "
        f"QPS of one server by {gain(SINGLE):.1f} and that of 4 partitions by {gain(PARTITIONED):.1f}, "
        f"and it cut the CPU per query by {saved(SINGLE):.0f}% and {saved(PARTITIONED):.0f}% "
        "respectively, because "
        "the queries in flight share the HTTP and JSON work of a request. A coalesced batch still "
        "becomes 4 requests with 4 partitions, against 1 with one server, and each query still runs 4 "
        f"HNSW searches. Here every server and client shares the same {cpus} CPUs, so the extra "
        "requests cost throughput instead of adding capacity. Partitions add capacity only when their "
        "servers have CPUs of their own, which one "
        "machine cannot show.",
        "",
    ]


def _machine_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items() if version)
    source = results.get("source", {})
    commit = source.get("commit") or "unknown"
    if source.get("app_has_uncommitted_changes"):
        commit += ", with uncommitted changes under app/"
    return [
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB RAM, shared "
        f"by the Chroma servers and the clients; Python {machine['python']}, {packages}. Commit {commit}.",
    ]


def main(argv: list[str] | None = None) -> int:
    arguments = argv if argv is not None else sys.argv[1:]
    if len(arguments) != 1:
        print(
            "usage: python -m bench.vector_scaling_docs bench/results/vector_scaling-STAMP.json",
            file=sys.stderr,
        )
        return 2
    write_docs(json.loads(Path(arguments[0]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
