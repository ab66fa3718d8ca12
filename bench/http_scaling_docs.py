"""The http_scaling section of docs/benchmarks.md and its plot, built from one run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report

BALANCER_TARGET = 0.6  # load balancer requests/s over nginx's, both over 3 instances
READ_TARGET = 0.7  # one instance's project read over the bare endpoint


def find(measurements: list[dict[str, Any]], front: str, instances: int) -> dict[str, Any]:
    return next(
        entry for entry in measurements if entry["front"] == front and entry["instances"] == instances
    )


def ratios(measurements: list[dict[str, Any]]) -> dict[str, float]:
    rate = {(entry["front"], entry["instances"]): entry["requests_per_second"] for entry in measurements}
    return {
        "balancer_over_nginx": rate[("load_balancer", 3)] / rate[("nginx", 3)],
        "balancer_over_nginx_bare": rate[("load_balancer_bare", 0)] / rate[("nginx_bare", 0)],
        "instance_over_bare": rate[("direct", 1)] / rate[("bare", 0)],
        "balancer_scaling": rate[("load_balancer", 3)] / rate[("load_balancer", 1)],
        "nginx_scaling": rate[("nginx", 3)] / rate[("nginx", 1)],
    }


def write_docs(results: dict[str, Any], page: Path, plot_path: Path, section_name: str) -> None:
    plot(results["measurements"], plot_path)
    report.replace_section(page, section_name, render_section(results, plot_path.name))


def render_section(results: dict[str, Any], plot_name: str) -> str:
    measurements = results["measurements"]
    machine = results["machine"]
    arguments = results["arguments"]
    found = ratios(measurements)
    rows = [
        [
            entry["label"],
            f"{entry['requests_per_second']:,.0f}",
            f"{entry['p50_ms']:.1f}",
            f"{entry['p99_ms']:.1f}",
            f"{entry['non_2xx'] + entry['socket_errors']}",
        ]
        for entry in measurements
    ]
    verdict = {True: "met", False: "not met"}
    lines = [
        "## HTTP scaling: load balancer, nginx and API instances",
        "",
        "`bench/http_scaling.py` reads one completed project, `GET /api/v1/projects/{id}`, through "
        "each front in one run: the load balancer (`python -m app.deployment.simple_load_balancer`, "
        "least_conn) and nginx (`deploy/nginx/nginx.conf.template`, `worker_processes auto`) over 1, 2 "
        "and 3 API instances (`deploy.py`), one instance directly, and a bare FastAPI endpoint that "
        "returns the same JSON from memory with orjson under one uvicorn process. Both proxies are also "
        "measured in front of the bare endpoint, where the backend costs least and the proxy's own "
        "cost shows. The project is finished, so each instance reads it from the "
        f"{arguments['engine']} database once and then serves its cached response from its "
        "in-process cache (the default `caching.provider`, `memory`). Load: wrk with 1 thread and "
        f"{arguments['connections']} connections for {arguments['duration']:g} s per target after "
        f"{arguments['warmup']:g} s of warm-up. Servers, wrk and the database share the machine's "
        "cores, so more instances compete for the same CPUs.",
        "",
        "Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB RAM, "
        f"Python {machine['python']}, {results['wrk']}, {results['nginx']}. Load average "
        f"{_load(machine['load_average_at_start'])} at the start and "
        f"{_load(machine['load_average_at_end'])} at the end. Date: {results['started_at']} (UTC). "
        f"Code: commit `{results['source'].get('commit')}`.",
        "",
        report.markdown_table(["target", "requests/s", "p50 ms", "p99 ms", "errors"], rows),
        "",
        f"![Requests per second of each front]({plot_name})",
        "",
        "### Targets",
        "",
        report.markdown_table(
            ["target", "measured", "result"],
            [
                [
                    f"load balancer ≥ {BALANCER_TARGET:g} × nginx, both over 3 instances",
                    f"{found['balancer_over_nginx']:.2f}",
                    verdict[found["balancer_over_nginx"] >= BALANCER_TARGET],
                ],
                [
                    "(the same, both over the bare endpoint: the proxies' own ceiling)",
                    f"{found['balancer_over_nginx_bare']:.2f}",
                    verdict[found["balancer_over_nginx_bare"] >= BALANCER_TARGET],
                ],
                [
                    f"project read on one instance ≥ {READ_TARGET:g} × the bare endpoint",
                    f"{found['instance_over_bare']:.2f}",
                    verdict[found["instance_over_bare"] >= READ_TARGET],
                ],
            ],
        ),
        "",
        f"Over 3 instances the load balancer served {found['balancer_scaling']:.2f} times and nginx "
        f"{found['nginx_scaling']:.2f} times what they served over 1. Instances, PostgreSQL, the fronts "
        f"and wrk share the same {machine['cpus']} cores here, so an added instance adds no CPU: these "
        "numbers show what the fronts cost, not what instances on more machines would add.",
        "",
        "The read target is for a cached read of a finished project, as measured here. Such a read is "
        "served by `app/api/cached_reads.py` before routing: it runs no SQL, serializes nothing and "
        "skips FastAPI's routing and dependencies, but it still checks the API key and passes the "
        "request-id, access-log and metrics middleware. The bare endpoint has none of these, and it "
        "serializes the JSON with orjson on every request.",
        "",
        "The load balancer is one Python process on uvloop. It parses requests and responses with "
        "httptools on plain asyncio protocols (`app/deployment/http_server.py` and "
        "`app/deployment/upstream.py`), with no ASGI layer and no general-purpose HTTP client. "
        "nginx runs one C worker per core. Where the instances are cheap, as with cached reads, "
        "the balancer's own CPU per request decides how far it goes. Served by uvicorn with "
        "aiohttp's client, the balancer reached 0.47 of nginx over 3 instances in this benchmark "
        "at commit `0bc06c7`. A py-spy profile then put about 35 % of its CPU in aiohttp's client "
        "and about 13 % in uvicorn's two socket writes per response.",
    ]
    return "\n".join(lines)


def _load(values: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values)


def plot(measurements: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [entry["label"] for entry in measurements]
    rates = [entry["requests_per_second"] for entry in measurements]
    colors = {
        "bare": "tab:gray",
        "direct": "tab:green",
        "load_balancer": "tab:blue",
        "nginx": "tab:orange",
        "load_balancer_bare": "lightsteelblue",
        "nginx_bare": "navajowhite",
    }
    bars = left.barh(labels, rates, color=[colors[entry["front"]] for entry in measurements])
    left.bar_label(
        bars,
        labels=[
            f"{entry['requests_per_second']:,.0f}  (p99 {entry['p99_ms']:.0f} ms)" for entry in measurements
        ],
        padding=3,
        fontsize=8,
    )
    left.set_xlim(0, max(rates) * 1.45)
    left.invert_yaxis()
    left.set_xlabel("requests per second, GET /api/v1/projects/{id}")
    left.set_title("Project read by front", fontsize=10)

    for front in ("load_balancer", "nginx"):
        points = sorted(
            (entry["instances"], entry["requests_per_second"])
            for entry in measurements
            if entry["front"] == front
        )
        right.plot(
            [count for count, _ in points],
            [rate for _, rate in points],
            marker="o",
            color=colors[front],
            label=front.replace("_", " "),
        )
    right.set_xticks([1, 2, 3])
    right.set_xlabel("API instances")
    right.set_ylabel("requests per second")
    right.set_ylim(0, None)
    right.set_title("Throughput by number of instances", fontsize=10)
    right.legend(fontsize=8)

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
